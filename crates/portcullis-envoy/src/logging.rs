//! `tracing` events (the policy core's warnings, reloads, the decision log) as lines in Envoy's
//! own log, component `dynamic_modules`: the module has no stdout of its own to write to.

use std::io::Write;
use std::sync::OnceLock;

use tracing_subscriber::fmt::MakeWriter;

use crate::abi;

/// Installs the process-wide subscriber once (the first filter config's `telemetry.log_level`
/// wins; Envoy's `--component-log-level dynamic_modules:<level>` filters further).
pub fn install(level: &str) {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let filter = tracing_subscriber::EnvFilter::try_new(level)
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let _ = tracing_subscriber::fmt()
            .with_writer(EnvoyLog)
            .with_ansi(false)
            .without_time()
            .with_env_filter(filter)
            .try_init();
    });
}

/// Makes one [`Line`] per event, at the event's level.
struct EnvoyLog;

impl<'a> MakeWriter<'a> for EnvoyLog {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line {
            level: abi::LOG_INFO,
            buf: Vec::new(),
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Line {
        let level = match *meta.level() {
            tracing::Level::ERROR => abi::LOG_ERROR,
            tracing::Level::WARN => abi::LOG_WARN,
            tracing::Level::INFO => abi::LOG_INFO,
            _ => abi::LOG_DEBUG,
        };
        Line {
            level,
            buf: Vec::new(),
        }
    }
}

/// One formatted event, handed to Envoy when dropped.
struct Line {
    level: i32,
    buf: Vec<u8>,
}

impl Write for Line {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.buf);
        let text = text.trim_end();
        if !text.is_empty() {
            abi::log(self.level, text);
        }
    }
}
