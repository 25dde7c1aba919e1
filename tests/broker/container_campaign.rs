//! Issue 12's fault campaign through containers of the project's image: while producers
//! and consumers of six queues run through every pod of a three-pod StatefulSet in
//! `cluster-mode: groups`, a pod whose broker leads at least one address's group is
//! SIGKILLed or frozen again and again; no accepted message is lost, none a consumer had
//! accepted comes again, and after every fault each address the pod led accepts and
//! delivers again within the election timeout + 1 s of its new leader.
//!
//! Method: the elasticity test's StatefulSet (`elasticity::statefulset`: the image of
//! docker/build.sh, pods `entrepot-0..2` with their DNS aliases on a user network of their
//! own, a volume per ordinal, `--cluster-mode groups`, the default `--sync always`), driven
//! by the process campaign's rounds, load, clock and judge (`groups_campaign`: per
//! address a producer, a watching consumer and a patient one, every client following
//! `amqp:link:redirect`; a round faults a node that leads at least one address, read
//! from every pod's `/status`). Only the faults are Docker's:
//! * *kill*: `docker kill --signal KILL` (the broker is the container's PID 1: no
//!   chance to sync or close anything), its log saved and the container deleted; after
//!   `DOWN_FOR` (1 s) the pod starts again on its volume under the same name and DNS alias
//!   (as the elasticity test's rolling restart does) and the round waits until it is
//!   ready. From the moment of the kill its name does not resolve, so a redirect to it
//!   is not followed: in Kubernetes a killed container restarts in the same pod, whose
//!   IP address stays and refuses a connect at once, while here the address goes with
//!   the deleted container and a connect to it hangs until the client's open timeout —
//!   in the first runs (session 18) every kill round had clients redirected to the
//!   killed pod by a survivor that had not yet heard of the election, each waiting out
//!   its 600 ms, and served again took 0.5–0.9 s from the new leader instead of
//!   processes' 0.1–0.4 s.
//! * *stop*: `docker pause` for `STOPPED_FOR` (3 s), then `docker unpause`. The cgroup
//!   freezer rather than `docker kill --signal STOP`: it freezes every thread of the pod
//!   at once and `docker pause` returns only once the cgroup is frozen, so no thread of
//!   the broker still writes to a socket after the fault's moment (the process campaign
//!   waits for every thread to be in state T for the same reason; a SIGSTOP through
//!   Docker would need the host pid and `/proc` to know as much), and the broker cannot
//!   tell it was stopped (no SIGCONT). To its peers and clients it is a hung node: its
//!   sockets stay open and the kernel still acknowledges what they send.
//!
//! Asserted (the judge of `groups_campaign`): lost = 0, duplicates = 0, no refused
//! message delivered, every address accepted and consumed, and every affected address of
//! every round served again within `SERVED_AGAIN_LIMIT` (the election timeout + 1 s)
//! from its new leader. Every pod's log (each killed incarnation's too) is kept in
//! target/tmp/container-campaign/<pid>/logs; a failure lists the brokers' warnings.
//! Ends with the line `container campaign: rounds=R kills=K stops=S addresses_faulted=F
//! sent=N accepted=A delivered=D lost=L duplicates=U worst_served_again_ms=W`.
//!
//! Mutation-checked: with the served-again limit set to 1 ms, every round failed.
//!
//! Length: `ROUNDS_DEFAULT` (4) rounds (CI, 2 kills and 2 stops, about a minute once the
//! image is built); `ENTREPOT_CONTAINER_CAMPAIGN_ROUNDS=N` (at most 500) for a longer
//! campaign, `ENTREPOT_CONTAINER_CAMPAIGN_FAULTS` (`kill`, `stop`, or both
//! comma-separated; default both, alternated), `ENTREPOT_CONTAINER_CAMPAIGN_VERBOSE=1`
//! prints every client reconnect. Fails where Docker is not usable, unless
//! `ENTREPOT_TEST_ALLOW_SKIP=1`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Instant;

use crate::cluster_campaign::{faults_from_env, rounds_from_env, Fault, ROUNDS_DEFAULT};
use crate::container::docker;
use crate::elasticity::load::Endpoints;
use crate::elasticity::statefulset::{Membership, Mode, StatefulSet};
use crate::elasticity::{run_dir, warnings};
use crate::groups_campaign::{Campaign, Nodes};

const TEST: &str = "groups_leaders_killed_and_paused_in_containers_lose_nothing_and_serve_again";

#[test]
fn groups_leaders_killed_and_paused_in_containers_lose_nothing_and_serve_again() {
    if !docker::usable_for(TEST) {
        return;
    }
    let campaign = Campaign {
        name: "container campaign",
        rounds: rounds_from_env("ENTREPOT_CONTAINER_CAMPAIGN_ROUNDS", ROUNDS_DEFAULT),
        faults: faults_from_env("ENTREPOT_CONTAINER_CAMPAIGN_FAULTS"),
        verbose: std::env::var("ENTREPOT_CONTAINER_CAMPAIGN_VERBOSE").as_deref() == Ok("1"),
    };
    let image = docker::ensure_image();
    let membership = Membership::detect(image);
    let dir = run_dir("container-campaign");
    let began = Instant::now();
    let mut set = StatefulSet::new(
        "campaign",
        image,
        Mode::Groups,
        membership,
        dir.join("logs"),
    );
    set.start_initial();
    eprintln!(
        "container campaign: pods 0..3 ready in {:.1} s, their logs in {}",
        began.elapsed().as_secs_f64(),
        set.logs_dir().display()
    );
    campaign.run(&mut set);
    // Evidence for passing runs too (a failed run's are saved as the set drops).
    set.save_logs();
    eprintln!(
        "container campaign: {:.0} s from the first pod's start",
        began.elapsed().as_secs_f64()
    );
}

/// Pods: `docker kill --signal KILL` and a new container on the volume; `docker pause`
/// and `unpause`.
impl Nodes for StatefulSet {
    fn running(&self) -> Vec<u64> {
        self.pods.keys().copied().collect()
    }

    fn amqp(&self, id: u64) -> SocketAddr {
        self.pods[&id].amqp
    }

    fn led_addresses(&self, ids: &[u64]) -> BTreeMap<u64, Vec<String>> {
        StatefulSet::led_addresses(self, ids)
    }

    fn fault(&mut self, id: u64, fault: Fault, endpoints: &Endpoints) {
        match fault {
            Fault::Kill => {
                // The name goes with the pod's IP address, at the fault (see the module
                // docs: a connect to a deleted container's address hangs).
                endpoints.forget(id);
                self.kill(id);
            }
            Fault::Stop => self.pause(id, true),
        }
    }

    fn restore(&mut self, id: u64, fault: Fault, endpoints: &Endpoints) {
        match fault {
            Fault::Kill => self.start_pod(id, |addr| endpoints.resolvable(id, addr)),
            Fault::Stop => self.pause(id, false),
        }
        endpoints.set(id, self.pods[&id].amqp);
    }

    fn evidence(&self) -> String {
        self.save_logs();
        let dir = self.logs_dir();
        format!("{}container logs: {}\n", warnings(dir), dir.display())
    }
}
