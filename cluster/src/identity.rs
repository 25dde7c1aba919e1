//! Who this node is and who its peers are, for StatefulSets and for hand-run clusters.
//!
//! A StatefulSet names its pods `<set>-<ordinal>` (`entrepot-0`, `entrepot-1`, …), so the
//! ordinal is a stable node id that survives rescheduling. `--node-id` overrides it for
//! processes started by hand. Peers come as `--peers id=host:port,…`, or `host:port,…`
//! with each host carrying its ordinal (`entrepot-1.entrepot.default.svc:5673`). A member
//! address may name the member's AMQP port after a slash (`127.0.0.1:7001/5601`, default
//! [`DEFAULT_AMQP_PORT`]): followers forward clients there.
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
    let (id, addr) = match item.split_once('=') {
        Some((id, addr)) => {
            let id = id
                .trim()
                .parse()
                .map_err(|_| invalid(item, "id before `=` is not a number"))?;
            (Some(id), addr.trim())
        }
        None => (None, item),
    };
    let (addr, amqp_port) = match addr.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (addr, None),
    };
    if amqp_port.is_some_and(|p| p.parse::<u16>().is_err()) {
        return Err(invalid(item, "AMQP port after `/` is not a port number"));
    }
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| invalid(item, "missing `:port`"))?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(invalid(item, "expected host:port"));
    }
    if addr.len() > MAX_NODE_ADDR_BYTES {
        return Err(invalid(item, "address too long"));
    }
    let id = match id {
        Some(id) => id,
        None => node_id_from_hostname(host)
            .ok_or_else(|| invalid(item, "host has no ordinal; write id=host:port"))?,
    };
    Ok(Peer {
        id,
        addr: match amqp_port {
            Some(p) => format!("{addr}/{p}"),
            None => addr.to_string(),
        },
    })
}

/// The initial members of a StatefulSet of `size` pods behind the headless `service`:
/// `<set>-<i>.<service>:<peer_port>/<amqp_port>` for `i` in `0..size`, where `<set>` is
/// this pod's `hostname` without its ordinal. Names resolve when a peer is dialled, so
/// pods that are not up yet are fine.
pub fn statefulset_peers(
    hostname: &str,
    service: &str,
    size: u32,
    peer_port: u16,
    amqp_port: u16,
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
    let list: Vec<String> = (0..size)
        .map(|i| format!("{i}={set}-{i}.{service}:{peer_port}/{amqp_port}"))
        .collect();
    parse_peers(&list.join(","))
}

/// The AMQP port a member serves clients on when its address does not name one.
pub const DEFAULT_AMQP_PORT: u16 = 5672;

/// The inter-node part of a member address `host:port[/amqp_port]`.
pub fn peer_addr(member_addr: &str) -> &str {
    member_addr.split_once('/').map_or(member_addr, |(a, _)| a)
}

/// Where a member serves AMQP clients: its host with the port after `/`, or
/// [`DEFAULT_AMQP_PORT`]. Followers forward client connections there when it leads.
pub fn amqp_addr(member_addr: &str) -> String {
    let (peer, port) = match member_addr.split_once('/') {
        Some((a, p)) => (a, p.parse().unwrap_or(DEFAULT_AMQP_PORT)),
        None => (member_addr, DEFAULT_AMQP_PORT),
    };
    let host = peer.rsplit_once(':').map_or(peer, |(h, _)| h);
    format!("{host}:{port}")
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
        let peers = statefulset_peers("entrepot-1", "entrepot.ns.svc", 3, 5673, 5672).unwrap();
        let addrs: Vec<_> = peers.iter().map(|p| (p.id, p.addr.as_str())).collect();
        assert_eq!(
            addrs,
            [
                (0, "entrepot-0.entrepot.ns.svc:5673/5672"),
                (1, "entrepot-1.entrepot.ns.svc:5673/5672"),
                (2, "entrepot-2.entrepot.ns.svc:5673/5672"),
            ]
        );
        assert!(statefulset_peers("laptop", "s", 3, 1, 2).is_err());
        assert!(statefulset_peers("my-laptop", "s", 3, 1, 2).is_err());
    }

    #[test]
    fn member_addresses_name_their_amqp_port() {
        let peers = parse_peers("1=127.0.0.1:7001/5601,entrepot-2.e:5673").unwrap();
        assert_eq!(peers[0].addr, "127.0.0.1:7001/5601");
        assert_eq!(peer_addr(&peers[0].addr), "127.0.0.1:7001");
        assert_eq!(amqp_addr(&peers[0].addr), "127.0.0.1:5601");
        assert_eq!(peer_addr(&peers[1].addr), "entrepot-2.e:5673");
        assert_eq!(amqp_addr(&peers[1].addr), "entrepot-2.e:5672");
        assert!(parse_peers("1=h:1/x").is_err());
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
