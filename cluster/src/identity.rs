//! Who this node is and who its peers are, for StatefulSets and for hand-run clusters.
//!
//! A StatefulSet names its pods `<set>-<ordinal>` (`entrepot-0`, `entrepot-1`, …), so the
//! ordinal is a stable node id that survives rescheduling. `--node-id` overrides it for
//! processes started by hand. Peers come as `--peers id=host:port,…`, or `host:port,…`
//! with each host carrying its ordinal (`entrepot-1.entrepot.default.svc:5673`).
//!
//! A member address is `host:peer_port[/amqp_port[/amqps_port]]`
//! (`127.0.0.1:7001/5601/5602`): the inter-node port, then the ports the member serves
//! AMQP clients on, plain and TLS (defaults [`DEFAULT_AMQP_PORT`], [`DEFAULT_AMQPS_PORT`]).
//! A follower forwards a client to the leader's port of the same kind: plain AMQP to
//! [`amqp_addr`], amqps — still encrypted — to [`amqps_addr`]. The whole address is what
//! the Raft membership stores, so it is bounded by [`MAX_NODE_ADDR_BYTES`].
//!
//! Does not: resolve DNS (the headless-service lookup comes with the network layer), or
//! check that a peer is reachable.

use std::collections::BTreeSet;

use crate::error::{ClusterError, Result};
use crate::types::{NodeId, MAX_MEMBERS, MAX_NODE_ADDR_BYTES};

/// A member of the cluster as configured: its id and inter-node address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub id: NodeId,
    /// `host:port` of the node's inter-node listener.
    pub addr: String,
}

/// The ordinal at the end of a StatefulSet pod's hostname: `entrepot-2` → 2, also for a
/// fully qualified name (`entrepot-2.entrepot.ns.svc.cluster.local`). `None` when the
/// first label does not end in `-<digits>`.
pub fn node_id_from_hostname(hostname: &str) -> Option<NodeId> {
    let label = hostname.split('.').next()?;
    let (prefix, ordinal) = label.rsplit_once('-')?;
    if prefix.is_empty() || ordinal.is_empty() || !ordinal.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    ordinal.parse().ok()
}

/// This node's id: `--node-id` if given, otherwise the hostname's ordinal.
pub fn resolve_node_id(node_id_flag: Option<NodeId>, hostname: &str) -> Result<NodeId> {
    if let Some(id) = node_id_flag {
        return Ok(id);
    }
    node_id_from_hostname(hostname).ok_or_else(|| ClusterError::Identity {
        what: "hostname",
        value: hostname.to_string(),
        reason: "no ordinal suffix like `entrepot-0`; pass --node-id",
    })
}

/// Parses `--peers`: comma-separated `id=host:port` or `host:port` (id from the host's
/// ordinal). Ids must be unique; at most [`MAX_MEMBERS`] peers.
pub fn parse_peers(list: &str) -> Result<Vec<Peer>> {
    let mut peers = Vec::new();
    let mut seen = BTreeSet::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let peer = parse_peer(item)?;
        if !seen.insert(peer.id) {
            return Err(invalid(item, "node id appears twice"));
        }
        peers.push(peer);
    }
    if peers.len() > MAX_MEMBERS {
        return Err(ClusterError::LimitExceeded {
            what: "peers",
            len: peers.len() as u64,
            max: MAX_MEMBERS as u64,
        });
    }
    Ok(peers)
}

