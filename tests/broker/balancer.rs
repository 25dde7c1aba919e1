//! Goal: the balancer (`entrepot::raft::balancer`) carries out the metadata group's
//! placement on the Raft memberships of existing groups. (a) A fourth host joins: group 0
//! takes it in (as a voter: 4 ≤ `MAX_META_VOTERS`), `add_member` places some replicas on
//! it, each group's leader adds it as a learner, waits for it to catch up and changes
//! the voters; a message committed before the join reads back on the new node, the
//! replicas that left are removed from their hosts, every group's voters equal its placed
//! replicas, the new node never bootstraps a group, and every message committed while
//! the moves ran is there once per confirmed proposal, in order. (b) A member removed
//! while still running: its replicas move away, nothing is lost, it ends hosting no
//! address group. (c) The joining node stopped in the middle of the moves and started
//! again: the moves fail, are retried, and complete once it is back; nothing is lost.
//! Method: four real hosts in this process (real TCP, node logs with an fsync per
//! commit, `three_hosts::config`), each with group 0, an opener, a balancer and a
//! metadata level controller (the level rises to 2 once the members are added); one
//! producer task per group proposing through whichever node leads it, one proposal in
//! flight, a failed one tried again (so a retry may commit twice, next to itself: the
//! check collapses neighbours). Every wait is bounded; nothing is timed but the move's
//! duration, which is printed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use entrepot::broker::replication::{encode_message, OPS_VERSION};
use entrepot::raft::address_machine::message_record;
use entrepot::raft::balancer::{Balancer, BalancerConfig};
use entrepot::raft::group_opener::{GroupOpener, OpenerConfig};
use entrepot::raft::meta_machine::{Member, MetaGroup, METADATA_LEVEL_MAX};
use entrepot::raft::metadata_level::{LevelController, NodeAppHandler};
use entrepot_cluster::placement::GroupId;
use entrepot_cluster::{Host, NodeId, METADATA_GROUP};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::meta_hosts::{amqp_addr, opener_config, NO_SAFETY_NET};
use crate::three_hosts::config;

pub(crate) const TEST_TIMEOUT: Duration = Duration::from_secs(120);
pub(crate) const WAIT: Duration = Duration::from_secs(45);
const ADDRESSES: u64 = 8;
/// Most messages one producer proposes (it stops earlier when told).
const MAX_PRODUCED: u64 = 2_000;
/// Pause between two proposals of one producer: traffic, not a flood, on two cores.
const PRODUCE_PAUSE: Duration = Duration::from_millis(20);

fn message(i: u64, group: GroupId) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(OPS_VERSION);
    encode_message(&mut b, i, &record(i, group));
    b.freeze()
}

fn record(i: u64, group: GroupId) -> Vec<u8> {
    format!("message {i} of group {group}").into_bytes()
}

/// `BALANCER_LOG=1` prints the balancer's and the openers' log lines.
pub(crate) fn trace() {
    if std::env::var_os("BALANCER_LOG").is_some() {
        let filter = "entrepot::raft::balancer=info,entrepot::raft::group_opener=info";
        let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();
    }
}

/// Rounds at least 100 ms apart, and no safety net within a test: every move here must
/// start from a change (of the metadata, of a group's leadership or membership), a move
/// ending or a retry coming due — never from a periodic look.
fn balancer_config() -> BalancerConfig {
    BalancerConfig {
        round: Duration::from_millis(100),
        safety_net: NO_SAFETY_NET,
        catch_up_timeout: Duration::from_secs(3),
    }
}

pub(crate) struct Node {
    pub(crate) host: Host,
    pub(crate) meta: MetaGroup,
    pub(crate) opener: GroupOpener,
    /// `None` when started without one (nobody moves replicas).
    balancer: Option<Balancer>,
    /// Raises the metadata level while this node leads group 0 (`metadata_level.rs`).
    pub(crate) level: LevelController,
}

pub(crate) struct Cluster {
    pub(crate) nodes: BTreeMap<NodeId, Node>,
    /// The running hosts, for the producers.
    hosts: Arc<Mutex<BTreeMap<NodeId, Host>>>,
    pub(crate) addrs: BTreeMap<NodeId, String>,
    dirs: BTreeMap<NodeId, tempfile::TempDir>,
    balance: bool,
    /// Each node's `--metadata-level-max` (the build's own when not named), taken at
    /// every start.
    pub(crate) levels: BTreeMap<NodeId, u8>,
}

