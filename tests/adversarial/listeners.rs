//! Listeners that cannot be starved: half-open HTTP connections, connection floods past the cap and
//! HTTP/2 rapid reset must not stop the checks of well-behaved clients.
//!
//! Against the real binary as a child process (`PORTCULLIS_BIN`, or the one cargo built), with its
//! open files limit lowered to 1,024 so that a few thousand connections would exhaust it.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::common::{get, seen};

#[path = "../faults_common/mod.rs"]
mod faults_common;

use faults_common::KillOnDrop;

const POLICY: &str = "apis:\n  - {name: open, match: {path_prefix: /open}}\n";

/// Starts the binary on `limits` (a YAML flow mapping) with `nofile` open files at most.
fn serve(dir: &Path, limits: &str, nofile: u32) -> (KillOnDrop, String, String) {
    let cfg = dir.join("portcullis.yaml");
    std::fs::write(
        &cfg,
        format!("listen: {{grpc: 127.0.0.1:0, http: 127.0.0.1:0}}\nlimits: {limits}\n{POLICY}"),
    )
    .unwrap();
    let bin = std::env::var("PORTCULLIS_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_portcullis").to_string());
    // prlimit sets the limit on itself and execs the binary: the child's pid is the server's.
    let mut child = Command::new("prlimit")
        .arg(format!("--nofile={nofile}:{nofile}"))
        .arg("--")
        .arg(bin)
        .args(["serve", "--config"])
        .arg(&cfg)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (grpc, http) = faults_common::listeners(&mut child);
    (KillOnDrop(child), grpc, http)
}

/// This test process needs a descriptor per attacking connection: raise its soft limit (up to the
/// hard one) with `prlimit`, the crate forbidding the unsafe `setrlimit` call.
fn raise_own_open_files(want: usize) {
    let soft = |which: usize| -> Option<usize> {
        let text = std::fs::read_to_string("/proc/self/limits").ok()?;
        let line = text.lines().find(|l| l.starts_with("Max open files"))?;
        let v = line.split_whitespace().nth(3 + which)?;
        if v == "unlimited" {
            Some(usize::MAX)
        } else {
            v.parse().ok()
        }
    };
    if soft(0).is_some_and(|s| s >= want) {
        return;
    }
    let hard = soft(1).unwrap_or(want);
    let _ = Command::new("prlimit")
        .arg(format!("--pid={}", std::process::id()))
        .arg(format!("--nofile={}:", want.min(hard)))
        .status();
    assert!(
        soft(0).is_some_and(|s| s >= want),
        "this test needs {want} open files (ulimit -n)"
    );
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

async fn channel(grpc: &str) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("a new gRPC connection: {e}"))
}

/// One check of `GET /open/1` on `channel`: the gRPC code the caller sees, or why it saw none.
async fn check(channel: tonic::transport::Channel) -> Result<i32, String> {
    let mut client =
        portcullis::proto::auth::authorization_client::AuthorizationClient::new(channel);
    let call = client.check(get("/open/1").request());
    match tokio::time::timeout(Duration::from_secs(10), call).await {
        Ok(Ok(r)) => Ok(seen(&r.into_inner()).code),
        Ok(Err(status)) => Err(format!("{status}")),
        Err(_) => Err("no answer within 10 s".into()),
    }
}

