//! A network partition of a real 3-node cluster: the leader is cut off (a minority of one),
//! the majority elects a new leader and keeps accepting, a producer on the cut-off node gets
//! nothing accepted; after healing, all nodes converge and no accepted message is lost.
//!
//! Method: network namespaces made by the test (root required). Each node runs in its own
//! namespace (`ip netns exec`) with two links:
//! * `cluster`, a veth into a *switch* namespace holding the bridge: Raft traffic and the
//!   followers' forwarding to the leader. The bridge lives in its own namespace, not the
//!   root one, because a host running Docker drops bridged frames there (br_netfilter
//!   sends them through the FORWARD chain, policy DROP);
//! * `client`, a veth straight to the root namespace, over which the test speaks AMQP and
//!   HTTP to that node.
//!
//! Cutting a node sets its `cluster` port on the bridge down: it can no longer reach its
//! peers, while the test still reaches it through `client` — so "the minority stops" is
//! observed by a producer actually talking to it. Names and the 10.x.y.0/24 subnet derive
//! from the process id, so parallel runs don't collide; `Drop` removes everything, on
//! panic too.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::cluster::runtime;
use crate::cluster_support::{assert_none_lost, drain, Cluster, Layout, Load, LoadConfig};

const NODES: u64 = 3;
const START_TIMEOUT: Duration = Duration::from_secs(20);
const PHASE_TIMEOUT: Duration = Duration::from_secs(40);
/// How long the producer on the cut-off node tries.
const MINORITY_TRY: Duration = Duration::from_secs(2);
/// Sequence numbers of the producer on the cut-off node (apart from the majority's).
const MINORITY_SEQS: std::ops::Range<u64> = 1_000_000..1_000_200;
const AMQP_PORT: u16 = 5672;
const HTTP_PORT: u16 = 8080;
const PEER_PORT: u16 = 5673;

/// Namespaces, bridge and links of one test run.
struct Netns {
    tag: String,
    /// Second and third octet of this run's 10.x.y.0/24.
    subnet: (u8, u8),
    created: Vec<String>,
}

