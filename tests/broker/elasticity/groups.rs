//! The step check of the groups-mode run (`--cluster-mode groups`, a Raft group per
//! address): what every pod's `GET /cluster` (its `/status` `groups:` section) must say
//! once a step settled, and the leaderships per node it shows.
//!
//! Settled means: every pod answers and is serving (not draining); every pod's replica of
//! the metadata group lists exactly the running pods as members and names the same
//! metadata leader, a running pod; no pod has a replica move in flight (the balancer's
//! `in-flight` 0); every address group is led by a running pod, and on its leader its
//! voters are its placement (min(3, N) running pods, no learner left). Then the
//! leaderships are judged: the address groups each node *leads* (the issue's "every node
//! within ±1 of G/N") and, apart, the ones it is the *preferred* leader of (what the
//! metadata places; on openraft 0.9 a preferred leader becomes the leader only when its
//! campaign wins, ARCHITECTURE.md "join and leave").
//!
//! Parsing is line by line over the YAML the broker writes (`raft::groups_node`): no YAML
//! crate, the fields the test needs.

use std::collections::{BTreeMap, BTreeSet};

/// The replication factor of an address group (`min(3, N)` replicas).
const REPLICATION_FACTOR: usize = 3;

/// One group open on a pod (`groups-here`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupView {
    pub group: u64,
    pub name: String,
    pub placed: BTreeSet<u64>,
    /// `None` for the metadata group (group 0).
    pub preferred: Option<u64>,
    pub voters: BTreeSet<u64>,
    pub learners: BTreeSet<u64>,
    pub leader: Option<u64>,
}

/// A pod's `groups:` section, the fields the step check reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupsStatus {
    pub drain: String,
    pub members: BTreeSet<u64>,
    pub metadata_leader: Option<u64>,
    pub moves_in_flight: u64,
    pub groups: Vec<GroupView>,
}

impl GroupsStatus {
    /// `None` when `text` has no `groups:` section (a one-group node, or garbage).
    pub fn parse(text: &str) -> Option<GroupsStatus> {
        let mut lines = text.lines().skip_while(|l| l.trim_end() != "groups:");
        lines.next()?;
        let mut status = GroupsStatus::default();
        for line in lines {
            let l = line.trim_start();
            if let Some(v) = l.strip_prefix("drain: ") {
                status.drain = v.trim().to_owned();
            } else if let Some(v) = l.strip_prefix("members: ") {
                status.members = ids(v);
            } else if let Some(v) = l.strip_prefix("metadata-leader: ") {
                status.metadata_leader = v.trim().parse().ok();
            } else if let Some(v) = l.strip_prefix("balancer: ") {
                status.moves_in_flight = field(v, "in-flight")?.parse().ok()?;
            } else if l.starts_with("- { group: ") {
                status.groups.push(GroupView {
                    group: field(l, "group")?.parse().ok()?,
                    name: field(l, "name")?.trim_matches('"').to_owned(),
                    placed: ids(field(l, "placed")?),
                    preferred: field(l, "preferred")?.parse().ok(),
                    voters: ids(field(l, "voters")?),
                    learners: ids(field(l, "learners")?),
                    leader: field(l, "leader")?.parse().ok(),
                });
            }
        }
        Some(status)
    }
}

/// What a settled step shows: leaderships per running pod (address groups only).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Leaderships {
    /// Groups each pod leads.
    pub led: BTreeMap<u64, u64>,
    /// Groups each pod is the preferred leader of.
    pub preferred: BTreeMap<u64, u64>,
    /// The metadata group's leader.
    pub metadata: u64,
}

impl Leaderships {
    /// Every pod leads within ±1 of G/N address groups.
    pub fn led_balanced(&self) -> bool {
        balanced(&self.led)
    }

    /// Every pod is the preferred leader of within ±1 of G/N address groups.
    pub fn preferred_balanced(&self) -> bool {
        balanced(&self.preferred)
    }
}

/// |count − G/N| ≤ 1 for every node, in integers (G the sum, N the nodes).
fn balanced(per_node: &BTreeMap<u64, u64>) -> bool {
    let n = per_node.len() as u64;
    let g: u64 = per_node.values().sum();
    per_node.values().all(|c| (c * n).abs_diff(g) <= n)
}