fn parse_peer(item: &str) -> Result<Peer> {
    let (id, member) = match item.split_once('=') {
        Some((id, member)) => {
            let id = id
                .trim()
                .parse()
                .map_err(|_| invalid(item, "id before `=` is not a number"))?;
            (Some(id), member.trim())
        }
        None => (None, item),
    };
    let parts = MemberAddr::split(member);
    if parts.extra {
        return Err(invalid(
            item,
            "expected host:peer_port[/amqp_port[/amqps_port]]",
        ));
    }
    if parts.amqp.is_some_and(|p| p.parse::<u16>().is_err()) {
        return Err(invalid(item, "AMQP port after `/` is not a port number"));
    }
    if parts.amqps.is_some_and(|p| p.parse::<u16>().is_err()) {
        return Err(invalid(
            item,
            "amqps port after the second `/` is not a port number",
        ));
    }
    let (host, port) = parts
        .peer
        .rsplit_once(':')
        .ok_or_else(|| invalid(item, "missing `:port`"))?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(invalid(item, "expected host:port"));
    }
    if member.len() > MAX_NODE_ADDR_BYTES {
        return Err(invalid(item, "address too long"));
    }
    let id = match id {
        Some(id) => id,
        None => node_id_from_hostname(host)
            .ok_or_else(|| invalid(item, "host has no ordinal; write id=host:port"))?,
    };
    Ok(Peer {
        id,
        addr: member.to_string(),
    })
}

/// The initial members of a StatefulSet of `size` pods behind the headless `service`:
/// `<set>-<i>.<service>:<peer_port>/<amqp_port>[/<amqps_port>]` for `i` in `0..size`,
/// where `<set>` is this pod's `hostname` without its ordinal (`amqps_port` when the
/// nodes serve amqps). Names resolve when a peer is dialled, so pods that are not up yet
/// are fine.
pub fn statefulset_peers(
    hostname: &str,
    service: &str,
    size: u32,
    peer_port: u16,
    amqp_port: u16,
    amqps_port: Option<u16>,
) -> Result<Vec<Peer>> {
    let set = hostname
        .split('.')
        .next()
        .and_then(|h| h.rsplit_once('-'))
        .filter(|(_, ordinal)| node_id_from_hostname(&format!("x-{ordinal}")).is_some())
        .map(|(set, _)| set.to_owned())
        .ok_or_else(|| ClusterError::Identity {
            what: "hostname",
            value: hostname.to_string(),
            reason: "peers from DNS need a StatefulSet pod name like `entrepot-0`",
        })?;
    let amqps = amqps_port.map_or_else(String::new, |p| format!("/{p}"));
    let list: Vec<String> = (0..size)
        .map(|i| format!("{i}={set}-{i}.{service}:{peer_port}/{amqp_port}{amqps}"))
        .collect();
    parse_peers(&list.join(","))
}

/// This StatefulSet pod's own member address under the headless `service`, as its peers
/// dial it: `<hostname's first label>.<service>:<peer_port>/<amqp_port>[/<amqps_port>]`
/// (what a node beyond the initial members announces when it joins).
pub fn statefulset_member_addr(
    hostname: &str,
    service: &str,
    peer_port: u16,
    amqp_port: u16,
    amqps_port: Option<u16>,
) -> Result<String> {
    let label = hostname.split('.').next().unwrap_or_default();
    let id = node_id_from_hostname(label).ok_or_else(|| ClusterError::Identity {
        what: "hostname",
        value: hostname.to_string(),
        reason: "joining from DNS needs a StatefulSet pod name like `entrepot-3`",
    })?;
    let amqps = amqps_port.map_or_else(String::new, |p| format!("/{p}"));
    let peer = parse_peer(&format!(
        "{id}={label}.{service}:{peer_port}/{amqp_port}{amqps}"
    ))?;
    Ok(peer.addr)
}

/// The AMQP port a member serves clients on when its address does not name one.
pub const DEFAULT_AMQP_PORT: u16 = 5672;
/// The amqps (TLS) port a member serves clients on when its address does not name one.
pub const DEFAULT_AMQPS_PORT: u16 = 5671;

/// A member address `host:peer_port[/amqp_port[/amqps_port]]` cut at its slashes.
struct MemberAddr<'a> {
    /// `host:peer_port`.
    peer: &'a str,
    amqp: Option<&'a str>,
    amqps: Option<&'a str>,
    /// More than three parts (never valid).
    extra: bool,
}

