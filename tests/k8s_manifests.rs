//! The Kubernetes manifests in `examples/kubernetes/` agree with the binary they deploy.
//!
//! Goal: issue 13, point 4 — a manifest that names a flag the binary lacks, an
//! `ENTREPOT_*` variable it does not read, a port it does not listen on or a probe path it
//! does not serve fails here, not on a cluster. No API server runs here, so the manifests
//! are read the way one would: every YAML document as its `k8s-openapi` type (Kubernetes
//! 1.33), and a document whose re-serialized form lost a field (a misspelt key, which the
//! API server would drop or refuse) fails.
//!
//! Method: the facts about the binary come from the binary itself — the flags and the
//! variables from `entrepot serve --help` (clap prints `[env: ENTREPOT_…=]` after each
//! flag), its subcommands from `entrepot --help`, the probe paths from a real
//! `entrepot serve` on loopback answering them, the pod identity from
//! `entrepot_cluster::identity` (what `serve` runs on the pod's hostname), the shutdown
//! grace from `entrepot::server::SHUTDOWN_GRACE` and the drain's bound from
//! `entrepot::raft::drain::DRAIN_TIMEOUT`, the preStop flags from `entrepot drain --help`,
//! the user and the entrypoint from the
//! image's `Dockerfile`. Each test checks one agreement.

#[path = "broker/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, Probe, SecurityContext, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize as _;

/// The manifests, relative to the crate root.
const MANIFEST_DIR: &str = "examples/kubernetes";
/// The image the manifests run (its `USER` and `ENTRYPOINT`).
const DOCKERFILE: &str = "Dockerfile";
/// The broker's container in the pod template.
const CONTAINER: &str = "entrepot";
/// Container port name → the `serve` flag whose listen address opens it.
const PORT_FLAGS: &[(&str, &str)] = &[
    ("amqp", "--listen"),
    ("amqps", "--listen-tls"),
    ("cluster", "--cluster-listen"),
    ("http", "--http"),
];
/// Files the pod must get from a Secret, mounted read-only: AMQP TLS, inter-node TLS and
/// the cluster secret.
const SECRET_FILE_FLAGS: &[&str] = &[
    "--tls-cert",
    "--tls-key",
    "--cluster-tls-cert",
    "--cluster-tls-key",
    "--cluster-tls-ca",
    "--cluster-secret-file",
];
/// The probe paths issue 13 asks for: readiness and liveness.
const READINESS_PATH: &str = "/readyz";
const LIVENESS_PATH: &str = "/healthz";
/// A namespace to expand `$(POD_NAMESPACE)` with when checking the pods' identities.
const SAMPLE_NAMESPACE: &str = "messaging";
/// The subcommand a preStop hook would drain a leaving node with (issue 13.2).
const DRAIN_SUBCOMMAND: &str = "drain";

// ---------------------------------------------------------------------------------------
// The manifests.

/// Every document of the manifest directory, typed.
struct Manifests {
    stateful_set: StatefulSet,
    services: Vec<Service>,
    disruption_budget: PodDisruptionBudget,
    config_maps: Vec<ConfigMap>,
}

fn manifest_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(MANIFEST_DIR);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    files
}

/// Each document of `path` as `(kind, untyped value)`, empty documents left out.
fn documents(path: &Path) -> Vec<(String, serde_yaml::Value)> {
    let text = std::fs::read_to_string(path).expect("read manifest");
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let value = serde_yaml::Value::deserialize(doc)
            .unwrap_or_else(|e| panic!("{} document {i}: not YAML: {e}", path.display()));
        if value.is_null() {
            continue;
        }
        let kind = value["kind"].as_str().unwrap_or_default().to_owned();
        out.push((kind, value));
    }
    out
}

/// `value` as a `T`, which must serialize back to the same YAML: a key the type does not
/// know (a typo, a field of a newer Kubernetes) is silently dropped by the deserializer,
/// so a difference names the manifest's mistake.
fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(
    value: serde_yaml::Value,
    origin: &str,
) -> T {
    let typed: T = serde_yaml::from_value(value.clone())
        .unwrap_or_else(|e| panic!("{origin}: not a valid Kubernetes object: {e}"));
    let back = serde_yaml::to_value(&typed).expect("serialize back");
    if let Some(path) = first_difference(&value, &back, String::new()) {
        panic!("{origin}: `{path}` is not a field of the Kubernetes type (dropped on reading)");
    }
    typed
}

