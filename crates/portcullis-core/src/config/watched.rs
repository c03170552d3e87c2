//! Which files a config watcher follows: the config file, and the keys file the policy names. The
//! service's watcher and the Envoy module's both decide with these (the core itself stays free of
//! the file-watching crate).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// The directory of `p` (`.` for a bare file name).
pub fn parent(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// What an event over `paths` asks for: a reload of the config, of the keys file alone. A path of
/// Kubernetes' `..data` symlink swap (a ConfigMap update) touches both.
pub fn touches(paths: &[PathBuf], config: &Path, keys: Option<&Path>) -> (bool, bool) {
    let named =
        |want: Option<&OsStr>| want.is_some_and(|w| paths.iter().any(|p| p.file_name() == Some(w)));
    let swap = paths.iter().any(|p| p.to_string_lossy().contains("..data"));
    (
        named(config.file_name()) || swap,
        named(keys.and_then(Path::file_name)) || (swap && keys.is_some()),
    )
}

/// When the keys file changes from `old` to `new`: the directory to stop watching and the one to
/// start watching. The config's directory is always watched, so it is never either.
pub fn moved(
    config_dir: &Path,
    old: Option<&Path>,
    new: Option<&Path>,
) -> (Option<PathBuf>, Option<PathBuf>) {
    let (old, new) = (old.map(parent), new.map(parent));
    if old == new {
        return (None, None);
    }
    let apart = |d: Option<PathBuf>| d.filter(|d| d != config_dir);
    (apart(old), apart(new))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_touches_the_config_the_keys_file_or_both() {
        let config = Path::new("/etc/p/portcullis.yaml");
        let keys = Some(Path::new("/var/keys/keys.txt"));
        let at = |p: &str| vec![PathBuf::from(p)];
        assert_eq!(
            touches(&at("/etc/p/portcullis.yaml"), config, keys),
            (true, false)
        );
        assert_eq!(
            touches(&at("/var/keys/keys.txt"), config, keys),
            (false, true)
        );
        assert_eq!(
            touches(&at("/var/keys/other.txt"), config, keys),
            (false, false)
        );
        assert_eq!(touches(&at("/etc/p/..data"), config, keys), (true, true));
        assert_eq!(touches(&at("/etc/p/..data"), config, None), (true, false));
        assert_eq!(
            touches(&at("/var/keys/keys.txt"), config, None),
            (false, false)
        );
    }

    #[test]
    fn a_moved_keys_file_moves_the_watch_but_never_off_the_config_directory() {
        let dir = Path::new("/etc/p");
        let (a, b) = (Path::new("/var/a/k.txt"), Path::new("/var/b/k.txt"));
        let some = |p: &str| Some(PathBuf::from(p));
        assert_eq!(
            moved(dir, Some(a), Some(b)),
            (some("/var/a"), some("/var/b"))
        );
        assert_eq!(moved(dir, None, Some(b)), (None, some("/var/b")));
        assert_eq!(moved(dir, Some(a), None), (some("/var/a"), None));
        assert_eq!(
            moved(dir, Some(a), Some(Path::new("/var/a/other.txt"))),
            (None, None)
        );
        assert_eq!(
            moved(dir, Some(Path::new("/etc/p/k.txt")), Some(b)),
            (None, some("/var/b"))
        );
        assert_eq!(
            moved(dir, Some(a), Some(Path::new("/etc/p/k.txt"))),
            (some("/var/a"), None)
        );
        assert_eq!(
            moved(Path::new("."), None, Some(Path::new("k.txt"))),
            (None, None)
        );
    }
}