/// Whether the pods' statuses show a settled step with `addresses` address groups;
/// Ok(the leaderships), Err(what is not settled yet).
pub fn settled(
    statuses: &BTreeMap<u64, Option<GroupsStatus>>,
    addresses: usize,
) -> Result<Leaderships, String> {
    let pods: BTreeSet<u64> = statuses.keys().copied().collect();
    let mut metadata = None;
    for (k, s) in statuses {
        let s = s.as_ref().ok_or(format!(
            "entrepot-{k} does not answer GET /cluster in groups mode"
        ))?;
        if s.drain != "serving" {
            return Err(format!("entrepot-{k} is {}", s.drain));
        }
        if s.members != pods {
            return Err(format!(
                "entrepot-{k} lists members {:?}, the running pods are {pods:?}",
                s.members
            ));
        }
        let named = s
            .metadata_leader
            .ok_or(format!("entrepot-{k} knows no metadata leader"))?;
        if *metadata.get_or_insert(named) != named {
            return Err(format!(
                "pods disagree on the metadata leader: {statuses:?}"
            ));
        }
        if s.moves_in_flight > 0 {
            return Err(format!(
                "entrepot-{k} has {} replica moves in flight",
                s.moves_in_flight
            ));
        }
    }
    let metadata = metadata.ok_or("no pod")?;
    if !pods.contains(&metadata) {
        return Err(format!(
            "the metadata leader {metadata} is not a running pod"
        ));
    }
    let by_leader = groups_by_leader(statuses);
    let address_groups: Vec<&GroupView> = by_leader.values().filter(|g| g.group != 0).collect();
    if address_groups.len() != addresses {
        let led: Vec<&str> = address_groups.iter().map(|g| g.name.as_str()).collect();
        return Err(format!(
            "{} of {addresses} address groups are led by a running pod: {led:?}",
            address_groups.len()
        ));
    }
    let replicas = REPLICATION_FACTOR.min(pods.len());
    let mut leads = Leaderships {
        led: pods.iter().map(|k| (*k, 0)).collect(),
        preferred: pods.iter().map(|k| (*k, 0)).collect(),
        metadata,
    };
    for g in address_groups {
        if g.voters != g.placed || !g.learners.is_empty() {
            return Err(format!(
                "group {} ({}): voters {:?} learners {:?}, placed {:?}",
                g.group, g.name, g.voters, g.learners, g.placed
            ));
        }
        if g.placed.len() != replicas || !g.placed.is_subset(&pods) {
            return Err(format!(
                "group {} ({}) is placed on {:?}: not {replicas} of the running pods {pods:?}",
                g.group, g.name, g.placed
            ));
        }
        if let Some(leader) = g.leader {
            *leads.led.entry(leader).or_default() += 1;
        }
        let preferred = g.preferred.filter(|p| pods.contains(p)).ok_or(format!(
            "group {} ({}) prefers {:?}, not a running pod",
            g.group, g.name, g.preferred
        ))?;
        *leads.preferred.entry(preferred).or_default() += 1;
    }
    Ok(leads)
}

/// Every group as the pod that leads it sees it.
fn groups_by_leader(statuses: &BTreeMap<u64, Option<GroupsStatus>>) -> BTreeMap<u64, GroupView> {
    let mut out = BTreeMap::new();
    for (k, s) in statuses {
        for g in s.iter().flat_map(|s| &s.groups) {
            if g.leader == Some(*k) {
                out.insert(g.group, g.clone());
            }
        }
    }
    out
}

/// Every number in a list such as `[0, 1, 2]` or `{0, 1}`.
fn ids(list: &str) -> BTreeSet<u64> {
    list.trim_matches(['[', ']', '{', '}', ' '])
        .split(',')
        .filter_map(|x| x.trim().parse().ok())
        .collect()
}

/// The value after `key: ` up to the next `,`, space or `}` at depth 0 (a list in
/// `[]`/`{}` whole).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let rest = line.split(&format!("{key}: ")).nth(1)?;
    let end = match rest.chars().next()? {
        '[' => rest.find(']')? + 1,
        '{' => rest.find('}')? + 1,
        _ => rest.find([',', ' ', '}']).unwrap_or(rest.len()),
    };
    Some(&rest[..end])
}

#[cfg(test)]
mod judging {
    use std::collections::BTreeMap;

    use super::{settled, GroupsStatus};