/// The first path at which `written` has something `read_back` lacks or differs on.
fn first_difference(
    written: &serde_yaml::Value,
    read_back: &serde_yaml::Value,
    at: String,
) -> Option<String> {
    use serde_yaml::Value;
    match (written, read_back) {
        (Value::Mapping(w), Value::Mapping(r)) => w.iter().find_map(|(k, v)| {
            let key = k.as_str().unwrap_or("?");
            let here = format!("{at}.{key}");
            match r.get(k) {
                Some(rv) => first_difference(v, rv, here),
                None => Some(here),
            }
        }),
        (Value::Sequence(w), Value::Sequence(r)) if w.len() == r.len() => w
            .iter()
            .zip(r)
            .enumerate()
            .find_map(|(i, (wv, rv))| first_difference(wv, rv, format!("{at}[{i}]"))),
        (w, r) if w == r => None,
        // A number written as a number reads back as the same number in any width.
        (Value::Number(w), Value::Number(r)) if w.as_f64() == r.as_f64() => None,
        _ => Some(at),
    }
}

fn manifests() -> Manifests {
    let mut stateful_sets = Vec::new();
    let mut services = Vec::new();
    let mut budgets = Vec::new();
    let mut config_maps = Vec::new();
    for path in manifest_files() {
        for (i, (kind, value)) in documents(&path).into_iter().enumerate() {
            let origin = format!("{} document {i} ({kind})", path.display());
            match kind.as_str() {
                "StatefulSet" => stateful_sets.push(typed::<StatefulSet>(value, &origin)),
                "Service" => services.push(typed::<Service>(value, &origin)),
                "PodDisruptionBudget" => budgets.push(typed::<PodDisruptionBudget>(value, &origin)),
                "ConfigMap" => config_maps.push(typed::<ConfigMap>(value, &origin)),
                other => panic!("{origin}: kind {other:?} is not checked by this test"),
            }
        }
    }
    assert_eq!(stateful_sets.len(), 1, "one StatefulSet");
    assert_eq!(budgets.len(), 1, "one PodDisruptionBudget");
    Manifests {
        stateful_set: stateful_sets.remove(0),
        services,
        disruption_budget: budgets.remove(0),
        config_maps,
    }
}

impl Manifests {
    fn name(&self) -> &str {
        self.stateful_set.metadata.name.as_deref().expect("name")
    }

    fn spec(&self) -> &k8s_openapi::api::apps::v1::StatefulSetSpec {
        self.stateful_set.spec.as_ref().expect("StatefulSet spec")
    }

    fn pod(&self) -> &PodSpec {
        self.spec()
            .template
            .spec
            .as_ref()
            .expect("pod template spec")
    }

    fn pod_labels(&self) -> &BTreeMap<String, String> {
        let meta = self
            .spec()
            .template
            .metadata
            .as_ref()
            .expect("template metadata");
        meta.labels.as_ref().expect("pod labels")
    }

    fn container(&self) -> &Container {
        let pod = self.pod();
        assert_eq!(pod.containers.len(), 1, "one container");
        assert!(pod.init_containers.is_none(), "no init containers");
        let container = &pod.containers[0];
        assert_eq!(container.name, CONTAINER);
        container
    }

    fn container_port(&self, name: &str) -> Option<i32> {
        let ports = self.container().ports.as_deref().unwrap_or_default();
        ports
            .iter()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port)
    }

    fn headless(&self) -> &Service {
        let name = self.spec().service_name.as_deref().expect("serviceName");
        self.services
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("serviceName {name:?} names none of the Services"))
    }

    fn replicas(&self) -> i32 {
        self.spec().replicas.expect("replicas")
    }

    /// A `serve` setting as the container gives it: its flag in the args (`--flag=value`
    /// or `--flag value`), else its variable in the env; `$(VAR)` left unexpanded.
    fn setting(&self, binary: &Binary, flag: &str) -> Option<String> {
        let container = self.container();
        let args = container.args.as_deref().unwrap_or_default();
        for (i, arg) in args.iter().enumerate() {
            if let Some(value) = arg.strip_prefix(&format!("{flag}=")) {
                return Some(value.to_owned());
            }
            if arg == flag {
                return args.get(i + 1).cloned();
            }
        }
        let env_name = binary.flags.get(flag)?.as_deref()?;
        let env = container.env.as_deref().unwrap_or_default();
        env.iter()
            .find(|e| e.name == env_name)
            .and_then(|e| e.value.clone())
    }

    /// The port of a listen-address setting.
    fn listen_port(&self, binary: &Binary, flag: &str) -> u16 {
        let value = self.setting(binary, flag).unwrap_or_else(|| {
            panic!("{flag} is not set: the manifest must name the port it exposes")
        });
        let addr: SocketAddr = value
            .parse()
            .unwrap_or_else(|e| panic!("{flag}={value}: not an address: {e}"));
        addr.port()
    }
}

fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    assert!(
        selector.match_expressions.is_none(),
        "matchLabels only: what this test can evaluate"
    );
    let wanted = selector.match_labels.as_ref().expect("matchLabels");
    !wanted.is_empty() && wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The effective value of a container security setting: the container's, else the pod's.
fn effective<T: Clone>(
    container: Option<&SecurityContext>,
    pod: Option<T>,
    get: impl Fn(&SecurityContext) -> Option<T>,
) -> Option<T> {
    container.and_then(get).or(pod)
}

// ---------------------------------------------------------------------------------------
// The binary and its image.

/// What `entrepot serve --help` and `entrepot --help` say the binary accepts.
struct Binary {
    /// Every `serve` flag (`--listen`), with its variable when it has one.
    flags: BTreeMap<String, Option<String>>,
    /// The help text of each flag.
    help: BTreeMap<String, String>,
    /// Every `ENTREPOT_*` variable `serve` reads.
    env: BTreeSet<String>,
    /// The subcommands of `entrepot`.
    subcommands: BTreeSet<String>,
}

fn run_help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_entrepot"))
        .args(args)
        .output()
        .expect("run entrepot");
    assert!(out.status.success(), "entrepot {args:?} failed: {out:?}");
    String::from_utf8(out.stdout).expect("UTF-8 help")
}

fn binary() -> Binary {
    let serve = run_help(&["serve", "--help"]);
    let mut flags = BTreeMap::new();
    let mut help = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in serve.lines() {
        let trimmed = line.trim_start();
        let long = trimmed
            .split([' ', ','])
            .find(|w| w.starts_with("--") && w.len() > 2);
        if trimmed.starts_with('-') && long.is_some() {
            let flag = long.unwrap_or_default().to_owned();
            flags.insert(flag.clone(), None);
            help.insert(flag.clone(), String::new());
            current = Some(flag);
            continue;
        }
        let Some(flag) = &current else { continue };
        help.entry(flag.clone()).or_default().push_str(trimmed);
        if let Some(start) = trimmed.find("[env: ") {
            let rest = &trimmed[start + "[env: ".len()..];
            let name = rest.split(['=', ']']).next().unwrap_or_default();
            flags.insert(flag.clone(), Some(name.to_owned()));
        }
    }
    let env: BTreeSet<String> = flags.values().flatten().cloned().collect();
    assert!(
        flags.contains_key("--listen") && env.contains("ENTREPOT_LISTEN"),
        "`entrepot serve --help` not understood:\n{serve}"
    );
    let top = run_help(&["--help"]);
    let subcommands = top
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    Binary {
        flags,
        help,
        env,
        subcommands,
    }
}

/// The words of the image's `instruction` line (`USER`, `ENTRYPOINT`).
fn dockerfile(instruction: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DOCKERFILE);
    let text = std::fs::read_to_string(&path).expect("read Dockerfile");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{instruction} ")))
        .unwrap_or_else(|| panic!("no {instruction} in the Dockerfile"))
        .trim()
        .to_owned()
}

// ---------------------------------------------------------------------------------------
// The checks.

#[test]
fn every_document_is_a_kubernetes_object_with_no_unknown_field() {
    let m = manifests();
    assert!(
        m.services.len() >= 2,
        "a headless and a client Service ({} found)",
        m.services.len()
    );
    let client = m
        .services
        .iter()
        .filter(|s| s.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) != Some("None"))
        .count();
    assert!(client >= 1, "a client Service (with a cluster IP)");
}