impl Netns {
    fn create(nodes: u64) -> Netns {
        let pid = std::process::id();
        let mut net = Netns {
            tag: format!("ep{pid}"),
            subnet: ((pid >> 8) as u8, pid as u8),
            created: Vec::new(),
        };
        let sw = net.switch();
        net.add_namespace(&sw);
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &sw, "link", "set", "br0", "up"]);
        for i in 0..nodes {
            net.add_node(i);
        }
        net
    }

    fn switch(&self) -> String {
        format!("{}-sw", self.tag)
    }

    fn node_ns(&self, i: u64) -> String {
        format!("{}-n{i}", self.tag)
    }

    fn add_namespace(&mut self, name: &str) {
        ip(&["netns", "add", name]);
        self.created.push(name.to_owned());
        ip(&["-n", name, "link", "set", "lo", "up"]);
    }

    fn add_node(&mut self, i: u64) {
        let (ns, sw) = (self.node_ns(i), self.switch());
        self.add_namespace(&ns);
        let port = format!("p{i}");
        ip(&[
            "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "cluster", "netns",
            &ns,
        ]);
        ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/25", self.cluster_ip(i)),
            "dev",
            "cluster",
        ]);
        ip(&["-n", &ns, "link", "set", "cluster", "up"]);
        let root_end = format!("{}c{i}", self.tag);
        ip(&[
            "link", "add", &root_end, "type", "veth", "peer", "name", "client", "netns", &ns,
        ]);
        let (a, b) = self.subnet;
        let root_ip = format!("10.{a}.{b}.{}/30", 129 + 4 * i);
        ip(&["addr", "add", &root_ip, "dev", &root_end]);
        ip(&["link", "set", &root_end, "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/30", self.client_ip(i)),
            "dev",
            "client",
        ]);
        ip(&["-n", &ns, "link", "set", "client", "up"]);
    }

    /// Node `i`'s address on the bridge (Raft, forwarding).
    fn cluster_ip(&self, i: u64) -> String {
        let (a, b) = self.subnet;
        format!("10.{a}.{b}.{}", 10 + i)
    }

    /// Node `i`'s end of its link to the root namespace (the test's AMQP and HTTP).
    fn client_ip(&self, i: u64) -> String {
        let (a, b) = self.subnet;
        format!("10.{a}.{b}.{}", 130 + 4 * i)
    }

    fn layouts(&self, nodes: u64) -> BTreeMap<u64, Layout> {
        (0..nodes)
            .map(|i| {
                let client = |port: u16| -> SocketAddr {
                    format!("{}:{port}", self.client_ip(i))
                        .parse()
                        .expect("addr")
                };
                let layout = Layout {
                    member: format!("{}:{PEER_PORT}/{AMQP_PORT}", self.cluster_ip(i)),
                    listen: vec![
                        "--listen".into(),
                        format!("0.0.0.0:{AMQP_PORT}"),
                        "--http".into(),
                        format!("0.0.0.0:{HTTP_PORT}"),
                        "--cluster-listen".into(),
                        format!("0.0.0.0:{PEER_PORT}"),
                    ],
                    wrapper: ["ip", "netns", "exec"].map(String::from).to_vec(),
                    reach: Some((client(AMQP_PORT), client(HTTP_PORT))),
                };
                let mut layout = layout;
                layout.wrapper.push(self.node_ns(i));
                (i, layout)
            })
            .collect()
    }

    /// Cuts node `i` off its peers (its port on the bridge down).
    fn cut(&self, i: u64) {
        ip(&[
            "-n",
            &self.switch(),
            "link",
            "set",
            &format!("p{i}"),
            "down",
        ]);
    }

    fn heal(&self, i: u64) {
        ip(&["-n", &self.switch(), "link", "set", &format!("p{i}"), "up"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting a namespace destroys its veths, and with them their root-side peers.
        for name in self.created.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// Runs `ip args`, panicking with its stderr when it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// True when the test can run; false (after saying so) when skipped by
/// `ENTREPOT_SKIP_NETNS=1`; panics otherwise when not root.
fn netns_available() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("ENTREPOT_SKIP_NETNS").as_deref() == Ok("1") {
        eprintln!("SKIPPED: network namespaces need root (ENTREPOT_SKIP_NETNS=1 is set)");
        return false;
    }
    panic!(
        "this test makes network namespaces and must run as root; set ENTREPOT_SKIP_NETNS=1 \
         to skip it explicitly"
    );
}

#[test]
fn minority_partition_stops_majority_continues_then_converges() {
    if !netns_available() {
        return;
    }
    let net = Netns::create(NODES);
    let rt = runtime();
    let mut cluster = Cluster::with_layouts(net.layouts(NODES));
    let ids: Vec<u64> = (0..NODES).collect();
    let old = cluster.start(&ids, START_TIMEOUT);
    let majority: Vec<u64> = ids.iter().copied().filter(|&i| i != old).collect();
    let load = Load::start(
        &rt,
        LoadConfig {
            queue: "partition".into(),
            urls: cluster.urls(&majority),
            seqs: 0..4_000,
            producers: 2,
            in_flight: 200,
        },
    );
    load.wait_accepted(500, PHASE_TIMEOUT);

    net.cut(old);
    let cut_at = Instant::now();
    let new = cluster.wait_leader(|id| id != old, Duration::from_secs(10));
    eprintln!(
        "leader {old} cut off: node {new} leads after {:?}",
        cut_at.elapsed()
    );
    let before = load.accepted_count();
    load.wait_accepted(before + 500, PHASE_TIMEOUT);

    let lone = Load::start(
        &rt,
        LoadConfig {
            queue: "partition".into(),
            urls: cluster.urls(&[old]),
            seqs: MINORITY_SEQS,
            producers: 1,
            in_flight: 50,
        },
    );
    std::thread::sleep(MINORITY_TRY);
    lone.stop();
    let lone = lone.finish(&rt, Duration::from_secs(10));
    eprintln!(
        "cut-off node {old} during the partition: {:?}",
        cluster.status(old)
    );
    assert!(
        lone.seqs.is_empty(),
        "the cut-off node {old} accepted {} messages",
        lone.seqs.len()
    );

    net.heal(old);
    let accepted = load.finish(&rt, PHASE_TIMEOUT);
    let converged = cluster.wait_converged(Duration::from_secs(20));
    eprintln!("converged: {converged:?}");
    let old_role = converged[&old].as_ref().map(|s| s.role.clone());
    assert_eq!(
        old_role.as_deref(),
        Some("follower"),
        "the old leader after healing"
    );

    // Through the healed node: it forwards to the leader.
    let url = &cluster.urls(&[old])[0];
    let received = rt.block_on(drain(url, "partition", &accepted.seqs, PHASE_TIMEOUT));
    assert_none_lost(&accepted, &received);
    let revived = received
        .keys()
        .filter(|&&s| MINORITY_SEQS.contains(&s))
        .count();
    assert_eq!(
        revived, 0,
        "messages never accepted (sent to the cut-off node) were delivered"
    );
}