impl<'a> MemberAddr<'a> {
    fn split(member_addr: &'a str) -> MemberAddr<'a> {
        let mut parts = member_addr.split('/');
        MemberAddr {
            peer: parts.next().unwrap_or(member_addr),
            amqp: parts.next(),
            amqps: parts.next(),
            extra: parts.next().is_some(),
        }
    }

    /// The host with `port` (the member's port of some kind, or `default`).
    fn at(&self, port: Option<&str>, default: u16) -> String {
        let port = port.and_then(|p| p.parse().ok()).unwrap_or(default);
        let host = self.peer.rsplit_once(':').map_or(self.peer, |(h, _)| h);
        format!("{host}:{port}")
    }
}

/// The inter-node part of a member address `host:port[/amqp_port[/amqps_port]]`.
pub fn peer_addr(member_addr: &str) -> &str {
    MemberAddr::split(member_addr).peer
}

/// Where a member serves AMQP clients: its host with the port after the first `/`, or
/// [`DEFAULT_AMQP_PORT`]. Followers forward plain client connections there when it leads.
pub fn amqp_addr(member_addr: &str) -> String {
    let parts = MemberAddr::split(member_addr);
    parts.at(parts.amqp, DEFAULT_AMQP_PORT)
}

/// Where a member serves amqps clients: its host with the port after the second `/`, or
/// [`DEFAULT_AMQPS_PORT`]. Followers forward TLS connections there, still encrypted, when
/// it leads.
pub fn amqps_addr(member_addr: &str) -> String {
    let parts = MemberAddr::split(member_addr);
    parts.at(parts.amqps, DEFAULT_AMQPS_PORT)
}

fn invalid(value: &str, reason: &'static str) -> ClusterError {
    ClusterError::Identity {
        what: "peer",
        value: value.to_string(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinal_comes_from_the_first_label() {
        assert_eq!(node_id_from_hostname("entrepot-2"), Some(2));
        assert_eq!(node_id_from_hostname("entrepot-0"), Some(0));
        assert_eq!(node_id_from_hostname("my-broker-set-17"), Some(17));
        assert_eq!(
            node_id_from_hostname("entrepot-3.entrepot.default.svc.cluster.local"),
            Some(3)
        );
        for bad in [
            "entrepot",
            "entrepot-",
            "-4",
            "entrepot-x",
            "entrepot-+1",
            "",
            "host.entrepot-1",
        ] {
            assert_eq!(node_id_from_hostname(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn node_id_flag_overrides_the_hostname() {
        assert_eq!(resolve_node_id(Some(9), "entrepot-2").unwrap(), 9);
        assert_eq!(resolve_node_id(None, "entrepot-2").unwrap(), 2);
        assert!(matches!(
            resolve_node_id(None, "laptop"),
            Err(ClusterError::Identity { .. })
        ));
    }

    #[test]
    fn peers_parse_with_explicit_or_ordinal_ids() {
        let peers =
            parse_peers("0=127.0.0.1:5680, entrepot-1.entrepot:5673 ,2=[::1]:5682,").unwrap();
        assert_eq!(
            peers,
            [
                Peer {
                    id: 0,
                    addr: "127.0.0.1:5680".into()
                },
                Peer {
                    id: 1,
                    addr: "entrepot-1.entrepot:5673".into()
                },
                Peer {
                    id: 2,
                    addr: "[::1]:5682".into()
                },
            ]
        );
        assert!(parse_peers("").unwrap().is_empty());
    }

    #[test]
    fn statefulset_peers_come_from_the_pod_name_and_the_headless_service() {
        let peers =
            statefulset_peers("entrepot-1", "entrepot.ns.svc", 3, 5673, 5672, None).unwrap();
        let addrs: Vec<_> = peers.iter().map(|p| (p.id, p.addr.as_str())).collect();
        assert_eq!(
            addrs,
            [
                (0, "entrepot-0.entrepot.ns.svc:5673/5672"),
                (1, "entrepot-1.entrepot.ns.svc:5673/5672"),
                (2, "entrepot-2.entrepot.ns.svc:5673/5672"),
            ]
        );
        assert!(statefulset_peers("laptop", "s", 3, 1, 2, None).is_err());
        assert!(statefulset_peers("my-laptop", "s", 3, 1, 2, None).is_err());
    }

    #[test]
    fn a_joining_pod_announces_its_own_name_under_the_service() {
        let own = |h| statefulset_member_addr(h, "entrepot.ns.svc", 5673, 5672, Some(5671));
        assert_eq!(
            own("entrepot-4").unwrap(),
            "entrepot-4.entrepot.ns.svc:5673/5672/5671"
        );
        assert_eq!(
            own("entrepot-4.entrepot.ns.svc.cluster.local").unwrap(),
            "entrepot-4.entrepot.ns.svc:5673/5672/5671"
        );
        assert!(own("laptop").is_err());
    }

    #[test]
    fn statefulset_peers_name_the_amqps_port_when_given() {
        let peers =
            statefulset_peers("entrepot-0", "entrepot.ns.svc", 2, 5673, 5672, Some(5671)).unwrap();
        let addrs: Vec<_> = peers.iter().map(|p| p.addr.as_str()).collect();
        assert_eq!(
            addrs,
            [
                "entrepot-0.entrepot.ns.svc:5673/5672/5671",
                "entrepot-1.entrepot.ns.svc:5673/5672/5671",
            ]
        );
        assert_eq!(amqps_addr(addrs[1]), "entrepot-1.entrepot.ns.svc:5671");
    }

    #[test]
    fn member_addresses_name_their_amqp_port() {
        let peers = parse_peers("1=127.0.0.1:7001/5601,entrepot-2.e:5673").unwrap();
        assert_eq!(peers[0].addr, "127.0.0.1:7001/5601");
        assert_eq!(peer_addr(&peers[0].addr), "127.0.0.1:7001");
        assert_eq!(amqp_addr(&peers[0].addr), "127.0.0.1:5601");
        assert_eq!(peer_addr(&peers[1].addr), "entrepot-2.e:5673");
        assert_eq!(amqp_addr(&peers[1].addr), "entrepot-2.e:5672");
        assert_eq!(amqps_addr(&peers[0].addr), "127.0.0.1:5671");
        assert_eq!(amqps_addr(&peers[1].addr), "entrepot-2.e:5671");
        assert!(parse_peers("1=h:1/x").is_err());
    }

    #[test]
    fn member_addresses_name_their_amqps_port() {
        let peers = parse_peers("1=127.0.0.1:7001/5601/5602, 2=[::1]:7002/5603/5604").unwrap();
        assert_eq!(peers[0].addr, "127.0.0.1:7001/5601/5602");
        assert_eq!(peer_addr(&peers[0].addr), "127.0.0.1:7001");
        assert_eq!(amqp_addr(&peers[0].addr), "127.0.0.1:5601");
        assert_eq!(amqps_addr(&peers[0].addr), "127.0.0.1:5602");
        assert_eq!(peer_addr(&peers[1].addr), "[::1]:7002");
        assert_eq!(amqp_addr(&peers[1].addr), "[::1]:5603");
        assert_eq!(amqps_addr(&peers[1].addr), "[::1]:5604");
        for bad in [
            "1=h:1/2/x",
            "1=h:1/2/",
            "1=h:1//3",
            "1=h:1/2/3/4",
            "1=h:1/2/70000",
        ] {
            assert!(
                matches!(parse_peers(bad), Err(ClusterError::Identity { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_whole_member_address_fits_the_membership_limit() {
        let host = "h".repeat(MAX_NODE_ADDR_BYTES - ":7001".len());
        assert!(parse_peers(&format!("1={host}:7001")).is_ok());
        assert!(matches!(
            parse_peers(&format!("1={host}:7001/5672/5671")),
            Err(ClusterError::Identity { .. })
        ));
    }

    #[test]
    fn bad_peer_lists_are_rejected() {
        for bad in [
            "0=a:1,0=b:2",
            "x=a:1",
            "a:1",
            "entrepot-1",
            "entrepot-1:port",
            "1=:5",
        ] {
            assert!(
                matches!(parse_peers(bad), Err(ClusterError::Identity { .. })),
                "{bad:?}"
            );
        }
    }
}
