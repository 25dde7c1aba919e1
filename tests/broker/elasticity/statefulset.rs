//! A StatefulSet of the project's image, reproduced with Docker: what Kubernetes would
//! do, step by step, with no API server.
//!
//! - Pod `entrepot-K` is a container whose hostname is `entrepot-K` (the node id is its
//!   ordinal) on one user network, where the alias `entrepot-K.<SERVICE>` resolves to it
//!   (the headless service's per-pod DNS name). Container names carry this process's id,
//!   so two runs on one daemon do not collide.
//! - One named volume per ordinal, mounted at /data, kept when its pod is deleted (a
//!   PersistentVolumeClaim): a restarted pod comes back with its store.
//! - Ordered start: [`StatefulSet::scale_up`] starts pod K and returns once it is ready
//!   (`/readyz` 200 and a voter in the leader's membership), so pod K+1 starts after K is
//!   ready. The initial members start together ([`StatefulSet::start_initial`], the
//!   manifests' `Parallel` policy): a Raft group needs a quorum before any is ready.
//! - Ordered stop through the preStop path: `entrepot drain --desired-replicas N` run
//!   inside the pod (`docker exec`: the image has no shell, the static binary runs), then
//!   `docker stop` with a grace period (SIGTERM, then SIGKILL), then the container is
//!   deleted and its volume kept.
//!
//! Cluster mode ([`Mode`]): the default one-group mode, or `--cluster-mode groups` (a Raft
//! group per address; `ENTREPOT_CLUSTER_MODE=groups` in every pod's environment, the rest
//! unchanged: `--peers-dns` and `--cluster-size` form group 0 from pods 0..3, later pods
//! join by themselves with their `entrepot-K.<SERVICE>` member address). In groups mode a
//! pod is a member once every running pod's replica of the metadata group lists it
//! ([`StatefulSet::groups_statuses`]); its readiness already waits for every group placed
//! on it to have it as a voter.
//!
//! Membership: with [`Membership::SelfManaged`] (the broker's `--peers-dns` auto-join and
//! `entrepot drain`, issue 13) the set only starts, drains and stops pods. Where the image
//! has no `drain` command yet, [`Membership::AdminApi`] does the membership changes
//! itself through the leader's admin API (`POST /cluster/add`, `/cluster/remove`) at the
//! same points. Clients reach a pod at its bridge IP when the host can route there, else
//! at ports published on 127.0.0.1.
//!
//! Every container's log is saved to the run's directory before the container is
//! deleted: a failure's evidence outlives the pod.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::groups::GroupsStatus;
use crate::cluster_support::led_addresses_in;
use crate::container::docker::{self, docker, docker_within, http_get, http_request};

/// The headless service: pod K answers at `entrepot-K.<SERVICE>`.
pub const SERVICE: &str = "entrepot.test";
/// Initial members (`--cluster-size`): pods 0..3 form the cluster.
pub const INITIAL_MEMBERS: u64 = 3;
const AMQP_PORT: u16 = 5672;
const HTTP_PORT: u16 = 8080;
/// The inter-node (Raft) port of the image.
const PEER_PORT: u16 = 5673;
/// Longest a pod may take to be ready (start, join, catch-up).
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// Longest the preStop drain may take (terminationGracePeriodSeconds covers it and the
/// stop).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(90);
/// Seconds `docker stop` waits after SIGTERM before SIGKILL.
const STOP_GRACE_SECS: u64 = 30;
/// How often readiness and membership are polled.
const POLL: Duration = Duration::from_millis(100);
/// Longest an admin-API membership change is retried (another change may be running).
const CHANGE_TIMEOUT: Duration = Duration::from_secs(90);
/// Raft entries between snapshots: small, so a joining node catches up from a snapshot
/// and the log after it, not from the log alone.
const SNAPSHOT_EVERY: &str = "2048";

