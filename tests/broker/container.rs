//! The container image serves AMQP as a non-root user. Method: build the image with
//! docker/build.sh (no registry), run it on a private Docker network with its ports
//! published on 127.0.0.1 only, wait for "entrepot listening" in its log, send and receive
//! one message through the published port, read the user from `docker inspect` and the
//! process's uid from `docker top` (no `docker exec`: the image has no shell), and stop it
//! with `docker stop` (SIGTERM to PID 1) expecting a clean exit. Fails where `docker info` fails (CI provides Docker), unless `ENTREPOT_TEST_ALLOW_SKIP=1`
//! lets a local run skip it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fe2o3_amqp::types::messaging::{Body, Header, Message};
use fe2o3_amqp::types::primitives::{Binary, Value};
use fe2o3_amqp::{Connection, Receiver, Sender, Session};

/// Longest docker/build.sh may take: a cold static release build on a 2-core runner.
const BUILD_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Longest one docker CLI call may take.
const DOCKER_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest the broker may take to log "entrepot listening" in its container.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest one AMQP step may take.
const AMQP_TIMEOUT: Duration = Duration::from_secs(20);
/// Seconds `docker stop` waits after SIGTERM before it sends SIGKILL.
const STOP_GRACE_SECS: &str = "15";
/// The `USER` of the Dockerfile.
const IMAGE_USER: &str = "65532:65532";
const BODY: &[u8] = b"from outside the container";

#[test]
fn the_image_serves_amqp_as_a_non_root_user() {
    if let Err(reason) = docker(&["info"]) {
        crate::requirement::skip_or_fail(
            "the_image_serves_amqp_as_a_non_root_user",
            &format!("docker is not usable (`docker info`: {reason})"),
        );
        return;
    }
    let mut run = DockerRun::for_this_process();
    build_image(&run.image);
    run.image_built = true;
    docker(&["network", "create", &run.network]).expect("docker network create");
    run.network_created = true;
    let id = docker(&[
        "run",
        "--detach",
        "--name",
        &run.container,
        "--network",
        &run.network,
        "-p",
        "127.0.0.1::5672",
        "-p",
        "127.0.0.1::8080",
        &run.image,
    ])
    .expect("docker run");
    run.container_id = Some(id.clone());

    wait_for_listening(&id);
    let amqp = published(&id, "5672/tcp");
    let http = published(&id, "8080/tcp");
    assert!(amqp.ip().is_loopback() && http.ip().is_loopback());
    assert_eq!(http_status(http, "/healthz"), "HTTP/1.1 200 OK");
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(round_trip(&format!("amqp://{amqp}")));

    let image_user = docker(&["image", "inspect", "-f", "{{.Config.User}}", &run.image]);
    assert_eq!(image_user.expect("docker image inspect"), IMAGE_USER);
    let user = docker(&["inspect", "-f", "{{.Config.User}}", &id]).expect("docker inspect");
    assert_eq!(user, IMAGE_USER, "the container must not run as root");
    // The process itself, as the daemon's host sees it: a remapped user namespace would
    // show another number, never 0. (`docker top` needs the pid column.)
    let top = docker(&["top", &id, "-o", "pid,uid"]).expect("docker top");
    let uids: Vec<&str> = top
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert!(
        !uids.is_empty() && !uids.contains(&"0"),
        "process uids {uids:?}"
    );

    docker(&["stop", "--time", STOP_GRACE_SECS, &id]).expect("docker stop");
    let exit = docker(&["inspect", "-f", "{{.State.ExitCode}}", &id]).expect("docker inspect");
    assert_eq!(
        exit,
        "0",
        "SIGTERM should stop the broker cleanly; log:\n{}",
        logs(&id)
    );
}

/// One durable message in and out of a queue, through the published port.
async fn round_trip(url: &str) {
    let mut conn = within("connection open", Connection::open("container", url))
        .await
        .unwrap();
    let mut session = Session::begin(&mut conn).await.unwrap();
    let mut sender = Sender::attach(&mut session, "s", "in-container")
        .await
        .unwrap();
    let message = Message::builder()
        .header(Header {
            durable: true,
            ..Default::default()
        })
        .data(Binary::from(BODY.to_vec()))
        .build();
    let outcome = within("send", sender.send(message)).await.unwrap();
    outcome.accepted_or_else(|o| o).unwrap();
    let mut receiver = Receiver::attach(&mut session, "r", "in-container")
        .await
        .unwrap();
    let d = within("receive", receiver.recv::<Body<Value>>())
        .await
        .unwrap();
    assert!(matches!(d.body(), Body::Data(batch) if batch[0].0.as_slice() == BODY));
    receiver.accept(&d).await.unwrap();
    sender.close().await.unwrap();
    receiver.close().await.unwrap();
    session.end().await.unwrap();
    conn.close().await.unwrap();
}