#[test]
fn the_container_runs_the_images_binary_with_serve_flags_only() {
    let (m, binary) = (manifests(), binary());
    let container = m.container();
    let entrypoint: Vec<String> =
        serde_yaml::from_str(&dockerfile("ENTRYPOINT")).expect("ENTRYPOINT as a JSON array");
    assert_eq!(
        container.command.as_ref(),
        Some(&entrypoint),
        "command is the image's ENTRYPOINT (`entrepot serve`)"
    );
    let args = container.args.as_deref().unwrap_or_default();
    assert!(
        !args.is_empty(),
        "the listeners and files are given as args"
    );
    let mut expect_value = false;
    for arg in args {
        if !arg.starts_with("--") {
            assert!(expect_value, "{arg:?} is neither a flag nor a flag's value");
            expect_value = false;
            continue;
        }
        let (flag, value) = match arg.split_once('=') {
            Some((flag, _)) => (flag, true),
            None => (arg.as_str(), false),
        };
        assert!(
            binary.flags.contains_key(flag),
            "{flag} is not a flag of `entrepot serve` (see `entrepot serve --help`)"
        );
        expect_value = !value;
    }
}

#[test]
fn every_environment_variable_is_read_by_the_binary_or_used_by_another() {
    let (m, binary) = (manifests(), binary());
    let container = m.container();
    let env = container.env.as_deref().unwrap_or_default();
    assert!(
        !env.is_empty(),
        "the cluster's identity is given as variables"
    );
    let args = container.args.as_deref().unwrap_or_default();
    for var in env {
        if var.name.starts_with("ENTREPOT_") {
            assert!(
                binary.env.contains(&var.name),
                "{} is not read by `entrepot serve` (its variables: {:?})",
                var.name,
                binary.env
            );
            // One place per setting: a flag in the args silently wins over its variable.
            let flag = binary
                .flags
                .iter()
                .find(|(_, e)| e.as_deref() == Some(var.name.as_str()))
                .map(|(f, _)| f.clone())
                .unwrap_or_default();
            assert!(
                !args
                    .iter()
                    .any(|a| a == &flag || a.starts_with(&format!("{flag}="))),
                "{} and {flag} are both given",
                var.name
            );
        } else {
            // Only there for Kubernetes' `$(VAR)` expansion in another value.
            let reference = format!("$({})", var.name);
            let values = env.iter().filter_map(|e| e.value.as_deref());
            let used = values
                .chain(args.iter().map(String::as_str))
                .any(|v| v.contains(&reference));
            assert!(
                used,
                "{} is neither read by the binary nor used by another variable or arg",
                var.name
            );
        }
    }
}

/// The values `serve --help` lists for `flag` (clap's `Possible values:` list, `- NAME:`
/// per value, or its one-line `[possible values: a, b]`); empty when it lists none.
fn possible_values(binary: &Binary, flag: &str) -> Vec<String> {
    let help = binary
        .help
        .get(flag)
        .map(String::as_str)
        .unwrap_or_default();
    if let Some(list) = help.split("[possible values: ").nth(1) {
        let list = list.split(']').next().unwrap_or_default();
        return list.split(", ").map(str::to_owned).collect();
    }
    let Some(listed) = help.split("Possible values:").nth(1) else {
        return Vec::new();
    };
    listed
        .split("- ")
        .skip(1)
        .filter_map(|item| {
            let (name, _) = item.split_once(':')?;
            let ok =
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
            ok.then(|| name.to_owned())
        })
        .collect()
}

#[test]
fn enumerated_settings_have_values_the_binary_accepts() {
    let (m, binary) = (manifests(), binary());
    assert_eq!(
        possible_values(&binary, "--cluster-mode"),
        ["one-group", "groups"],
        "`serve --help` lists the cluster modes"
    );
    let env = m.container().env.as_deref().unwrap_or_default();
    let mut checked = 0;
    for var in env {
        let Some(value) = var.value.as_deref() else {
            continue;
        };
        let flag = binary
            .flags
            .iter()
            .find(|(_, e)| e.as_deref() == Some(var.name.as_str()))
            .map(|(f, _)| f.as_str());
        let Some(flag) = flag else { continue };
        let values = possible_values(&binary, flag);
        if values.is_empty() {
            continue;
        }
        assert!(
            values.iter().any(|v| v == value),
            "{}={value}: `entrepot serve {flag}` accepts only {values:?}",
            var.name
        );
        checked += 1;
    }
    assert!(
        env.iter().any(|v| v.name == "ENTREPOT_CLUSTER_MODE") && checked > 0,
        "the StatefulSet says which cluster mode its pods run"
    );
}