/// A node as `GroupsNode` starts one: group 0, the level queries answered, an opener, a
/// balancer (when `balance`) and a level controller, at metadata level `level_max`.
async fn start_node(
    id: NodeId,
    dir: &Path,
    listener: TcpListener,
    balance: bool,
    level_max: u8,
) -> Node {
    let host = Host::start(config(id, dir), listener).unwrap();
    let meta = MetaGroup::open(&host).await.unwrap();
    host.set_app_handler(NodeAppHandler::new(level_max, meta.machine.clone(), None));
    let settings = OpenerConfig {
        metadata_level_max: level_max,
        ..opener_config()
    };
    let (opener, _events) = GroupOpener::start(host.clone(), meta.machine.clone(), settings);
    let balancer =
        balance.then(|| Balancer::start(host.clone(), meta.machine.clone(), balancer_config()));
    let level = LevelController::start(host.clone(), meta.clone(), level_max);
    Node {
        host,
        meta,
        opener,
        balancer,
        level,
    }
}

pub(crate) async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Cluster {
    /// `hosts` hosts; group 0 formed on the first `members`, which are the members.
    async fn start(hosts: u64, members: u64) -> Cluster {
        Cluster::start_with(hosts, members, true).await
    }

    /// As [`Cluster::start`]; `balance` false runs no balancer anywhere.
    async fn start_with(hosts: u64, members: u64, balance: bool) -> Cluster {
        Cluster::start_at_levels(hosts, members, balance, &[]).await
    }

    /// As [`Cluster::start_with`], the nodes `levels` names at those metadata levels
    /// (`--metadata-level-max`), the others at the build's.
    pub(crate) async fn start_at_levels(
        hosts: u64,
        members: u64,
        balance: bool,
        levels: &[(NodeId, u8)],
    ) -> Cluster {
        let mut listeners = BTreeMap::new();
        for id in 0..hosts {
            listeners.insert(id, TcpListener::bind("127.0.0.1:0").await.unwrap());
        }
        let addrs: BTreeMap<NodeId, String> = listeners
            .iter()
            .map(|(id, l)| (*id, l.local_addr().unwrap().to_string()))
            .collect();
        let mut c = Cluster {
            nodes: BTreeMap::new(),
            hosts: Arc::default(),
            addrs,
            dirs: BTreeMap::new(),
            balance,
            levels: (0..hosts).map(|n| (n, METADATA_LEVEL_MAX)).collect(),
        };
        c.levels.extend(levels.iter().copied());
        for (id, listener) in listeners {
            let dir = tempfile::tempdir().unwrap();
            let node = start_node(id, dir.path(), listener, balance, c.levels[&id]).await;
            c.hosts.lock().unwrap().insert(id, node.host.clone());
            c.nodes.insert(id, node);
            c.dirs.insert(id, dir);
        }
        let founders: BTreeMap<NodeId, String> =
            (0..members).map(|n| (n, c.addrs[&n].clone())).collect();
        c.nodes[&0].meta.handle.bootstrap(&founders).await.unwrap();
        for n in 0..members {
            c.add_member(n).await;
        }
        c
    }

    pub(crate) async fn add_member(&self, n: NodeId) {
        let member = Member {
            peer: self.addrs[&n].clone(),
            amqp: amqp_addr(n),
        };
        self.meta_leader()
            .await
            .add_member(n, member)
            .await
            .unwrap();
    }

    pub(crate) async fn meta_leader(&self) -> MetaGroup {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let leads = |n: &&Node| n.meta.handle.leadership().borrow().leads;
            if let Some(n) = self.nodes.values().find(leads) {
                return n.meta.clone();
            }
            assert!(tokio::time::Instant::now() < deadline, "no group 0 leader");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(crate) async fn declare(&self) -> Vec<GroupId> {
        let meta = self.meta_leader().await;
        let mut groups = Vec::new();
        for i in 0..ADDRESSES {
            groups.push(meta.declare_address(&format!("queue/{i}")).await.unwrap());
        }
        groups
    }

    /// Whether every group's membership is its placement, as every running node sees
    /// it: voters = placed replicas on each replica, no copy anywhere else, group 0's
    /// voters the members (fewer than `MAX_META_VOTERS` here), no move running.
    fn settled(&self, meta: &MetaGroup) -> Result<(), String> {
        let state = meta.machine.state();
        let members: BTreeSet<NodeId> = state.members().keys().copied().collect();
        for (n, node) in &self.nodes {
            if node
                .balancer
                .as_ref()
                .is_some_and(|b| b.stats().in_flight != 0)
            {
                return Err(format!("node {n}: moves in flight"));
            }
            if members.contains(n) {
                let s = node.meta.handle.status();
                if s.voters != members || !s.learners.is_empty() {
                    return Err(format!("node {n}: group 0 {s:?}"));
                }
            }
            for (g, entry) in state.groups() {
                let placed = &entry.replicas.nodes;
                match node.host.group(*g) {
                    Some(h) if placed.contains(n) => {
                        let s = h.status();
                        if &s.voters != placed || !s.learners.is_empty() {
                            return Err(format!("node {n} group {g}: {s:?}, placed {placed:?}"));
                        }
                    }
                    None if placed.contains(n) => return Err(format!("node {n}: no group {g}")),
                    Some(_) => return Err(format!("node {n} still holds group {g}")),
                    None => {}
                }
            }
        }
        Ok(())
    }

    async fn wait_settled(&self) {
        let meta = self.meta_leader().await;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match self.settled(&meta) {
                Ok(()) => return,
                Err(e) => assert!(tokio::time::Instant::now() < deadline, "not settled: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Reads every message of `group` on each of its placed replicas, checking order:
    /// neighbours collapsed, the sequence must be `0..=n` with `n >= confirmed`.
    pub(crate) async fn check_messages(&self, group: GroupId, confirmed: u64) {
        let meta = self.meta_leader().await;
        let placed = meta.machine.group(group).unwrap().replicas.nodes;
        let leader = self.group_leader(group).await;
        let committed = self.nodes[&leader]
            .host
            .group(group)
            .unwrap()
            .status()
            .last_log
            .unwrap();
        for n in placed {
            let o = self.nodes[&n].opener.get(group).unwrap();
            let mut applied = o.handle.applied();
            tokio::time::timeout(
                WAIT,
                applied.wait_for(|a| a.is_some_and(|a| a >= committed)),
            )
            .await
            .unwrap_or_else(|_| panic!("node {n} did not apply group {group}"))
            .unwrap();
            let mut seq: Vec<u64> = Vec::new();
            for offset in 0..o.machine.next_offset() {
                let at = o.machine.position(offset).unwrap();
                let payload = o.handle.read(at).unwrap().expect("a proposal");
                let text = String::from_utf8(message_record(&payload).unwrap().to_vec()).unwrap();
                let i: u64 = text
                    .strip_prefix("message ")
                    .and_then(|t| t.split(' ').next())
                    .and_then(|i| i.parse().ok())
                    .unwrap_or_else(|| panic!("node {n}: {text}"));
                assert_eq!(text.into_bytes(), record(i, group));
                if seq.last() != Some(&i) {
                    seq.push(i);
                }
            }
            let want: Vec<u64> = (0..seq.len() as u64).collect();
            assert_eq!(seq, want, "node {n} group {group}: lost or reordered");
            assert!(
                seq.len() as u64 > confirmed,
                "node {n} group {group}: {} messages, {confirmed} confirmed",
                seq.len()
            );
        }
    }

    /// Bootstraps started by every running node's opener.
    fn bootstraps(&self) -> u64 {
        self.nodes
            .values()
            .map(|n| n.opener.counters().bootstraps)
            .sum()
    }

    /// Each of `groups`' highest term on a running replica.
    fn terms(&self, groups: &[GroupId]) -> BTreeMap<GroupId, u64> {
        groups
            .iter()
            .map(|&g| {
                let term = self
                    .nodes
                    .values()
                    .filter_map(|n| n.host.group(g))
                    .map(|h| h.leadership().borrow().term)
                    .max()
                    .unwrap_or(0);
                (g, term)
            })
            .collect()
    }

    pub(crate) async fn group_leader(&self, group: GroupId) -> NodeId {
        let mut leader = None;
        wait_until(&format!("a leader of group {group}"), || {
            leader = self.nodes.iter().find_map(|(n, node)| {
                let h = node.host.group(group)?;
                h.leadership().borrow().leads.then_some(*n)
            });
            leader.is_some()
        })
        .await;
        leader.unwrap()
    }

    /// Leaderships of `groups` per running node.
    fn leads(&self, groups: &[GroupId]) -> BTreeMap<NodeId, usize> {
        let mut out: BTreeMap<NodeId, usize> = self.nodes.keys().map(|n| (*n, 0)).collect();
        for (n, node) in &self.nodes {
            for g in groups {
                if node
                    .host
                    .group(*g)
                    .is_some_and(|h| h.leadership().borrow().leads)
                {
                    *out.entry(*n).or_default() += 1;
                }
            }
        }
        out
    }

    pub(crate) async fn stop(&mut self, n: NodeId) {
        self.hosts.lock().unwrap().remove(&n);
        if let Some(node) = self.nodes.remove(&n) {
            node.level.stop().await;
            if let Some(b) = node.balancer {
                b.stop().await;
            }
            node.opener.stop().await;
            node.host.shutdown().await;
        }
    }

    pub(crate) async fn start_again(&mut self, n: NodeId) {
        let listener = TcpListener::bind(&self.addrs[&n]).await.unwrap();
        let dir = self.dirs[&n].path().to_path_buf();
        let node = start_node(n, &dir, listener, self.balance, self.levels[&n]).await;
        self.hosts.lock().unwrap().insert(n, node.host.clone());
        self.nodes.insert(n, node);
    }

    pub(crate) async fn shutdown(mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for n in ids {
            self.stop(n).await;
        }
    }
}

/// One producer per group: message 1, 2, … through the group's current leader, one in
/// flight, a failure tried again; stops when told or after [`MAX_PRODUCED`].
pub(crate) struct Producers {
    stop: Arc<AtomicBool>,
    tasks: Vec<(GroupId, JoinHandle<u64>)>,
}

impl Producers {
    pub(crate) fn start(c: &Cluster, groups: &[GroupId]) -> Producers {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = groups
            .iter()
            .map(|&g| {
                let hosts = Arc::clone(&c.hosts);
                let stop = Arc::clone(&stop);
                (g, tokio::spawn(produce(hosts, g, stop)))
            })
            .collect();
        Producers { stop, tasks }
    }

    /// Stops them; the last message each had confirmed, by group.
    pub(crate) async fn stop(self) -> BTreeMap<GroupId, u64> {
        self.stop.store(true, Ordering::Relaxed);
        let mut out = BTreeMap::new();
        for (g, t) in self.tasks {
            out.insert(g, t.await.unwrap());
        }
        out
    }
}

async fn produce(
    hosts: Arc<Mutex<BTreeMap<NodeId, Host>>>,
    group: GroupId,
    stop: Arc<AtomicBool>,
) -> u64 {
    let mut confirmed = 0;
    let mut i = 1;
    while i <= MAX_PRODUCED && !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(PRODUCE_PAUSE).await;
        let leader = hosts.lock().unwrap().values().find_map(|h| {
            let handle = h.group(group)?;
            let leads = handle.leadership().borrow().leads;
            leads.then_some(handle)
        });
        let Some(handle) = leader else { continue };
        if handle.propose(message(i, group)).await.is_ok() {
            confirmed = i;
            i += 1;
        }
    }
    confirmed
}

impl Cluster {
    /// [`Cluster::start`], the addresses declared, message 0 committed to every group and
    /// every membership settled: where most tests begin.
    async fn settled_with_messages(hosts: u64, members: u64) -> (Cluster, Vec<GroupId>) {
        let c = Cluster::start(hosts, members).await;
        let groups = c.declare().await;
        first_messages(&c, &groups).await;
        c.wait_settled().await;
        (c, groups)
    }
}

/// Commits message 0 to every group, through its leader.
pub(crate) async fn first_messages(c: &Cluster, groups: &[GroupId]) {
    for &g in groups {
        let leader = c.group_leader(g).await;
        let h = c.nodes[&leader].opener.get(g).unwrap().handle;
        h.propose(message(0, g)).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_receives_its_share_of_replicas_and_every_message_is_kept() {
    trace();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (c, groups) = Cluster::settled_with_messages(4, 3).await;
        let producers = Producers::start(&c, &groups);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let began = tokio::time::Instant::now();
        c.add_member(3).await;
        let meta = c.meta_leader().await;
        let on_new: Vec<GroupId> = meta.machine.placed_on(3).keys().copied().collect();
        // 8 groups × 3 replicas on 4 members: 6 each, so 6 moved to node 3.
        assert_eq!(on_new.len(), 6, "placed on the new node: {on_new:?}");
        c.wait_settled().await;
        let took = began.elapsed();
        let confirmed = producers.stop().await;
        let stats: Vec<_> = c
            .nodes
            .values()
            .map(|n| n.balancer.as_ref().unwrap().stats())
            .collect();
        let moves: u64 = stats.iter().map(|s| s.done).sum();
        println!(
            "join: {} groups moved (+ group 0) in {took:?}; balancer stats {stats:?}; \
             leaders {:?}; confirmed {confirmed:?}",
            on_new.len(),
            c.leads(&groups)
        );
        // Every moved group and group 0 got a move done; retries are few and bounded
        // (a leader that removed itself must not spin on moves it cannot make).
        assert!(moves as usize > on_new.len(), "{stats:?}");
        let started: u64 = stats.iter().map(|s| s.started).sum();
        assert!(started <= 40, "{stats:?}");
        // The new node holds the message committed before it joined, from the leader.
        for &g in &on_new {
            let o = c.nodes[&3].opener.get(g).unwrap();
            let payload = o
                .handle
                .read(o.machine.position(0).unwrap())
                .unwrap()
                .unwrap();
            assert_eq!(message_record(&payload).unwrap(), record(0, g));
        }
        assert_eq!(
            c.nodes[&3].opener.counters().bootstraps,
            0,
            "a new replica of an existing group must receive it, not bootstrap it"
        );
        for &g in &groups {
            c.check_messages(g, confirmed[&g]).await;
        }
        // Group 0 took the new member as a voter; every group commits on.
        let s = c.nodes[&3].host.group(METADATA_GROUP).unwrap().status();
        assert_eq!(s.voters, BTreeSet::from([0, 1, 2, 3]));
        c.shutdown().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_hands_its_replicas_over_and_ends_hosting_no_group() {
    trace();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (c, groups) = Cluster::settled_with_messages(4, 4).await;
        let producers = Producers::start(&c, &groups);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let began = tokio::time::Instant::now();
        c.meta_leader().await.remove_member(1).await.unwrap();
        c.wait_settled().await;
        let took = began.elapsed();
        let confirmed = producers.stop().await;
        println!(
            "leave: settled in {took:?}; leaders {:?}; confirmed {confirmed:?}",
            c.leads(&groups)
        );
        let hosted: Vec<GroupId> = groups
            .iter()
            .copied()
            .filter(|g| c.nodes[&1].host.group(*g).is_some())
            .collect();
        assert!(hosted.is_empty(), "node 1 still hosts {hosted:?}");
        assert!(c.nodes[&1].opener.opened().is_empty());
        for &g in &groups {
            c.check_messages(g, confirmed[&g]).await;
        }
        c.shutdown().await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stopped_in_the_middle_of_a_move_gets_it_completed_once_back() {
    trace();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut c = Cluster::start(4, 3).await;
        let groups = c.declare().await;
        first_messages(&c, &groups).await;
        c.wait_settled().await;
        let producers = Producers::start(&c, &groups);
        c.add_member(3).await;
        wait_until("a move begins", || {
            c.nodes
                .values()
                .any(|n| n.balancer.as_ref().unwrap().stats().started > 0)
        })
        .await;
        c.stop(3).await;
        // A node that is down never becomes a voter: no catch-up, no voter change. (A
        // change whose catch-up finished just before the stop may still commit: look
        // after a grace of a few commits under load.)
        tokio::time::sleep(Duration::from_secs(2)).await;
        let with_3 = |c: &Cluster| -> BTreeSet<GroupId> {
            groups
                .iter()
                .copied()
                .filter(|g| {
                    c.nodes.values().any(|n| {
                        n.host.group(*g).is_some_and(|h| {
                            h.leadership().borrow().leads && h.status().voters.contains(&3)
                        })
                    })
                })
                .collect()
        };
        let before = with_3(&c);
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = with_3(&c);
            assert!(
                now.is_subset(&before),
                "node 3 made a voter while down: {before:?} -> {now:?}"
            );
        }
        c.start_again(3).await;
        c.wait_settled().await;
        let confirmed = producers.stop().await;
        let stats: Vec<_> = c
            .nodes
            .values()
            .map(|n| n.balancer.as_ref().unwrap().stats())
            .collect();
        println!("stop mid-move: stats {stats:?}; confirmed {confirmed:?}");
        for &g in &groups {
            c.check_messages(g, confirmed[&g]).await;
        }
        c.shutdown().await;
    })
    .await
    .expect("test timed out");
}

/// The safety point of a move: a new replica of an existing group waits for its leader's
/// log and never forms the group itself — with no balancer to add it, it stays empty
/// past the openers' bootstrap fallback (a bootstrap there would start a group of its
/// own under the same id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_replica_of_an_existing_group_never_bootstraps_it() {
    trace();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let c = Cluster::start_with(4, 3, false).await;
        let groups = c.declare().await;
        first_messages(&c, &groups).await;
        let meta = c.meta_leader().await;
        // Group 0 takes node 3 in by hand (no balancer), then the join is placed.
        meta.handle.add_learner(3, &c.addrs[&3]).await.unwrap();
        c.add_member(3).await;
        let on_new: Vec<GroupId> = meta.machine.placed_on(3).keys().copied().collect();
        assert_eq!(on_new.len(), 6);
        for &g in &on_new {
            wait_until(&format!("group {g} open on node 3"), || {
                c.nodes[&3].opener.get(g).is_some()
            })
            .await;
        }
        // Past the fallback (3 s in these tests) and a few opener rounds.
        tokio::time::sleep(opener_config().bootstrap_fallback_after + Duration::from_secs(1)).await;
        assert_eq!(c.nodes[&3].opener.counters().bootstraps, 0);
        for &g in &on_new {
            let h = c.nodes[&3].host.group(g).unwrap();
            assert!(
                h.is_pristine().unwrap(),
                "group {g} formed on node 3 by itself"
            );
        }
        c.shutdown().await;
    })
    .await
    .expect("test timed out");
}

/// A move back: a node's replicas move to a joiner and, when the joiner leaves, back onto
/// the nodes that founded their groups. Such a replica is empty again and its node is the
/// group's founder, yet it must not bootstrap the group a second time: found in the
/// elasticity run (session 17), where that bootstrap made the empty replica campaign with
/// the founders' membership every election timeout, pushing the group's term from 3 to 11
/// and deposing its leader. Checked: no bootstrap on any node during the move back, and
/// each group's term rises by at most a few (a hand-over per move) while it settles.
/// Mutation-checked: without the rule (`Tracked::moved_in` ignored) the bootstraps rise
/// and the test fails; the term bound alone did not catch it here, where each leader
/// reached its new replica within milliseconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_moved_back_onto_its_founder_does_not_bootstrap_the_group_again() {
    trace();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (c, groups) = Cluster::settled_with_messages(4, 3).await;
        c.add_member(3).await;
        c.wait_settled().await;
        let meta = c.meta_leader().await;
        let moved: Vec<GroupId> = meta.machine.placed_on(3).keys().copied().collect();
        assert!(!moved.is_empty(), "nothing moved to the joiner");
        let (before, terms_before) = (c.bootstraps(), c.terms(&groups));
        meta.remove_member(3).await.unwrap();
        c.wait_settled().await;
        // A few more rounds of every opener, and a few election timeouts.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let terms_after = c.terms(&groups);
        println!(
            "move back: {} groups; terms {terms_before:?} -> {terms_after:?}",
            moved.len()
        );
        assert_eq!(
            c.bootstraps(),
            before,
            "a replica moved back onto its founder bootstrapped its group again"
        );
        terms_rose_at_most(&terms_before, &terms_after, MOVE_BACK_TERMS);
        c.shutdown().await;
    })
    .await
    .expect("test timed out");
}