async fn within<F: std::future::Future>(what: &str, step: F) -> F::Output {
    tokio::time::timeout(AMQP_TIMEOUT, step)
        .await
        .unwrap_or_else(|_| panic!("{what} took over {AMQP_TIMEOUT:?}"))
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

/// Waits until the broker logs that it listens; fails early if the container exits.
fn wait_for_listening(id: &str) {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let log = logs(id);
        if log.contains("entrepot listening") {
            return;
        }
        let running = docker(&["inspect", "-f", "{{.State.Running}}", id]);
        assert_eq!(
            running.as_deref(),
            Ok("true"),
            "container stopped; log:\n{log}"
        );
        assert!(
            Instant::now() < deadline,
            "broker did not listen within {START_TIMEOUT:?}; log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The host address Docker published a container port on, e.g. 127.0.0.1:49153.
fn published(id: &str, port: &str) -> SocketAddr {
    let out = docker(&["port", id, port]).expect("docker port");
    let first = out.lines().next().unwrap_or_default();
    first
        .parse()
        .unwrap_or_else(|e| panic!("docker port {port}: {first:?}: {e}"))
}

fn http_status(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("http connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("http write");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("http read");
    resp.lines().next().unwrap_or_default().to_owned()
}

fn logs(id: &str) -> String {
    let mut cmd = Command::new("docker");
    cmd.args(["logs", id]);
    match run(&mut cmd, DOCKER_TIMEOUT) {
        Ok(out) => out.stdout + &out.stderr,
        Err(e) => format!("(docker logs failed: {e})"),
    }
}

/// Names unique to this test process, and what of them exists, so Drop removes exactly that.
struct DockerRun {
    image: String,
    network: String,
    container: String,
    image_built: bool,
    network_created: bool,
    container_id: Option<String>,
}

impl DockerRun {
    fn for_this_process() -> DockerRun {
        let pid = std::process::id();
        let run = DockerRun {
            image: format!("entrepot-test:{pid}"),
            network: format!("entrepot-test-{pid}"),
            container: format!("entrepot-test-{pid}"),
            image_built: false,
            network_created: false,
            container_id: None,
        };
        // Leftovers of a killed earlier run whose pid this process reuses.
        let _ = docker(&["rm", "--force", &run.container]);
        let _ = docker(&["network", "rm", &run.network]);
        run
    }
}

impl Drop for DockerRun {
    fn drop(&mut self) {
        if let Some(id) = &self.container_id {
            if std::thread::panicking() {
                eprintln!("container log:\n{}", logs(id));
            }
            if let Err(e) = docker(&["rm", "--force", "--volumes", id]) {
                eprintln!("cleanup: docker rm {id}: {e}");
            }
        }
        if self.network_created {
            if let Err(e) = docker(&["network", "rm", &self.network]) {
                eprintln!("cleanup: docker network rm {}: {e}", self.network);
            }
        }
        if self.image_built {
            if let Err(e) = docker(&["image", "rm", &self.image]) {
                eprintln!("cleanup: docker image rm {}: {e}", self.image);
            }
        }
    }
}

/// `docker <args>`, bounded by DOCKER_TIMEOUT; Ok(trimmed stdout) on success.
fn docker(args: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new("docker");
    cmd.args(args);
    run(&mut cmd, DOCKER_TIMEOUT).map(|out| out.stdout.trim().to_owned())
}

struct Output {
    stdout: String,
    stderr: String,
}

/// Runs `cmd` in its own process group and kills the whole group (cargo under
/// build.sh included) if it is not done within `timeout`.
fn run(cmd: &mut Command, timeout: Duration) -> Result<Output, String> {
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
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = Output {
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    };
    if status.success() {
        Ok(out)
    } else {
        Err(format!("{status}: {}", out.stderr.trim()))
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