#[test]
fn container_ports_are_the_ports_the_binary_listens_on() {
    let (m, binary) = (manifests(), binary());
    let ports = m.container().ports.as_deref().unwrap_or_default();
    for port in ports {
        let name = port.name.as_deref().expect("every container port is named");
        let flag = PORT_FLAGS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, f)| *f)
            .unwrap_or_else(|| panic!("container port {name:?} is opened by no listener"));
        assert_eq!(
            i32::from(m.listen_port(&binary, flag)),
            port.container_port,
            "container port {name} is not where {flag} listens"
        );
    }
    for (name, flag) in PORT_FLAGS {
        assert!(
            m.container_port(name).is_some(),
            "{flag} opens a port with no container port {name:?}"
        );
    }
}

#[test]
fn the_services_select_the_pods_and_target_their_ports() {
    let m = manifests();
    let labels = m.pod_labels();
    for service in &m.services {
        let name = service.metadata.name.as_deref().unwrap_or_default();
        let spec = service.spec.as_ref().expect("Service spec");
        let selector = spec.selector.as_ref().expect("Service selector");
        assert!(
            !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
            "Service {name} selects none of the StatefulSet's pods"
        );
        for port in spec.ports.as_deref().unwrap_or_default() {
            let target = match port.target_port.as_ref() {
                Some(IntOrString::String(named)) => m.container_port(named),
                Some(IntOrString::Int(n)) => Some(*n),
                None => Some(port.port),
            };
            assert_eq!(
                target,
                Some(port.port),
                "Service {name} port {:?} does not reach a container port of the same number",
                port.name
            );
        }
    }
}

#[test]
fn the_headless_service_is_the_statefulsets_and_publishes_unready_pods() {
    let m = manifests();
    let spec = m.headless().spec.as_ref().expect("Service spec");
    assert_eq!(
        spec.cluster_ip.as_deref(),
        Some("None"),
        "serviceName is headless"
    );
    assert_eq!(
        spec.publish_not_ready_addresses,
        Some(true),
        "peers must resolve each other before any is ready (ready = knows a leader)"
    );
    assert_eq!(
        m.spec().pod_management_policy.as_deref(),
        Some("Parallel"),
        "OrderedReady never starts a majority: entrepot-1 would wait for entrepot-0's leader"
    );
}

#[test]
fn each_pod_knows_its_node_id_and_peers_from_its_name_and_the_headless_service() {
    use entrepot_cluster::identity;
    let (m, binary) = (manifests(), binary());
    assert!(
        m.setting(&binary, "--node-id").is_none() && m.setting(&binary, "--peers").is_none(),
        "a fixed --node-id or --peers would be the same on every pod"
    );
    let node_id_help = binary.help.get("--node-id").cloned().unwrap_or_default();
    assert!(
        node_id_help.contains("ordinal of the hostname"),
        "`serve --node-id` no longer defaults to the hostname's ordinal: {node_id_help:?}"
    );
    let size: u32 = m
        .setting(&binary, "--cluster-size")
        .expect("--cluster-size / ENTREPOT_CLUSTER_SIZE")
        .parse()
        .expect("a number");
    assert_eq!(
        i64::from(size),
        i64::from(m.replicas()),
        "the initial membership is the replicas"
    );
    let dns = m
        .setting(&binary, "--peers-dns")
        .expect("--peers-dns / ENTREPOT_PEERS_DNS")
        .replace("$(POD_NAMESPACE)", SAMPLE_NAMESPACE);
    let service = m.headless().metadata.name.clone().unwrap_or_default();
    assert!(
        dns.starts_with(&format!("{service}.{SAMPLE_NAMESPACE}.")),
        "--peers-dns {dns} is not the headless Service {service} in the pod's namespace"
    );
    let cluster_port = m.listen_port(&binary, "--cluster-listen");
    let amqp_port = m.listen_port(&binary, "--listen");
    let amqps_port = m.listen_port(&binary, "--listen-tls");
    for ordinal in 0..size {
        let hostname = format!("{}-{ordinal}", m.name());
        let id = identity::resolve_node_id(None, &hostname).expect("node id from hostname");
        assert_eq!(id, u64::from(ordinal), "{hostname}'s node id");
        let peers = identity::statefulset_peers(
            &hostname,
            &dns,
            size,
            cluster_port,
            amqp_port,
            Some(amqps_port),
        )
        .expect("peers from DNS");
        for (i, peer) in peers.iter().enumerate() {
            let pod = format!("{}-{i}.{dns}", m.name());
            assert_eq!(peer.id, i as u64);
            assert_eq!(
                peer.addr,
                format!("{pod}:{cluster_port}/{amqp_port}/{amqps_port}"),
                "{hostname}'s peer {i}"
            );
        }
    }
}

