//! The service binary run as a real child process, with its log kept in a file and signals sent by PID.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

/// Builds the service binary with cargo, in the profile of the running program (a binary of the
/// workspace, such as the demo or the benchmark in `tests/tools`), and returns its path: beside the
/// running program.
pub fn build_service() -> PathBuf {
    let me = std::env::current_exe().expect("path of the running program");
    let release = me.parent().is_some_and(|dir| dir.ends_with("release"));
    eprintln!("building the service{}…", if release { " (release)" } else { "" });
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.args(["build", "--quiet", "--bin", "dynamodb-stream-consumer"]).current_dir(crate::workspace_root());
    if release {
        command.arg("--release");
    }
    let status = command.status().expect("run cargo build");
    assert!(status.success(), "cargo build of the service failed");
    me.with_file_name("dynamodb-stream-consumer")
}

/// The cores every service process started from now on is pinned to (`pin_services_to`).
static PINNED_CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

/// Pins every service process started from now on to the first `cores` cores (with `taskset`, every
/// thread), so a benchmark can report per-core figures on a bigger machine.
pub fn pin_services_to(cores: usize) {
    let _ = PINNED_CORES.set(cores);
}

/// A running service process; killed when dropped if it is still running.
pub struct ServiceProcess {
    child: Child,
    log: PathBuf,
    _log_dir: tempfile::TempDir,
}

impl ServiceProcess {
    /// Starts `binary` with `args` and exactly the environment `env` (plus `PATH`), logging to a file.
    pub fn start(binary: &Path, args: &[&str], env: &[(String, String)]) -> Self {
        let log_dir = tempfile::tempdir().expect("create a log directory");
        let log = log_dir.path().join("service.log");
        let file = std::fs::File::create(&log).expect("create the service log file");
        let err_file = file.try_clone().expect("clone the log file handle");
        let mut command = Command::new(binary);
        command.args(args).env_clear().stdout(Stdio::from(file)).stderr(Stdio::from(err_file));
        if let Some(path) = std::env::var_os("PATH") {
            command.env("PATH", path);
        }
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.spawn().unwrap_or_else(|err| panic!("cannot start {}: {err}", binary.display()));
        if let Some(cores) = PINNED_CORES.get() {
            // Every thread there is (the process has just started: its runtime's threads come from
            // this one and inherit the mask).
            let list = format!("0-{}", cores - 1);
            let pinned = Command::new("taskset").args(["-a", "-c", "-p", &list, &child.id().to_string()]).output();
            assert!(
                pinned.as_ref().is_ok_and(|output| output.status.success()),
                "taskset -a -c -p {list} {} failed: {pinned:?}",
                child.id()
            );
        }
        ServiceProcess { child, log, _log_dir: log_dir }
    }

    /// Starts the service and waits until `GET /readyz` on `port` answers 200; panics with the log
    /// if the process exits first or is not ready within `deadline`.
    pub async fn start_ready(binary: &Path, env: &[(String, String)], port: u16, deadline: Duration) -> Self {
        let mut service = ServiceProcess::start(binary, &[], env);
        let give_up = tokio::time::Instant::now() + deadline;
        loop {
            if let Ok((200, _)) = crate::http_get(port, "/readyz").await {
                return service;
            }
            if let Some(status) = service.try_status() {
                panic!("service exited with {status} before it was ready; log:\n{}", service.log());
            }
            assert!(tokio::time::Instant::now() < give_up, "service not ready in time; log:\n{}", service.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends SIGTERM and checks the graceful stop: exit 0 within `deadline`, no panic. Returns the log.
    pub async fn stop_gracefully(mut self, deadline: Duration) -> String {
        self.signal("TERM");
        let status = self.wait_exit(deadline).await;
        let log = self.log();
        assert!(status.success(), "graceful stop must exit 0, got {status}; log:\n{log}");
        assert!(!log.contains("panicked"), "log shows a panic:\n{log}");
        log
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process has written to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal by name (`TERM`, `INT`, `KILL`, `STOP`, `CONT`) with the system's `kill`.
    pub fn signal(&self, name: &str) {
        let status =
            Command::new("kill").arg(format!("-{name}")).arg(self.pid().to_string()).status().expect("run kill");
        assert!(status.success(), "kill -{name} {} failed", self.pid());
    }

    /// The exit status, if the process has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for the process to exit, or panics (with its log) after `deadline`.
    pub async fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let give_up = tokio::time::Instant::now() + deadline;
        loop {
            if let Some(status) = self.try_status() {
                return status;
            }
            if tokio::time::Instant::now() >= give_up {
                panic!("process did not exit within {deadline:?}; log:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
