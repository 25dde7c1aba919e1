//! Issue 12's fault campaign in `cluster-mode: groups` (a Raft group per address): while
//! producers and consumers of six queues run through every node of a three-node cluster,
//! a node that leads at least one address's group is SIGKILLed or SIGSTOPped again and
//! again; no accepted message is lost, none a consumer had accepted comes again, and
//! after every fault each address the node led accepts and delivers again within the
//! election timeout + 1 s of its new leader.
//!
//! Method: a [`Cluster`] of real `entrepot serve --cluster-mode groups --sync always`
//! processes on loopback, driven by `groups_campaign` (its load, rounds, clock and judge,
//! shared with the container campaign, `container_campaign`): per address a windowed
//! producer, a consumer that watches its connection with an AMQP idle-time-out and a
//! *patient* consumer with none, each client starting on a different node and following
//! `amqp:link:redirect` to the address's leader (a plain successful attach on a
//! non-leader, link forwarding, serves it just as well). Rounds alternate the two faults;
//! each picks, in turn, a node that leads at least one address (read from every node's
//! `/status`):
//! * *kill*: SIGKILL, down for `DOWN_FOR`, restarted on its data directory;
//! * *stop*: SIGSTOP for `STOPPED_FOR` (a hung or partitioned node: its sockets stay
//!   open and silent), then SIGCONT. Watching clients leave it after their idle-time-out;
//!   the patient consumer stays on it until it resumes, when the deposed leader must not
//!   deliver from its stale queue (its delivery lease) and detaches it.
//!
//! The clock, per address the faulted node led: from the moment a survivor's `/status`
//! names it among its led addresses (the group has a new leader) to the first message
//! of it accepted and the first delivery consumed after that moment, whichever is later.
//!
//! Asserted: lost = 0, duplicates = 0 (delivered again after a consumer's accepted was
//! settled), no refused message delivered, and every affected address of every round
//! served again within `SERVED_AGAIN_LIMIT` (the election timeout + 1 s). The longest
//! stall of any one client is printed, not judged (the patient consumer waits out every
//! stop on its node).
//!
//! Found (session 14): an `accepted` a consumer sent just before its queue was retired
//! (the leadership here ended) was settled back with no acknowledgement recorded, and the
//! next leader delivered the message again — 1 to 6 duplicates in 3 of 4 runs, around a
//! stopped node's resume; fixed in `Queue::settle` (a retired queue refuses).
//! Mutation-checked: the consumer's settlement sent before its acknowledgement commits
//! (`connection/session.rs`, the durable handle ignored): 67 duplicates in 4 kill rounds.
//! Not caught: a delivery lease that always holds (`DeliveryLease::holds` true): 0
//! duplicates in 6 stop rounds — a stale delivery needs the patient consumer to get
//! credit on the resumed node before it learns of the new term, which these rounds did
//! not produce; `group_driver::a_leader_cut_off_from_its_followers_delivers_nothing_once_its_lease_ran_out`
//! is the deterministic guard of the lease.
//!
//! Length: `ROUNDS_DEFAULT` rounds (CI, ~30–45 s); `ENTREPOT_GROUPS_CAMPAIGN_ROUNDS=N` (at
//! most 500) for a longer campaign, `ENTREPOT_GROUPS_CAMPAIGN_FAULTS` (`kill`, `stop`,
//! or both comma-separated; default both, alternated),
//! `ENTREPOT_GROUPS_CAMPAIGN_VERBOSE=1` prints every client reconnect. Ends with the line
//! `groups campaign: rounds=R kills=K stops=S sent=N accepted=A delivered=D lost=L
//! duplicates=U worst_served_again_ms=W`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::cluster_campaign::{faults_from_env, rounds_from_env, Fault, ROUNDS_DEFAULT};
use crate::cluster_groups::start_groups_cluster;
use crate::cluster_support::Cluster;
use crate::elasticity::load::Endpoints;
use crate::groups_campaign::{Campaign, Nodes};

const NODES: u64 = 3;
/// Longest the nodes may take to be ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn groups_leaders_killed_and_stopped_under_load_lose_nothing_and_serve_again() {
    let campaign = Campaign {
        name: "groups campaign",
        rounds: rounds_from_env("ENTREPOT_GROUPS_CAMPAIGN_ROUNDS", ROUNDS_DEFAULT),
        faults: faults_from_env("ENTREPOT_GROUPS_CAMPAIGN_FAULTS"),
        verbose: std::env::var("ENTREPOT_GROUPS_CAMPAIGN_VERBOSE").as_deref() == Ok("1"),
    };
    let mut cluster = start_groups_cluster(NODES, &[], READY_TIMEOUT);
    campaign.run(&mut cluster);
}

/// Processes: SIGKILL and a restart on the data directory; SIGSTOP and SIGCONT.
impl Nodes for Cluster {
    fn running(&self) -> Vec<u64> {
        Cluster::running(self)
    }

    fn amqp(&self, id: u64) -> SocketAddr {
        Cluster::amqp(self, id)
    }

    fn led_addresses(&self, ids: &[u64]) -> BTreeMap<u64, Vec<String>> {
        Cluster::led_addresses(self, ids)
    }

    fn fault(&mut self, id: u64, fault: Fault, _: &Endpoints) {
        match fault {
            Fault::Kill => self.kill(id),
            Fault::Stop => self.freeze(id, true),
        }
    }

    fn restore(&mut self, id: u64, fault: Fault, endpoints: &Endpoints) {
        match fault {
            Fault::Kill => self.restart(id),
            Fault::Stop => self.freeze(id, false),
        }
        endpoints.set(id, Cluster::amqp(self, id));
    }
}