#[test]
fn the_probes_ask_for_paths_the_binary_serves() {
    let m = manifests();
    let container = m.container();
    let probes: [(&str, Option<&Probe>, Option<&str>); 3] = [
        ("startupProbe", container.startup_probe.as_ref(), None),
        (
            "readinessProbe",
            container.readiness_probe.as_ref(),
            Some(READINESS_PATH),
        ),
        (
            "livenessProbe",
            container.liveness_probe.as_ref(),
            Some(LIVENESS_PATH),
        ),
    ];
    let dir = tempfile::tempdir().expect("temp dir");
    let broker = harness::BrokerProcess::start(dir.path(), &[]);
    let (missing, _) = broker.http_get("/no-such-probe");
    assert!(
        missing.contains(" 404 "),
        "an unknown path is refused: {missing}"
    );
    for (kind, probe, wanted) in probes {
        let probe = probe.unwrap_or_else(|| panic!("{kind} is missing"));
        let get = probe
            .http_get
            .as_ref()
            .unwrap_or_else(|| panic!("{kind} is an HTTP GET (the image has no shell)"));
        let path = get.path.as_deref().expect("probe path");
        if let Some(wanted) = wanted {
            assert_eq!(path, wanted, "{kind}");
        }
        assert_eq!(
            get.port,
            IntOrString::String("http".into()),
            "{kind} asks the http port, where --http listens"
        );
        let (status, body) = broker.http_get(path);
        assert!(
            status.contains(" 200 "),
            "{kind} path {path}: the broker answers {status} {body}"
        );
    }
}

#[test]
fn the_disruption_budget_lets_one_pod_of_this_statefulset_go() {
    let m = manifests();
    let spec = m.disruption_budget.spec.as_ref().expect("PDB spec");
    assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
    assert!(spec.min_available.is_none(), "maxUnavailable alone");
    let selector = spec.selector.as_ref().expect("PDB selector");
    assert!(
        selects(selector, m.pod_labels()),
        "the PDB selects none of the pods"
    );
    assert_eq!(
        Some(selector),
        Some(&m.spec().selector),
        "the PDB selects exactly the StatefulSet's pods"
    );
}

#[test]
fn the_pod_runs_locked_down_as_the_images_user() {
    let m = manifests();
    let pod = m.pod();
    let sc = m.container().security_context.as_ref();
    let psc = pod.security_context.as_ref();
    let user = dockerfile("USER");
    let uid: i64 = user
        .split(':')
        .next()
        .unwrap_or_default()
        .parse()
        .expect("USER uid");
    let run_as_user = effective(sc, psc.and_then(|p| p.run_as_user), |c| c.run_as_user);
    assert_eq!(
        run_as_user,
        Some(uid),
        "runAsUser is the image's USER {user}"
    );
    let non_root = effective(sc, psc.and_then(|p| p.run_as_non_root), |c| {
        c.run_as_non_root
    });
    assert_eq!(non_root, Some(true), "runAsNonRoot");
    let seccomp = effective(sc, psc.and_then(|p| p.seccomp_profile.clone()), |c| {
        c.seccomp_profile.clone()
    });
    assert_eq!(
        seccomp.map(|s| s.type_),
        Some("RuntimeDefault".to_owned()),
        "seccomp"
    );
    let sc = sc.expect("container securityContext");
    assert_eq!(
        sc.read_only_root_filesystem,
        Some(true),
        "readOnlyRootFilesystem"
    );
    assert_eq!(
        sc.allow_privilege_escalation,
        Some(false),
        "allowPrivilegeEscalation"
    );
    let dropped = sc.capabilities.as_ref().and_then(|c| c.drop.clone());
    assert_eq!(
        dropped,
        Some(vec!["ALL".to_owned()]),
        "capabilities drop ALL"
    );
    let added = sc.capabilities.as_ref().and_then(|c| c.add.clone());
    assert!(added.is_none(), "no capability added");
    assert_eq!(
        pod.automount_service_account_token,
        Some(false),
        "no API token"
    );
    assert_eq!(
        pod.enable_service_links,
        Some(false),
        "service links inject ENTREPOT_* look-alikes"
    );
}

