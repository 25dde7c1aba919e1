//! Starts the real `entrepot` binary on loopback ports it picks itself, and stops it
//! with SIGTERM or SIGKILL. Every wait is bounded.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Longest a broker may take to start listening.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

pub struct BrokerProcess {
    child: Child,
    pub amqp: SocketAddr,
    pub http: SocketAddr,
    /// The amqps listener, when the broker was started with a TLS certificate.
    pub amqps: Option<SocketAddr>,
    /// The data directory (kept for tests that inspect or reuse it).
    #[allow(dead_code)]
    pub dir: PathBuf,
    logs: mpsc::Receiver<String>,
}

impl BrokerProcess {
    /// Starts a broker on `dir` with extra `serve` flags. The child is reaped by
    /// `kill`/`terminate`, and `Drop` calls `kill`.
    pub fn start(dir: &Path, extra: &[&str]) -> BrokerProcess {
        let mut command = Command::new(env!("CARGO_BIN_EXE_entrepot"));
        command
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--http",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(dir)
            .args(extra);
        BrokerProcess::launch(command, dir)
    }

    /// Starts `command`, a complete `entrepot serve` command line (possibly wrapped, e.g. in
    /// `ip netns exec`, which execs the broker so the child is the broker itself), and waits
    /// until it logs its listeners.
    #[allow(clippy::zombie_processes)]
    pub fn launch(mut command: Command, dir: &Path) -> BrokerProcess {
        let mut child = command
            .env(
                "RUST_LOG",
                std::env::var("ENTREPOT_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn entrepot");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var("ENTREPOT_TEST_ECHO").is_ok() {
                    eprintln!("[broker] {line}");
                }
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = std::time::Instant::now() + START_TIMEOUT;
        // Everything it said, for the failure message when it never starts.
        let mut said: Vec<String> = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                let status = child.try_wait().ok().flatten();
                let tail = said[said.len().saturating_sub(20)..].join("\n");
                panic!(
                    "broker did not start within {START_TIMEOUT:?} (exit status: {status:?}); \
                     its last log lines:\n{tail}"
                );
            };
            said.push(line.clone());
            if let (Some(a), Some(h)) = (field(&line, "amqp="), field(&line, "http=")) {
                return BrokerProcess {
                    child,
                    amqp: a.parse().expect("amqp addr"),
                    http: h.parse().expect("http addr"),
                    amqps: field(&line, "amqps=").and_then(|a| a.parse().ok()),
                    dir: dir.to_path_buf(),
                    logs: rx,
                };
            }
        }
    }

    /// The broker's process id, e.g. to read `/proc/<pid>/status`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self) -> String {
        format!("amqp://{}", self.amqp)
    }

    /// How the process ended, or `None` while it runs (reaps it once it has exited).
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGKILL: no chance to sync or close anything.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait (bounded) for a clean exit; returns the exit status code.
    pub fn terminate(&mut self) -> Option<i32> {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        None
    }

    /// Lines the broker logged so far.
    pub fn drain_logs(&self) -> Vec<String> {
        self.logs.try_iter().collect()
    }

    /// GET a path from the HTTP endpoint; returns (status line, body).
    pub fn http_get(&self, path: &str) -> (String, String) {
        self.http_request("GET", path).expect("http GET")
    }

    /// One HTTP request to the HTTP endpoint, bounded by 5 s; returns (status line, body),
    /// or the I/O error (a node that is down or cut off).
    pub fn http_request(&self, method: &str, path: &str) -> std::io::Result<(String, String)> {
        let mut s = TcpStream::connect_timeout(&self.http, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        )?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
        Ok((
            head.lines().next().unwrap_or_default().to_owned(),
            body.to_owned(),
        ))
    }

    /// The value of a metric line such as `entrepot_queue_depth{queue="q"}`.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let (_, body) = self.http_get("/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(key)? + key.len();
    line[start..].split_whitespace().next()
}

/// Runs a python-qpid-proton script from `tests/broker/` against `broker` with `args`,
/// bounded by `timeout`; returns its stdout, panicking with stdout, stderr and the broker's
/// log when it fails. proton missing is a failure, never a skip (CI installs it).
pub fn run_proton_script(
    broker: &BrokerProcess,
    script: &str,
    args: &[&str],
    timeout: Duration,
) -> String {
    run_proton_script_at(&broker.url(), script, args, timeout, || {
        format!("broker log:\n{}", broker.drain_logs().join("\n"))
    })
}

/// [`run_proton_script`] against any AMQP URL (a cluster node's, say); `context` gives
/// what to print beside the script's output when it fails.
pub fn run_proton_script_at(
    url: &str,
    script: &str,
    args: &[&str],
    timeout: Duration,
    context: impl Fn() -> String,
) -> String {
    require_proton();
    let path = format!("{}/tests/broker/{script}", env!("CARGO_MANIFEST_DIR"));
    let mut child = Command::new("python3")
        .arg(&path)
        .arg(url)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python3");
    let deadline = std::time::Instant::now() + timeout;
    while child.try_wait().expect("poll python3").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("reap python3");
            panic!(
                "{script} did not finish within {timeout:?}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("python3 output");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{script} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        context()
    );
    stdout
}

/// Fails (never skips) when python3 cannot import proton.
fn require_proton() {
    let out = Command::new("python3")
        .args([
            "-c",
            "import proton, proton.handlers, proton.reactor, proton.utils",
        ])
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "python3 cannot import proton; install it with `pip install python-qpid-proton`:\n{}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("python3 is not runnable ({e}); it and python-qpid-proton are required"),
    }
}