    /// A pod's status as the broker writes it (`raft::groups_node::status_extra`).
    fn text(
        node: u64,
        members: &str,
        groups: &[(u64, &str, &str, u64, &str, &str, u64)],
    ) -> String {
        let mut out = format!(
            "groups:\n  mode: groups\n  node: {node}\n  drain: serving\n  members: {members}\n  \
             metadata-leader: 0\n  open: 3\n  led: 1\n  served: 1\n  balancer: {{ started: 4, \
             done: 4, failed: 0, in-flight: 0 }}\n  led-addresses:\n    - {{ address: \"q\", \
             group: 1 }}\n  groups-here:\n"
        );
        for (group, name, placed, preferred, voters, learners, leader) in groups {
            out += &format!(
                "    - {{ group: {group}, name: \"{name}\", placed: {placed}, preferred: \
                 {preferred}, voters: {voters}, learners: {learners}, leader: {leader}, \
                 applied: 10, committed: 10 }}\n"
            );
        }
        out
    }

    fn three_pods(
        pod2_groups: &[(u64, &str, &str, u64, &str, &str, u64)],
    ) -> BTreeMap<u64, Option<GroupsStatus>> {
        let g = |k: u64| -> Vec<(u64, &str, &str, u64, &str, &str, u64)> {
            vec![(k + 1, "q", "[0, 1, 2]", k, "{0, 1, 2}", "{}", k)]
        };
        (0..3u64)
            .map(|k| {
                let groups = if k == 2 { pod2_groups.to_vec() } else { g(k) };
                (k, GroupsStatus::parse(&text(k, "[0, 1, 2]", &groups)))
            })
            .collect()
    }

    #[test]
    fn a_pods_groups_section_parses() {
        let s = GroupsStatus::parse(&text(
            1,
            "[0, 1, 2]",
            &[(4, "q-d", "[0, 1, 2]", 1, "{0, 1, 2}", "{3}", 2)],
        ))
        .expect("parses");
        assert_eq!(s.drain, "serving");
        assert_eq!(s.members, [0, 1, 2].into());
        assert_eq!(s.metadata_leader, Some(0));
        assert_eq!(s.moves_in_flight, 0);
        let g = &s.groups[0];
        assert_eq!(
            (g.group, g.name.as_str(), g.preferred, g.leader),
            (4, "q-d", Some(1), Some(2))
        );
        assert_eq!(g.placed, [0, 1, 2].into());
        assert_eq!(g.learners, [3].into());
        assert!(GroupsStatus::parse("role: leader\nleader: 1\n").is_none());
    }

    #[test]
    fn a_step_is_settled_only_with_exact_members_and_voters() {
        let good = three_pods(&[(3, "q", "[0, 1, 2]", 2, "{0, 1, 2}", "{}", 2)]);
        let leads = settled(&good, 3).expect("settled");
        assert_eq!(leads.led, [(0, 1), (1, 1), (2, 1)].into());
        assert!(leads.led_balanced() && leads.preferred_balanced());
        // A learner left over, voters not the placement.
        let learner = three_pods(&[(3, "q", "[0, 1, 2]", 2, "{0, 1, 2}", "{3}", 2)]);
        assert!(settled(&learner, 3).unwrap_err().contains("learners"));
        let voters = three_pods(&[(3, "q", "[0, 1, 2]", 2, "{0, 1, 2, 4}", "{}", 2)]);
        assert!(settled(&voters, 3).unwrap_err().contains("voters"));
        // A group with no running leader.
        assert!(settled(&good, 4).unwrap_err().contains("3 of 4"));
        // A pod that still lists a drained member.
        let mut stale = good.clone();
        stale.insert(1, GroupsStatus::parse(&text(1, "[0, 1, 2, 3]", &[])));
        assert!(settled(&stale, 3).unwrap_err().contains("members"));
        // A pod that does not answer.
        let mut silent = good;
        silent.insert(1, None);
        assert!(settled(&silent, 3).is_err());
    }

    #[test]
    fn leaderships_are_judged_against_g_over_n() {
        // Pod 2 leads all three groups (pods 0 and 1 lead none): not balanced, while the
        // preferred leaders are.
        let mut all_on_2 = three_pods(&[
            (1, "a", "[0, 1, 2]", 0, "{0, 1, 2}", "{}", 2),
            (2, "b", "[0, 1, 2]", 1, "{0, 1, 2}", "{}", 2),
            (3, "c", "[0, 1, 2]", 2, "{0, 1, 2}", "{}", 2),
        ]);
        for k in 0..2 {
            all_on_2.insert(k, GroupsStatus::parse(&text(k, "[0, 1, 2]", &[])));
        }
        let leads = settled(&all_on_2, 3).expect("settled");
        assert_eq!(leads.led, [(0, 0), (1, 0), (2, 3)].into());
        assert!(!leads.led_balanced());
        assert!(leads.preferred_balanced());
    }
}
