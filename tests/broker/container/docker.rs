//! The Docker side of the container tests (`container`, `elasticity`): the project's image
//! built once per test run, the `docker` CLI bounded in time, container logs, and plain
//! HTTP/1.1 GETs against a container's admin port.
//!
//! The image is shared: every test that needs it calls [`ensure_image`], which builds it
//! with docker/build.sh under an exclusive lock file in cargo's target tmp directory, so
//! two tests in parallel processes (nextest runs one process per test) never build it at
//! the same time, and within one nextest run ([`NEXTEST_RUN_ID`]) it is built once. The
//! shared tag is never removed by a test: another test may be running containers of it.
//! Nothing here talks AMQP.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The tag of the image every container test runs.
pub const IMAGE: &str = "entrepot-test:shared";
/// Longest docker/build.sh may take: a cold static release build on a 2-core runner.
const BUILD_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Longest one docker CLI call may take.
pub const DOCKER_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest one HTTP exchange with a container may take (connect, then read).
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// Set by nextest to one value for every test process of a run.
const NEXTEST_RUN_ID: &str = "NEXTEST_RUN_ID";

/// True when the Docker daemon answers; otherwise fails `test` (or skips it when
/// `ENTREPOT_TEST_ALLOW_SKIP=1`) and returns false.
pub fn usable_for(test: &str) -> bool {
    match docker(&["info"]) {
        Ok(_) => true,
        Err(reason) => {
            crate::requirement::skip_or_fail(
                test,
                &format!("docker is not usable (`docker info`: {reason})"),
            );
            false
        }
    }
}

/// Builds [`IMAGE`] from the work tree unless this nextest run already did; returns its
/// tag. Holds the build lock throughout, so a parallel caller waits instead of building.
pub fn ensure_image() -> &'static str {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(dir).expect("target tmp dir");
    let lock = std::fs::File::create(dir.join("entrepot-test-image.lock")).expect("lock file");
    // SAFETY: flock(2) on a descriptor this function owns; released when `lock` closes.
    let locked = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(locked, 0, "flock: {}", std::io::Error::last_os_error());
    let stamp = dir.join("entrepot-test-image.run");
    let run_id = std::env::var(NEXTEST_RUN_ID).ok();
    let built_this_run = run_id.is_some()
        && std::fs::read_to_string(&stamp).ok() == run_id
        && docker(&["image", "inspect", "-f", "{{.Id}}", IMAGE]).is_ok();
    if built_this_run {
        println!("{IMAGE} already built in this run");
    } else {
        let before = docker(&["image", "inspect", "-f", "{{.Id}}", IMAGE]).ok();
        build_image(IMAGE);
        // The image the tag named before is left untagged: remove it, unless a container
        // of a parallel test still uses it (then the daemon refuses, and it stays).
        let after = docker(&["image", "inspect", "-f", "{{.Id}}", IMAGE]).ok();
        if let Some(old) = before.filter(|old| Some(old) != after.as_ref()) {
            let _ = docker(&["image", "rm", &old]);
        }
        if let Some(id) = run_id {
            std::fs::write(&stamp, id).expect("image stamp");
        }
    }
    drop(lock);
    IMAGE
}

fn build_image(tag: &str) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/build.sh");
    let started = Instant::now();
    let mut cmd = Command::new("bash");
    cmd.arg(script).args(["--tag", tag]);
    if let Some(cargo) = std::env::var_os("CARGO") {
        cmd.env("CARGO", cargo);
    }
    let out = run(&mut cmd, BUILD_TIMEOUT).unwrap_or_else(|e| panic!("docker/build.sh: {e}"));
    println!("{} in {:?}", out.stdout.trim(), started.elapsed());
}

/// `docker <args>`, bounded by [`DOCKER_TIMEOUT`]; Ok(trimmed stdout) on success.
pub fn docker(args: &[&str]) -> Result<String, String> {
    docker_within(args, DOCKER_TIMEOUT)
}

/// `docker <args>`, bounded by `timeout`; Ok(trimmed stdout) on success.
pub fn docker_within(args: &[&str], timeout: Duration) -> Result<String, String> {
    let mut cmd = Command::new("docker");
    cmd.args(args);
    run(&mut cmd, timeout).map(|out| out.stdout.trim().to_owned())
}

/// Everything the container wrote to stdout and stderr so far.
pub fn logs(id: &str) -> String {
    let mut cmd = Command::new("docker");
    cmd.args(["logs", id]);
    match run(&mut cmd, DOCKER_TIMEOUT) {
        Ok(out) => out.stdout + &out.stderr,
        Err(e) => format!("(docker logs failed: {e})"),
    }
}

/// The host address Docker published a container port on, e.g. 127.0.0.1:49153.
pub fn published(id: &str, port: &str) -> SocketAddr {
    let out = docker(&["port", id, port]).expect("docker port");
    let first = out.lines().next().unwrap_or_default();
    first
        .parse()
        .unwrap_or_else(|e| panic!("docker port {port}: {first:?}: {e}"))
}

/// `GET path` over HTTP/1.1: (status line, body), or why it failed.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(String, String), String> {
    http_request(addr, "GET", path)
}

/// One HTTP/1.1 request with no body: (status line, body), or why it failed.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
) -> Result<(String, String), String> {
    let mut s = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(HTTP_TIMEOUT)).ok();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).map_err(|e| e.to_string())?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let status = head.lines().next().unwrap_or_default().to_owned();
    Ok((status, body.to_owned()))
}

pub struct Output {
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` in its own process group and kills the whole group (cargo under
/// build.sh included) if it is not done within `timeout`.
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<Output, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("spawn: {e}"))?;
    let stdout = read_in_background(child.stdout.take());
    let stderr = read_in_background(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| format!("wait: {e}"))? {
            break status;
        }
        if Instant::now() >= deadline {
            // SAFETY: kill(2) on the process group this function created.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            return Err(format!("timed out after {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = Output {
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    };
    if status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{status}: {} {}",
            out.stderr.trim(),
            out.stdout.trim()
        ))
    }
}

fn read_in_background(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    })
}