#[test]
fn tls_and_the_cluster_secret_come_read_only_from_secrets() {
    let (m, binary) = (manifests(), binary());
    let container = m.container();
    let mounts = container.volume_mounts.as_deref().unwrap_or_default();
    let volumes = m.pod().volumes.as_deref().unwrap_or_default();
    for flag in SECRET_FILE_FLAGS {
        let file = m
            .setting(&binary, flag)
            .unwrap_or_else(|| panic!("{flag} is not set"));
        let file = Path::new(&file);
        let dir = file
            .parent()
            .expect("a directory")
            .to_str()
            .unwrap_or_default();
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let mount = mounts
            .iter()
            .find(|v| v.mount_path == dir)
            .unwrap_or_else(|| panic!("{flag}: nothing is mounted at {dir}"));
        assert_eq!(
            mount.read_only,
            Some(true),
            "{flag}: {dir} is mounted read-only"
        );
        let volume = volumes
            .iter()
            .find(|v| v.name == mount.name)
            .unwrap_or_else(|| panic!("{flag}: no volume {}", mount.name));
        let secret = volume
            .secret
            .as_ref()
            .unwrap_or_else(|| panic!("{flag}: volume {} is a Secret", mount.name));
        let items = secret.items.as_deref().expect("items name every key used");
        assert!(
            items.iter().any(|i| i.path == name),
            "{flag}: the Secret volume {} has no item {name}",
            mount.name
        );
    }
}

#[test]
fn the_data_dir_is_a_claimed_volume() {
    let (m, binary) = (manifests(), binary());
    let data_dir = m.setting(&binary, "--data-dir").expect("--data-dir is set");
    let mounts = m.container().volume_mounts.as_deref().unwrap_or_default();
    let mount = mounts
        .iter()
        .find(|v| v.mount_path == data_dir)
        .unwrap_or_else(|| panic!("nothing is mounted at --data-dir {data_dir}"));
    assert_ne!(mount.read_only, Some(true), "the data volume is writable");
    let claims = m
        .spec()
        .volume_claim_templates
        .as_deref()
        .unwrap_or_default();
    let claim = claims
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some(mount.name.as_str()))
        .unwrap_or_else(|| panic!("{data_dir} is not a volumeClaimTemplate"));
    let spec = claim.spec.as_ref().expect("claim spec");
    assert_eq!(spec.access_modes, Some(vec!["ReadWriteOnce".to_owned()]));
    let requests = spec.resources.as_ref().and_then(|r| r.requests.as_ref());
    assert!(
        requests.is_some_and(|r| r.contains_key("storage")),
        "a storage size"
    );
}