/// Checks until `stop` (at least 20), one every 20 ms, every fifth on a new connection (Envoy reconnecting is
/// what starvation stops first). Returns how many were answered and every failure.
async fn checks_until(
    grpc: String,
    stop: tokio::sync::watch::Receiver<bool>,
) -> (usize, Vec<String>) {
    let mut shared = channel(&grpc).await;
    let (mut ok, mut failed) = (0, Vec::new());
    for i in 0..400 {
        if *stop.borrow() && i >= 20 {
            break;
        }
        if i % 5 == 0 {
            match tokio::time::timeout(Duration::from_secs(10), async {
                tonic::transport::Channel::from_shared(format!("http://{grpc}"))
                    .unwrap()
                    .connect_timeout(Duration::from_secs(5))
                    .connect()
                    .await
            })
            .await
            {
                Ok(Ok(c)) => shared = c,
                Ok(Err(e)) => {
                    failed.push(format!("check {i}: connecting: {e}"));
                    continue;
                }
                Err(_) => {
                    failed.push(format!("check {i}: connecting: no answer within 10 s"));
                    continue;
                }
            }
        }
        match check(shared.clone()).await {
            Ok(0) => ok += 1,
            Ok(code) => failed.push(format!("check {i}: code {code}, want 0 (allowed)")),
            Err(e) => failed.push(format!("check {i}: {e}")),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (ok, failed)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trickled {
    /// The server closed the connection this long after it was opened.
    Closed(Duration),
    /// Still open when the client gave up.
    StillOpen,
    /// The connection could not be made.
    Refused,
}

/// Opens a connection, sends the start of a request head and then one byte every 200 ms, until the
/// server closes the connection or `give_up` passes.
async fn trickle(addr: String, give_up: Duration) -> Trickled {
    let opened = Instant::now();
    let Ok(Ok(mut s)) = tokio::time::timeout(give_up, TcpStream::connect(&addr)).await else {
        return Trickled::Refused;
    };
    // A few KiB up front, as a client with large headers would send: the server buffers them.
    let mut head = b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-pad: ".to_vec();
    head.resize(head.len() + 4096, b'a');
    if s.write_all(&head).await.is_err() {
        return Trickled::Closed(opened.elapsed());
    }
    let mut buf = [0u8; 512];
    while opened.elapsed() < give_up {
        tokio::select! {
            r = s.read(&mut buf) => match r {
                Ok(0) | Err(_) => return Trickled::Closed(opened.elapsed()),
                Ok(_) => {}
            },
            () = tokio::time::sleep(Duration::from_millis(200)) => {
                if s.write_all(b"a").await.is_err() {
                    return Trickled::Closed(opened.elapsed());
                }
            }
        }
    }
    Trickled::StillOpen
}

/// (a) 3,000 connections trickling header bytes into the HTTP listener of a server limited to 1,024
/// open files: every gRPC check meanwhile gets its normal decision, on old and new connections;
/// (b) every half-open connection is closed by the server, the admitted ones after the 1 s header
/// read timeout; (c) the server's memory returns near where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_on_http_does_not_starve_grpc_and_is_closed_after_the_header_read_timeout() {
    const ATTACKERS: usize = 3000;
    raise_own_open_files(ATTACKERS + 512);
    let dir = tempfile::tempdir().unwrap();
    let (child, grpc, http) = serve(dir.path(), "{header_read_timeout: 1s}", 1024);
    let pid = child.0.id();

    // Warm up: a few checks and HTTP requests, then the baseline.
    for _ in 0..5 {
        assert_eq!(check(channel(&grpc).await).await, Ok(0));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_kib(pid);

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let checker = tokio::spawn(checks_until(grpc.clone(), stop_rx));
    let mut attack = tokio::task::JoinSet::new();
    for i in 0..ATTACKERS {
        attack.spawn(trickle(http.clone(), Duration::from_secs(20)));
        if i % 100 == 99 {
            // The listen backlog is finite; a burst of SYNs past it only retries slower.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let mut outcomes = Vec::with_capacity(ATTACKERS);
    while let Some(o) = attack.join_next().await {
        outcomes.push(o.unwrap());
    }
    stop_tx.send(true).unwrap();
    let (answered, failed) = checker.await.unwrap();

    let still_open = outcomes
        .iter()
        .filter(|o| **o == Trickled::StillOpen)
        .count();
    let refused = outcomes.iter().filter(|o| **o == Trickled::Refused).count();
    let timed_out = outcomes
        .iter()
        .filter(|o| matches!(o, Trickled::Closed(d) if *d >= Duration::from_millis(900)))
        .count();
    eprintln!(
        "slowloris: {ATTACKERS} connections, {timed_out} closed after the header read timeout, \
         {} shed at once, {still_open} still open, {refused} refused; {answered} checks answered, \
         {} failed",
        ATTACKERS - still_open - refused - timed_out,
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "checks failed during the attack: {failed:?}"
    );
    assert!(answered >= 10, "only {answered} checks were made");
    assert_eq!(
        still_open, 0,
        "half-open connections the server never closed"
    );
    assert!(timed_out > 0, "no connection was admitted and timed out");

    // (c) The connections are gone; so is their memory (allocator slack allowed for).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(pid);
    eprintln!("slowloris: RSS {before} KiB before, {after} KiB after");
    assert!(
        after <= before * 2 + 32 * 1024,
        "RSS grew from {before} KiB to {after} KiB and stayed"
    );
    assert_eq!(check(channel(&grpc).await).await, Ok(0));
    drop(child);
}

/// (d) Past `limits.max_connections` new HTTP connections are closed at once, the gRPC listener
/// keeps answering, and HTTP answers again once connections are released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_are_closed_and_the_other_listener_answers() {
    let dir = tempfile::tempdir().unwrap();
    let (child, grpc, http) = serve(
        dir.path(),
        "{max_connections: 50, header_read_timeout: 30s}",
        4096,
    );
    let mut held = Vec::new();
    for _ in 0..50 {
        let mut s = TcpStream::connect(&http).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
        held.push(s);
    }
    // Give the server the time to accept them all.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut closed = 0;
    for _ in 0..20 {
        let mut s = TcpStream::connect(&http).await.unwrap();
        let _ = s
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await;
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => closed += 1,
            Ok(Ok(n)) => panic!(
                "a connection past the cap was served: {:?}",
                String::from_utf8_lossy(&buf[..n])
            ),
            Err(_) => {}
        }
    }
    assert_eq!(closed, 20, "connections past the cap left open");
    assert_eq!(check(channel(&grpc).await).await, Ok(0));

    drop(held);
    // The slots come back as the server sees the connections close.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = async {
            let mut s = TcpStream::connect(&http).await.ok()?;
            s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .await
                .ok()?;
            let mut out = Vec::new();
            s.read_to_end(&mut out).await.ok()?;
            Some(String::from_utf8_lossy(&out).into_owned())
        };
        match tokio::time::timeout(Duration::from_secs(3), answer).await {
            Ok(Some(r)) if r.starts_with("HTTP/1.1 200") => break,
            _ if Instant::now() > deadline => panic!("HTTP did not answer after the release"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    drop(child);
}

/// (e) HTTP/2 rapid reset (CVE-2023-44487): one client opens streams and resets each at once, as
/// fast as it can; other clients' checks keep being answered and the server's memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_rapid_reset_does_not_stop_other_clients_checks() {
    let dir = tempfile::tempdir().unwrap();
    let (child, grpc, _http) = serve(dir.path(), "{}", 4096);
    let pid = child.0.id();
    let before = rss_kib(pid);

    let flood_addr = grpc.clone();
    let flood = tokio::spawn(async move {
        let tcp = TcpStream::connect(&flood_addr).await.unwrap();
        let (mut h2, conn) = h2::client::handshake(tcp).await.unwrap();
        let conn = tokio::spawn(conn);
        let started = Instant::now();
        let mut sent = 0usize;
        while sent < 50_000 && started.elapsed() < Duration::from_secs(10) {
            h2 = match h2.ready().await {
                Ok(h2) => h2,
                Err(_) => break,
            };
            let req = http::Request::post(format!(
                "http://{flood_addr}/envoy.service.auth.v3.Authorization/Check"
            ))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
            let Ok((_response, mut stream)) = h2.send_request(req, false) else {
                break;
            };
            stream.send_reset(h2::Reason::CANCEL);
            sent += 1;
        }
        let conn_ended = tokio::time::timeout(Duration::from_secs(5), conn)
            .await
            .is_ok();
        (sent, conn_ended)
    });

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let checker = tokio::spawn(checks_until(grpc.clone(), stop_rx));
    let (sent, conn_ended) = flood.await.unwrap();
    stop_tx.send(true).unwrap();
    let (answered, failed) = checker.await.unwrap();
    let after = rss_kib(pid);
    eprintln!(
        "rapid reset: {sent} streams opened and reset, flooding connection ended: \
         {conn_ended}; {answered} checks answered, {} failed; RSS {before} -> {after} KiB",
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "checks failed during the flood: {failed:?}"
    );
    assert!(answered >= 5, "only {answered} checks were made");
    // Without a stream limit and a reset limit every reset stream left work behind: 28 -> 390 MiB.
    assert!(
        after <= before * 2 + 64 * 1024,
        "RSS grew from {before} KiB to {after} KiB under the flood"
    );
    assert_eq!(check(channel(&grpc).await).await, Ok(0));
    drop(child);
}