/// The brokers' cluster mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// One Raft group for the whole cluster (`scaling_3_5_3_…`).
    OneGroup,
    /// A Raft group per address (`--cluster-mode groups`, `scaling_groups_…`).
    Groups,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::OneGroup => "one-group",
            Mode::Groups => "groups",
        }
    }
}

/// Who changes the Raft membership when pods come and go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Membership {
    /// The broker: auto-join on start, `entrepot drain` before a stop.
    SelfManaged,
    /// This test, through the leader's admin API (the image has no `drain` yet).
    AdminApi,
}

impl Membership {
    /// `ENTREPOT_ELASTICITY_MEMBERSHIP=admin|drain` forces one; otherwise SelfManaged
    /// when the image's binary has a `drain` command.
    pub fn detect(image: &str) -> Membership {
        match std::env::var("ENTREPOT_ELASTICITY_MEMBERSHIP").as_deref() {
            Ok("admin") => return Membership::AdminApi,
            Ok("drain") => return Membership::SelfManaged,
            _ => {}
        }
        let help = docker(&[
            "run",
            "--rm",
            "--entrypoint",
            "/usr/local/bin/entrepot",
            image,
            "drain",
            "--help",
        ]);
        match help {
            Ok(text) if text.contains("--desired-replicas") => Membership::SelfManaged,
            _ => Membership::AdminApi,
        }
    }
}

/// How the host reaches a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reach {
    Bridge,
    Published,
}

/// A running pod and where this process reaches it.
pub struct Pod {
    container: String,
    pub amqp: SocketAddr,
    pub http: SocketAddr,
}

/// A node's `GET /cluster`, the fields the test looks at.
#[derive(Clone, Debug, Default)]
pub struct Status {
    pub leads: bool,
    pub leader: Option<u64>,
    pub voters: BTreeSet<u64>,
    pub learners: BTreeSet<u64>,
}

impl Status {
    pub fn parse(yaml: &str) -> Option<Status> {
        let field = |key: &str| {
            yaml.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(": "))
                .map(str::trim)
        };
        let ids = |kind: &str| {
            yaml.lines()
                .filter(|l| l.contains(&format!("kind: {kind}")))
                .filter_map(|l| l.split("id: ").nth(1)?.split(',').next()?.parse().ok())
                .collect()
        };
        Some(Status {
            leads: field("role")? == "leader",
            leader: field("leader")?.parse().ok(),
            voters: ids("voter"),
            learners: ids("learner"),
        })
    }
}

pub struct StatefulSet {
    image: String,
    pub mode: Mode,
    /// `NAME=value` set in every pod beyond the common ones (the cluster mode, the link
    /// routing).
    extra_env: Vec<String>,
    /// Prefix of every Docker object this run creates.
    prefix: String,
    network: Option<String>,
    pub membership: Membership,
    reach: Option<Reach>,
    volumes: BTreeSet<u64>,
    pub pods: BTreeMap<u64, Pod>,
    /// Containers started so far, for log file names.
    incarnations: u32,
    /// Where container logs are saved.
    logs_dir: PathBuf,
}

impl StatefulSet {
    /// A set whose Docker objects are named `entrepot-<name>-<pid>…` (tests side by side
    /// on one daemon keep theirs apart); nothing runs yet.
    pub fn new(
        name: &str,
        image: &str,
        mode: Mode,
        membership: Membership,
        logs_dir: PathBuf,
    ) -> StatefulSet {
        assert!(
            mode == Mode::OneGroup || membership == Membership::SelfManaged,
            "groups mode needs the image's auto-join and `entrepot drain` (the admin-API \
             path reads the one-group GET /cluster)"
        );
        let prefix = format!("entrepot-{name}-{}", std::process::id());
        // Leftovers of a killed earlier run whose pid this process reuses.
        for k in 0..8 {
            let _ = docker(&["rm", "--force", &format!("{prefix}-{k}")]);
            let _ = docker(&["volume", "rm", &format!("{prefix}-data-{k}")]);
        }
        let _ = docker(&["network", "rm", &prefix]);
        std::fs::create_dir_all(&logs_dir).expect("logs dir");
        docker(&["network", "create", &prefix]).expect("docker network create");
        let mut extra_env = Vec::new();
        if mode == Mode::Groups {
            extra_env.push("ENTREPOT_CLUSTER_MODE=groups".to_owned());
            if let Ok(routing) = std::env::var("ENTREPOT_ELASTICITY_LINK_ROUTING") {
                extra_env.push(format!("ENTREPOT_LINK_ROUTING={routing}"));
            }
        }
        StatefulSet {
            image: image.to_owned(),
            mode,
            extra_env,
            network: Some(prefix.clone()),
            prefix,
            membership,
            reach: None,
            volumes: BTreeSet::new(),
            pods: BTreeMap::new(),
            incarnations: 0,
            logs_dir,
        }
    }

