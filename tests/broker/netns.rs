//! Network namespaces made by a test (root required), one per cluster node, so each node
//! has a network of its own, as in containers. Each node's namespace has two links:
//! * `cluster`, a veth into a *switch* namespace holding the bridge: Raft traffic and the
//!   followers' forwarding to the leader. The bridge lives in its own namespace, not the
//!   root one, because a host running Docker drops bridged frames there (br_netfilter
//!   sends them through the FORWARD chain, policy DROP);
//! * `client`, a veth straight to the root namespace, over which the test speaks AMQP and
//!   HTTP to that node (and `entrepot cluster add|remove` reaches its admin API).
//!
//! Every node listens on the same fixed ports inside its own namespace. [`Netns::cut`]
//! sets a node's port on the bridge down: it can no longer reach its peers, while the test
//! still reaches it through `client`.
//!
//! Names carry the process id and a per-process counter, so parallel test processes (and
//! several clusters in one process) never collide; the 10.x.y.0/24 of a run is picked,
//! under a lock file, among those no address or route of the root namespace uses (the
//! root-side ends of the `client` links are the only addresses visible there). `Drop`
//! deletes everything, on panic too: deleting a namespace destroys its veths and with them
//! their peers.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::cluster_support::Layout;

/// The ports every node listens on inside its namespace.
const AMQP_PORT: u16 = 5672;
const HTTP_PORT: u16 = 8080;
const PEER_PORT: u16 = 5673;
/// Most nodes one run can hold (a /30 each on the root side, from .128 up).
const MAX_NODES: u64 = 31;
/// Serializes the choice of a subnet between test processes.
const LOCK_FILE: &str = "/run/entrepot-test-netns.lock";

/// Numbers the runs of one process.
static RUNS: AtomicU32 = AtomicU32::new(0);

/// True when namespaces can be made (running as root); false when not root and
/// `ENTREPOT_TEST_ALLOW_SKIP=1` is set (the caller says what it does instead); panics
/// otherwise. As root, a failing `ip netns` is a failure of the test, never a skip.
pub fn available() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        crate::requirement::skip_allowed(),
        "this test makes network namespaces and must run as root; set \
         ENTREPOT_TEST_ALLOW_SKIP=1 to skip it explicitly in a local run (the cluster tests \
         that need no partition then run on loopback)"
    );
    false
}

/// The namespaces, bridge and links of one cluster.
pub struct Netns {
    tag: String,
    /// Second and third octet of this run's 10.x.y.0/24.
    subnet: (u8, u8),
    nodes: u64,
    /// Namespaces made so far, deleted in reverse order by `Drop`.
    created: Vec<String>,
}

impl Netns {
    /// A switch namespace with a bridge and a namespace for each of nodes `0..nodes`.
    pub fn create(nodes: u64) -> Netns {
        assert!(
            nodes <= MAX_NODES,
            "at most {MAX_NODES} nodes in namespaces"
        );
        let run = RUNS.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // Held until every root-side address exists, so the next process sees them.
        let _lock = lock();
        let mut net = Netns {
            tag: format!("ep{pid}-{run}"),
            subnet: free_subnet(pid.wrapping_mul(8).wrapping_add(run)),
            nodes: 0,
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
        // A namespace of this name can only be left over by a dead process that had our
        // pid (ours are numbered per process): reclaim it.
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(std::process::Stdio::null())
            .status();
        ip(&["netns", "add", name]);
        self.created.push(name.to_owned());
        ip(&["-n", name, "link", "set", "lo", "up"]);
    }

    fn add_node(&mut self, i: u64) {
        let (ns, sw) = (self.node_ns(i), self.switch());
        self.add_namespace(&ns);
        self.nodes = self.nodes.max(i + 1);
        let port = format!("p{i}");
        ip(&[
            "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "cluster", "netns",
            &ns,
        ]);
        ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"]);
        let cluster_ip = format!("{}/25", self.cluster_ip(i));
        ip(&["-n", &ns, "addr", "add", &cluster_ip, "dev", "cluster"]);
        ip(&["-n", &ns, "link", "set", "cluster", "up"]);
        // At most 15 bytes: "ep" + pid (≤ 7 digits) + "-" + run + "c" + node.
        let root_end = format!("{}c{i}", self.tag);
        ip(&[
            "link", "add", &root_end, "type", "veth", "peer", "name", "client", "netns", &ns,
        ]);
        let (a, b) = self.subnet;
        let root_ip = format!("10.{a}.{b}.{}/30", 129 + 4 * i);
        ip(&["addr", "add", &root_ip, "dev", &root_end]);
        ip(&["link", "set", &root_end, "up"]);
        let client_ip = format!("{}/30", self.client_ip(i));
        ip(&["-n", &ns, "addr", "add", &client_ip, "dev", "client"]);
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

    /// How to start and reach each node: listening on all its addresses inside its
    /// namespace, a member at its bridge address, reached by the test over `client`.
    pub fn layouts(&self) -> BTreeMap<u64, Layout> {
        (0..self.nodes)
            .map(|i| {
                let client = |port: u16| -> SocketAddr {
                    format!("{}:{port}", self.client_ip(i))
                        .parse()
                        .expect("addr")
                };
                let any = |port: u16| format!("0.0.0.0:{port}");
                let layout = Layout {
                    member: format!("{}:{PEER_PORT}/{AMQP_PORT}", self.cluster_ip(i)),
                    listen: vec![
                        "--listen".into(),
                        any(AMQP_PORT),
                        "--http".into(),
                        any(HTTP_PORT),
                        "--cluster-listen".into(),
                        any(PEER_PORT),
                    ],
                    wrapper: vec!["ip".into(), "netns".into(), "exec".into(), self.node_ns(i)],
                    reach: Some((client(AMQP_PORT), client(HTTP_PORT))),
                };
                (i, layout)
            })
            .collect()
    }

    /// Cuts node `i` off its peers (its port on the bridge down).
    pub fn cut(&self, i: u64) {
        ip(&[
            "-n",
            &self.switch(),
            "link",
            "set",
            &format!("p{i}"),
            "down",
        ]);
    }

    pub fn heal(&self, i: u64) {
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

/// An exclusive lock on [`LOCK_FILE`], released when the file is dropped.
fn lock() -> File {
    let file = File::create(LOCK_FILE).unwrap_or_else(|e| panic!("open {LOCK_FILE}: {e}"));
    // SAFETY: flock on a descriptor we own, which stays open as long as the File.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(
        rc,
        0,
        "flock {LOCK_FILE}: {}",
        std::io::Error::last_os_error()
    );
    file
}

/// The first 10.x.y.0/24, counting from `start`, that no address or route of the root
/// namespace touches.
fn free_subnet(start: u32) -> (u8, u8) {
    let mut used = HashSet::new();
    let lists: [&[&str]; 2] = [
        &["-4", "-o", "addr", "show"],
        &["-4", "route", "show", "table", "all"],
    ];
    for args in lists {
        let out = Command::new("ip").args(args).output().expect("run ip");
        for word in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let mut octets = word.split(['.', '/']);
            if octets.next() != Some("10") {
                continue;
            }
            let (Some(Ok(a)), Some(Ok(b))) = (
                octets.next().map(str::parse::<u8>),
                octets.next().map(str::parse::<u8>),
            ) else {
                continue;
            };
            used.insert((a, b));
        }
    }
    (0..=u16::MAX as u32)
        .map(|k| start.wrapping_add(k) as u16)
        .map(|s| ((s >> 8) as u8, s as u8))
        .find(|s| *s != (0, 0) && !used.contains(s))
        .expect("a free 10.x.y.0/24")
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
