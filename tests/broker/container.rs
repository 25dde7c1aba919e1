//! The container image serves AMQP as a non-root user. Method: build the image with
//! docker/build.sh (no registry; once per test run, shared with `elasticity`, see
//! [`docker::ensure_image`]), run it on a private Docker network with its ports
//! published on 127.0.0.1 only, wait for "entrepot listening" in its log, send and receive
//! one message through the published port, read the user from `docker inspect` and the
//! process's uid from `docker top` (no `docker exec`: the image has no shell), and stop it
//! with `docker stop` (SIGTERM to PID 1) expecting a clean exit. Fails where `docker info` fails (CI provides Docker), unless `ENTREPOT_TEST_ALLOW_SKIP=1`
//! lets a local run skip it.

pub mod docker;

use std::time::{Duration, Instant};

use fe2o3_amqp::types::messaging::{Body, Header, Message};
use fe2o3_amqp::types::primitives::{Binary, Value};
use fe2o3_amqp::{Connection, Receiver, Sender, Session};

use docker::{docker, logs, published};

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
    if !docker::usable_for("the_image_serves_amqp_as_a_non_root_user") {
        return;
    }
    let mut run = DockerRun::for_this_process();
    run.image = docker::ensure_image().to_owned();
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
    let (status, _) = docker::http_get(http, "/healthz").expect("GET /healthz");
    assert_eq!(status, "HTTP/1.1 200 OK");
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

/// Names unique to this test process, and what of them exists, so Drop removes exactly that
/// (never the image, which other tests share).
struct DockerRun {
    image: String,
    network: String,
    container: String,
    network_created: bool,
    container_id: Option<String>,
}

impl DockerRun {
    fn for_this_process() -> DockerRun {
        let pid = std::process::id();
        let run = DockerRun {
            image: String::new(),
            network: format!("entrepot-test-{pid}"),
            container: format!("entrepot-test-{pid}"),
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
    }
}