    pub fn logs_dir(&self) -> &std::path::Path {
        &self.logs_dir
    }

    /// Starts pods 0..INITIAL_MEMBERS together and waits until every one is ready.
    pub fn start_initial(&mut self) {
        for k in 0..INITIAL_MEMBERS {
            self.run_pod(k);
        }
        for k in 0..INITIAL_MEMBERS {
            self.wait_ready(k);
        }
    }

    /// Scale up by pod `k`: start it, let it join (or add it), return once it is ready.
    pub fn scale_up(&mut self, k: u64, started: impl FnOnce(SocketAddr)) {
        self.run_pod(k);
        started(self.pods[&k].amqp);
        if self.membership == Membership::AdminApi {
            self.wait_http(k);
            let addr = format!("entrepot-{k}.{SERVICE}:{PEER_PORT}/{AMQP_PORT}");
            self.change(&format!("/cluster/add?id={k}&addr={addr}"));
        }
        self.wait_ready(k);
        self.wait_voter(k);
    }

    /// Scale down to `desired` replicas by pod `k` (the highest ordinal): preStop drain
    /// (or a removal through the admin API), then stop and delete it; its volume stays.
    pub fn scale_down(&mut self, k: u64, desired: u64) -> Vec<String> {
        let mut problems = Vec::new();
        match self.membership {
            Membership::SelfManaged => {
                if let Err(e) = self.drain(k, desired) {
                    problems.push(e);
                }
            }
            Membership::AdminApi => self.change(&format!("/cluster/remove?id={k}")),
        }
        problems.extend(self.delete_pod(k));
        problems
    }

    /// A restart of pod `k` (rolling update): preStop drain, which must change nothing
    /// (k < desired), stop, delete (then `deleted` runs: the pod's DNS name is gone until
    /// it runs again), start again on the same volume, wait until ready.
    pub fn restart(
        &mut self,
        k: u64,
        desired: u64,
        deleted: impl FnOnce(),
        started: impl FnOnce(SocketAddr),
    ) -> Vec<String> {
        let mut problems = Vec::new();
        if self.membership == Membership::SelfManaged {
            if let Err(e) = self.drain(k, desired) {
                problems.push(e);
            }
        }
        problems.extend(self.delete_pod(k));
        deleted();
        self.start_pod(k, started);
        problems
    }

    /// Starts pod `k` on its volume (then `started` runs: its DNS name resolves) and
    /// waits until it is ready.
    pub fn start_pod(&mut self, k: u64, started: impl FnOnce(SocketAddr)) {
        self.run_pod(k);
        started(self.pods[&k].amqp);
        self.wait_ready(k);
    }

    /// SIGKILL to pod `k`'s broker (`docker kill`: PID 1 gets no chance to sync or close
    /// anything), its log saved, the container deleted; its volume stays for
    /// [`StatefulSet::start_pod`].
    pub fn kill(&mut self, k: u64) {
        let pod = self.pods.remove(&k).expect("pod runs");
        docker(&["kill", "--signal", "KILL", &pod.container])
            .unwrap_or_else(|e| panic!("docker kill entrepot-{k}: {e}"));
        self.save_log(&pod);
        docker(&["rm", "--force", &pod.container])
            .unwrap_or_else(|e| panic!("docker rm entrepot-{k}: {e}"));
    }