/// The same move back with the founder *restarted* in the middle of it: the opener's
/// memory of the group having moved away is gone, and the node's metadata starts from a
/// snapshot taken before the moves (group 0 applies its log again only once it hears
/// the commit index). Without the group's *formed* mark in the metadata and the opener's barrier
/// before a bootstrap (`group_opener.rs`, "Forming"), the restarted founder bootstrapped
/// its empty replica of the groups coming back to it: the gap ARCHITECTURE.md listed
/// since session 18. Checked: no bootstrap on the restarted node, each group's term
/// rises by at most a few, and every message is on every replica once settled.
/// Mutation-checked (session 19): with the opener ignoring the formed mark (and the
/// barrier) the restarted founder bootstraps at once and the test fails, 2 runs of 2; it
/// needs the founder of a group moved off it (with another founding replica, the leader's
/// move reached it before the fallback delay ran out, and the test passed anyway).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_founder_restarted_while_its_group_moves_back_does_not_bootstrap_it_again() {
    trace();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (mut c, groups) = Cluster::settled_with_messages(4, 3).await;
        let meta = c.meta_leader().await;
        wait_until("every group marked formed", || {
            meta.machine.state().groups().values().all(|e| e.formed)
        })
        .await;
        // Group 0's snapshot on every node from before the join: what a restarted
        // node's metadata starts from until it hears the commit index again.
        for n in 0..3 {
            c.nodes[&n].meta.handle.snapshot_now().await.unwrap();
        }
        c.add_member(3).await;
        c.wait_settled().await;
        // The node that lost the most groups it *founded* (bootstrapped first, at once
        // when it opens the group empty; the placement is deterministic, so the same
        // node every run).
        let state = c.meta_leader().await.machine.state();
        let mut lost: BTreeMap<NodeId, Vec<GroupId>> = BTreeMap::new();
        for (g, e) in state.groups() {
            if !e.replicas.nodes.contains(&e.founder) {
                lost.entry(e.founder).or_default().push(*g);
            }
        }
        let (f, away) = lost
            .into_iter()
            .max_by_key(|(_, gs)| gs.len())
            .expect("a group moved off its founder to the joiner");
        for &g in &away {
            assert!(c.nodes[&f].host.group(g).is_none(), "group {g} left on {f}");
        }
        let terms_before = c.terms(&groups);
        c.stop(f).await;
        // The joiner leaves while the founder is down: its groups come back to it.
        c.meta_leader().await.remove_member(3).await.unwrap();
        let back = c.meta_leader().await.machine.state();
        assert!(
            away.iter().all(|g| back.groups()[g].replicas.nodes.contains(&f)),
            "the groups {away:?} did not come back to node {f}"
        );
        c.start_again(f).await;
        c.wait_settled().await;
        // A few more rounds of every opener (past the 3 s fallback of these tests).
        tokio::time::sleep(opener_config().bootstrap_fallback_after + Duration::from_secs(1)).await;
        let terms_after = c.terms(&groups);
        println!(
            "founder {f} restarted while {away:?} moved back: terms {terms_before:?} -> {terms_after:?}"
        );
        assert_eq!(
            c.nodes[&f].opener.counters().bootstraps,
            0,
            "the restarted founder {f} bootstrapped a group again"
        );
        terms_rose_at_most(&terms_before, &terms_after, 2 * MOVE_BACK_TERMS);
        for &g in &groups {
            c.check_messages(g, 0).await;
        }
        c.shutdown().await;
    })
    .await
    .expect("test timed out");
}

/// Each group's term in `after` is at most `bound` above the one in `before`: an empty
/// replica campaigning with the founders' membership raises it every election timeout.
fn terms_rose_at_most(before: &BTreeMap<GroupId, u64>, after: &BTreeMap<GroupId, u64>, bound: u64) {
    for (g, term) in after {
        let was = before.get(g).copied().unwrap_or(0);
        assert!(
            *term <= was + bound,
            "group {g}: term {was} -> {term}: an empty replica campaigned"
        );
    }
}

/// Most a group's term may rise while one move back settles: a hand-over, an election
/// that a loaded machine lets time out, and one more.
const MOVE_BACK_TERMS: u64 = 3;