#[test]
fn the_pods_are_sized_and_spread_over_nodes() {
    let m = manifests();
    let resources = m.container().resources.as_ref().expect("resources");
    let requests = resources.requests.as_ref().expect("requests");
    assert!(requests.contains_key("cpu") && requests.contains_key("memory"));
    let limits = resources.limits.as_ref().expect("limits");
    assert!(limits.contains_key("memory"), "a memory limit");
    let pod = m.pod();
    let anti_affinity = pod
        .affinity
        .as_ref()
        .and_then(|a| a.pod_anti_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .into_iter()
        .flatten()
        .filter_map(|t| t.label_selector.as_ref());
    let spread = pod
        .topology_spread_constraints
        .iter()
        .flatten()
        .filter_map(|t| t.label_selector.as_ref());
    let selectors: Vec<&LabelSelector> = anti_affinity.chain(spread).collect();
    assert!(!selectors.is_empty(), "anti-affinity or topology spread");
    for selector in selectors {
        assert!(
            selects(selector, m.pod_labels()),
            "a spreading rule that selects none of the pods spreads nothing"
        );
    }
}

#[test]
fn the_pod_may_take_its_shutdown_and_stops_only_with_a_real_drain() {
    let (m, binary) = (manifests(), binary());
    let grace = m
        .pod()
        .termination_grace_period_seconds
        .expect("grace period");
    let shutdown = entrepot::server::SHUTDOWN_GRACE.as_secs();
    assert!(
        u64::try_from(grace).unwrap_or(0) > shutdown,
        "terminationGracePeriodSeconds {grace} does not cover the broker's {shutdown} s \
         connection grace and final sync"
    );
    let pre_stop = m
        .container()
        .lifecycle
        .as_ref()
        .and_then(|l| l.pre_stop.as_ref());
    let has_drain = binary.subcommands.contains(DRAIN_SUBCOMMAND);
    match pre_stop {
        None => assert!(
            !has_drain,
            "`entrepot {DRAIN_SUBCOMMAND}` exists now: run it in a preStop hook (issue 13.2)"
        ),
        Some(hook) => {
            let command = hook
                .exec
                .as_ref()
                .and_then(|e| e.command.as_deref())
                .expect("preStop runs a command (the image has no shell)");
            let binary_path = &m.container().command.as_deref().unwrap_or_default()[0];
            assert_eq!(&command[0], binary_path, "preStop runs the broker's binary");
            assert_eq!(
                command.get(1).map(String::as_str),
                Some(DRAIN_SUBCOMMAND),
                "preStop {command:?} is not the drain"
            );
            assert!(
                has_drain,
                "preStop runs `entrepot {DRAIN_SUBCOMMAND}`, which the binary does not have \
                 (its subcommands: {:?})",
                binary.subcommands
            );
            check_drain_hook(&m, &command[2..]);
            // The grace period counts the preStop hook: the drain, then the shutdown.
            let drain = entrepot::raft::drain::DRAIN_TIMEOUT.as_secs();
            assert!(
                u64::try_from(grace).unwrap_or(0) > drain + shutdown,
                "terminationGracePeriodSeconds {grace} does not cover the drain's {drain} s \
                 (DRAIN_TIMEOUT) and the {shutdown} s shutdown after it"
            );
        }
    }
}

/// The preStop drain's flags are flags of `entrepot drain`, and the desired replica count
/// it reads is a key of a ConfigMap, mounted read-only, equal to the StatefulSet's replicas
/// (the operator changes both together, the ConfigMap first).
fn check_drain_hook(m: &Manifests, args: &[String]) {
    let help = run_help(&[DRAIN_SUBCOMMAND, "--help"]);
    let flags: BTreeSet<&str> = help
        .lines()
        .filter_map(|l| {
            l.trim_start()
                .split([' ', ','])
                .find(|w| w.starts_with("--"))
        })
        .collect();
    let mut file = None;
    for arg in args {
        let (flag, value) = arg.split_once('=').unwrap_or((arg.as_str(), ""));
        assert!(
            flags.contains(flag),
            "preStop flag {flag} is not a flag of `entrepot drain` ({flags:?})"
        );
        if flag == "--desired-replicas-file" {
            file = Some(Path::new(value).to_owned());
        }
    }
    let file = file.expect("the preStop drain reads the desired replicas from a file");
    // Without --http the drain asks 127.0.0.1 at its default port: where serve listens.
    if !args.iter().any(|a| a.starts_with("--http")) {
        let default = help
            .split("[default: ")
            .find_map(|rest| rest.split(']').next()?.parse::<SocketAddr>().ok())
            .expect("`entrepot drain --help` shows the default --http address");
        let binary = binary();
        assert_eq!(
            m.listen_port(&binary, "--http"),
            default.port(),
            "the preStop drain asks {default}, serve's --http listens elsewhere"
        );
    }
    let (dir, name) = (
        file.parent().and_then(|d| d.to_str()).unwrap_or_default(),
        file.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default(),
    );
    let mounts = m.container().volume_mounts.as_deref().unwrap_or_default();
    let mount = mounts
        .iter()
        .find(|v| v.mount_path == dir)
        .unwrap_or_else(|| panic!("nothing is mounted at {dir}"));
    assert_eq!(mount.read_only, Some(true), "{dir} is mounted read-only");
    let volumes = m.pod().volumes.as_deref().unwrap_or_default();
    let source = volumes
        .iter()
        .find(|v| v.name == mount.name)
        .and_then(|v| v.config_map.as_ref())
        .unwrap_or_else(|| panic!("volume {} is a ConfigMap", mount.name));
    let item = source
        .items
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|i| i.path == name)
        .unwrap_or_else(|| panic!("the ConfigMap volume has no item {name}"));
    let config_map = m
        .config_maps
        .iter()
        .find(|c| c.metadata.name == Some(source.name.clone()))
        .unwrap_or_else(|| panic!("no ConfigMap {} among the manifests", source.name));
    let value = config_map
        .data
        .as_ref()
        .and_then(|d| d.get(&item.key))
        .unwrap_or_else(|| panic!("ConfigMap {} has no key {}", source.name, item.key));
    assert_eq!(
        value.trim().parse::<i32>().ok(),
        Some(m.replicas()),
        "the desired replicas in ConfigMap {} ({value}) are not the StatefulSet's replicas",
        source.name
    );
}