    /// Freezes (`docker pause`: the cgroup freezer) or thaws pod `k`: a hung node, its
    /// sockets open and silent. Returns once every process of the pod is frozen.
    pub fn pause(&self, k: u64, paused: bool) {
        let verb = if paused { "pause" } else { "unpause" };
        docker(&[verb, &self.pods[&k].container])
            .unwrap_or_else(|e| panic!("docker {verb} entrepot-{k}: {e}"));
    }

    /// The addresses each of pods `ks` says it leads (its `/status` `led-addresses`; a
    /// pod that does not answer leads none).
    pub fn led_addresses(&self, ks: &[u64]) -> BTreeMap<u64, Vec<String>> {
        ks.iter()
            .map(|k| {
                let status = http_get(self.pods[k].http, "/status")
                    .map(|(_, body)| body)
                    .unwrap_or_default();
                (*k, led_addresses_in(&status))
            })
            .collect()
    }

    /// `docker run` of pod `k` on its own volume; records where it is reached.
    fn run_pod(&mut self, k: u64) {
        let container = format!("{}-{k}", self.prefix);
        let volume = format!("{}-data-{k}", self.prefix);
        self.volumes.insert(k);
        let network = self
            .network
            .clone()
            .expect("network exists while the set lives");
        let (hostname, alias) = (format!("entrepot-{k}"), format!("entrepot-{k}.{SERVICE}"));
        let (mount, amqp_port, http_port) = (
            format!("{volume}:/data"),
            format!("127.0.0.1::{AMQP_PORT}"),
            format!("127.0.0.1::{HTTP_PORT}"),
        );
        let (dns, size, snapshots) = (
            format!("ENTREPOT_PEERS_DNS={SERVICE}"),
            format!("ENTREPOT_CLUSTER_SIZE={INITIAL_MEMBERS}"),
            format!("ENTREPOT_RAFT_SNAPSHOT_EVERY={SNAPSHOT_EVERY}"),
        );
        #[rustfmt::skip]
        let args = [
            "run", "--detach", "--name", &container, "--hostname", &hostname,
            "--network", &network, "--network-alias", &alias, "--volume", &mount,
            "--publish", &amqp_port, "--publish", &http_port,
            "--env", &dns, "--env", &size, "--env", &snapshots, &self.image,
        ];
        let mut args = args.to_vec();
        for env in &self.extra_env {
            // Before the image, after the other options.
            args.insert(args.len() - 1, "--env");
            args.insert(args.len() - 1, env);
        }
        docker(&args).unwrap_or_else(|e| panic!("docker run {container}: {e}"));
        self.incarnations += 1;
        let inspected = docker(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &container,
        ]);
        let ip: IpAddr = match inspected.as_deref().map(str::parse) {
            Ok(Ok(ip)) => ip,
            // No bridge IP: the container is gone already (it exited at start, e.g. on a
            // full disk). Not yet a pod, so `Drop` would not remove it, and its volume
            // would stay in use: remove it here and fail with what it printed.
            other => {
                let logs = tail(&docker::logs(&container), 20);
                let _ = docker(&["rm", "--force", &container]);
                panic!("pod {container} has no bridge IP ({other:?}); it printed:\n{logs}");
            }
        };
        let reach = *self.reach.get_or_insert_with(|| reach_of(ip));
        let (amqp, http) = match reach {
            Reach::Bridge => (
                SocketAddr::new(ip, AMQP_PORT),
                SocketAddr::new(ip, HTTP_PORT),
            ),
            Reach::Published => (
                docker::published(&container, &format!("{AMQP_PORT}/tcp")),
                docker::published(&container, &format!("{HTTP_PORT}/tcp")),
            ),
        };
        self.pods.insert(
            k,
            Pod {
                container,
                amqp,
                http,
            },
        );
    }

    /// `entrepot drain --desired-replicas` inside pod `k`: Err(what went wrong).
    fn drain(&self, k: u64, desired: u64) -> Result<(), String> {
        let pod = &self.pods[&k];
        let desired = desired.to_string();
        let started = Instant::now();
        let args = [
            "exec",
            &pod.container,
            "/usr/local/bin/entrepot",
            "drain",
            "--desired-replicas",
            &desired,
        ];
        let out = docker_within(&args, DRAIN_TIMEOUT);
        eprintln!(
            "elasticity: drain of entrepot-{k} (desired {desired}) took {:.1} s: {}",
            started.elapsed().as_secs_f64(),
            match &out {
                Ok(text) => text.lines().last().unwrap_or("exit 0").to_owned(),
                Err(e) => e.clone(),
            }
        );
        out.map(|_| ())
            .map_err(|e| format!("drain of entrepot-{k} (desired {desired}) failed: {e}"))
    }

    /// `docker stop` with the grace period, the log saved, the container deleted; a
    /// problem when the broker did not exit 0 (SIGTERM must stop it cleanly).
    fn delete_pod(&mut self, k: u64) -> Vec<String> {
        let Some(pod) = self.pods.remove(&k) else {
            return Vec::new();
        };
        let mut problems = Vec::new();
        let grace = STOP_GRACE_SECS.to_string();
        let limit = Duration::from_secs(STOP_GRACE_SECS) + docker::DOCKER_TIMEOUT;
        let started = Instant::now();
        if let Err(e) = docker_within(&["stop", "--time", &grace, &pod.container], limit) {
            problems.push(format!("docker stop entrepot-{k}: {e}"));
        }
        let took = started.elapsed();
        let exit = docker(&["inspect", "-f", "{{.State.ExitCode}}", &pod.container]);
        if exit.as_deref() != Ok("0") {
            problems.push(format!(
                "entrepot-{k} exited {exit:?} after SIGTERM ({:.1} s)",
                took.as_secs_f64()
            ));
        }
        let path = self.save_log(&pod);
        eprintln!(
            "elasticity: entrepot-{k} stopped in {:.1} s (log: {})",
            took.as_secs_f64(),
            path.display()
        );
        if let Err(e) = docker(&["rm", "--force", &pod.container]) {
            problems.push(format!("docker rm entrepot-{k}: {e}"));
        }
        problems
    }

    fn save_log(&self, pod: &Pod) -> PathBuf {
        let path = self
            .logs_dir
            .join(format!("{}.{}.log", pod.container, self.incarnations));
        let _ = std::fs::write(&path, docker::logs(&pod.container));
        path
    }

    /// The log of every pod still running, saved; returns the paths.
    pub fn save_logs(&self) -> Vec<PathBuf> {
        self.pods.values().map(|p| self.save_log(p)).collect()
    }

    /// Pod `k` answers HTTP (any status).
    fn wait_http(&self, k: u64) {
        self.wait_for(k, "answers HTTP", |set| {
            http_get(set.pods[&k].http, "/healthz").is_ok()
        });
    }

    /// Pod `k`'s `/readyz` is 200.
    fn wait_ready(&self, k: u64) {
        self.wait_for(k, "is ready", |set| {
            matches!(http_get(set.pods[&k].http, "/readyz"), Ok((s, _)) if s.contains(" 200 "))
        });
    }

    /// The leader's membership has `k` as a voter (groups mode: every running pod's
    /// replica of the metadata group lists it as a member).
    fn wait_voter(&self, k: u64) {
        match self.mode {
            Mode::OneGroup => self.wait_for(k, "is a voter", |set| {
                set.leader_status().is_some_and(|s| s.voters.contains(&k))
            }),
            Mode::Groups => self.wait_for(k, "is a member on every pod", |set| {
                set.groups_statuses()
                    .values()
                    .all(|s| s.as_ref().is_some_and(|s| s.members.contains(&k)))
            }),
        }
    }

    /// Polls `done` until true; panics with the pod's log if it exits or time runs out.
    fn wait_for(&self, k: u64, what: &str, done: impl Fn(&StatefulSet) -> bool) {
        let pod = &self.pods[&k];
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if done(self) {
                return;
            }
            let running = docker(&["inspect", "-f", "{{.State.Running}}", &pod.container]);
            if running.as_deref() != Ok("true") || Instant::now() > deadline {
                let path = self.save_log(pod);
                panic!(
                    "entrepot-{k} never {what} within {READY_TIMEOUT:?} (running: {running:?}); \
                     log {}:\n{}",
                    path.display(),
                    tail(&docker::logs(&pod.container), 60)
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Every running pod's `GET /cluster` (None where it does not answer).
    pub fn statuses(&self) -> BTreeMap<u64, Option<Status>> {
        self.pods
            .iter()
            .map(|(k, pod)| {
                let status = http_get(pod.http, "/cluster")
                    .ok()
                    .filter(|(s, _)| s.contains(" 200 "))
                    .and_then(|(_, body)| Status::parse(&body));
                (*k, status)
            })
            .collect()
    }

    /// Every running pod's `groups:` section of `GET /cluster` (groups mode; None where
    /// it does not answer).
    pub fn groups_statuses(&self) -> BTreeMap<u64, Option<GroupsStatus>> {
        self.pods
            .iter()
            .map(|(k, pod)| {
                let status = http_get(pod.http, "/cluster")
                    .ok()
                    .filter(|(s, _)| s.contains(" 200 "))
                    .and_then(|(_, body)| GroupsStatus::parse(&body));
                (*k, status)
            })
            .collect()
    }

    /// The status of the node that says it leads.
    pub fn leader_status(&self) -> Option<Status> {
        self.statuses().into_values().flatten().find(|s| s.leads)
    }

    /// A membership change through the leader's admin API, retried while another change
    /// runs or the leader moves.
    fn change(&self, path: &str) {
        let deadline = Instant::now() + CHANGE_TIMEOUT;
        let mut last = String::new();
        while Instant::now() < deadline {
            let leader = self
                .statuses()
                .into_iter()
                .find(|(_, s)| s.as_ref().is_some_and(|s| s.leads));
            if let Some((id, _)) = leader {
                match http_request(self.pods[&id].http, "POST", path) {
                    Ok((status, _)) if status.contains(" 200 ") => return,
                    Ok((status, body)) => last = format!("{status}: {}", body.trim()),
                    Err(e) => last = e,
                }
            }
            std::thread::sleep(POLL * 2);
        }
        panic!("POST {path} did not succeed within {CHANGE_TIMEOUT:?}: {last}");
    }
}

impl Drop for StatefulSet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let paths = self.save_logs();
            eprintln!("elasticity: container logs saved: {paths:?}");
        }
        for pod in self.pods.values() {
            if let Err(e) = docker(&["rm", "--force", &pod.container]) {
                eprintln!("cleanup: docker rm {}: {e}", pod.container);
            }
        }
        for k in &self.volumes {
            let volume = format!("{}-data-{k}", self.prefix);
            if let Err(e) = docker(&["volume", "rm", &volume]) {
                eprintln!("cleanup: docker volume rm {volume}: {e}");
            }
        }
        if let Some(network) = self.network.take() {
            if let Err(e) = docker(&["network", "rm", &network]) {
                eprintln!("cleanup: docker network rm {network}: {e}");
            }
        }
    }
}

/// Bridge when the host routes to the container's IP (a refused connection is an
/// answer), else published ports.
fn reach_of(ip: IpAddr) -> Reach {
    let probe = SocketAddr::new(ip, HTTP_PORT);
    match TcpStream::connect_timeout(&probe, Duration::from_secs(1)) {
        Ok(_) => Reach::Bridge,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Reach::Bridge,
        Err(e) => {
            eprintln!("elasticity: {probe} unreachable from the host ({e}): published ports");
            Reach::Published
        }
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
