//! A stand-in for the broker's state machine: what the replicated commands mean, kept in
//! memory, so the Raft plumbing can be built and tested before the broker is wired in.
//!
//! Per address, the stored messages by id (ids are consecutive per address, assigned in
//! apply order, so every replica assigns the same ones); per subscription, a cursor floor.
//! Applying is deterministic and total: a settle of an unknown id, or a cursor moving
//! backwards, changes nothing.
//!
//! Does not: persist anything (snapshots are persisted by `state_machine.rs`), dispatch
//! to consumers, or bound memory — the broker's queues will replace it.
//!
//! ```text
//! // Format (snapshot data): { version: u8 | addresses: u32 | addresses × { address: str
//! //   | next_id: u64 | n: u32 | n × { id: u64 | body: bytes } } | cursors: u32
//! //   | cursors × { subscription: str | floor: u64 } }
//! ```

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::codec::{check_limit, Decoder, Encoder};
use crate::error::{ClusterError, Result};
use crate::types::{Request, Response, MAX_ADDRESS_BYTES, MAX_MESSAGE_BYTES};

/// Version byte of the snapshot data encoding.
pub const SNAPSHOT_DATA_VERSION: u8 = 1;
/// Most addresses or subscriptions a snapshot may hold.
pub const MAX_SNAPSHOT_ADDRESSES: usize = 1 << 20;
/// Most messages one address may hold in a snapshot.
pub const MAX_SNAPSHOT_MESSAGES: usize = 1 << 30;

/// The replicated state of the stand-in: stored messages and subscription cursors.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Model {
    addresses: BTreeMap<String, AddressState>,
    cursors: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct AddressState {
    /// Id the next produced message gets.
    next_id: u64,
    /// Messages not yet settled, by id.
    messages: BTreeMap<u64, Bytes>,
}

impl Model {
    /// Applies one command.
    pub fn apply(&mut self, request: &Request) -> Response {
        match request {
            Request::Produce { address, messages } => {
                let state = self.addresses.entry(address.clone()).or_default();
                let first_id = state.next_id;
                for m in messages {
                    state.messages.insert(state.next_id, m.clone());
                    state.next_id += 1;
                }
                Response::Produced {
                    first_id,
                    count: messages.len() as u32,
                }
            }
            Request::Settle {
                address,
                message_ids,
            } => {
                let removed = self.addresses.get_mut(address).map_or(0, |s| {
                    message_ids
                        .iter()
                        .filter(|id| s.messages.remove(id).is_some())
                        .count()
                });
                Response::Settled {
                    removed: removed as u32,
                }
            }
            Request::Cursor {
                subscription,
                floor,
            } => {
                let at = self.cursors.entry(subscription.clone()).or_default();
                *at = (*at).max(*floor);
                Response::CursorMoved { floor: *at }
            }
            // Broker operations mean nothing to the stand-in.
            Request::Ops(_) => Response::None,
        }
    }

    /// The unsettled messages of `address`, by id.
    pub fn messages(&self, address: &str) -> Vec<(u64, Bytes)> {
        self.addresses
            .get(address)
            .map(|s| s.messages.iter().map(|(id, m)| (*id, m.clone())).collect())
            .unwrap_or_default()
    }

    /// A subscription's floor (0 if it never moved).
    pub fn cursor(&self, subscription: &str) -> u64 {
        self.cursors.get(subscription).copied().unwrap_or(0)
    }

    /// Encodes the whole model (snapshot data).
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut e = Encoder::default();
        e.u8(SNAPSHOT_DATA_VERSION);
        check_limit(
            "snapshot addresses",
            self.addresses.len(),
            MAX_SNAPSHOT_ADDRESSES,
        )?;
        e.u32(self.addresses.len() as u32);
        for (address, state) in &self.addresses {
            check_limit("address", address.len(), MAX_ADDRESS_BYTES)?;
            e.str(address);
            e.u64(state.next_id);
            check_limit(
                "snapshot messages",
                state.messages.len(),
                MAX_SNAPSHOT_MESSAGES,
            )?;
            e.u32(state.messages.len() as u32);
            for (id, body) in &state.messages {
                e.u64(*id);
                e.bytes(body);
            }
        }
        check_limit(
            "snapshot cursors",
            self.cursors.len(),
            MAX_SNAPSHOT_ADDRESSES,
        )?;
        e.u32(self.cursors.len() as u32);
        for (name, floor) in &self.cursors {
            check_limit("subscription", name.len(), MAX_ADDRESS_BYTES)?;
            e.str(name);
            e.u64(*floor);
        }
        Ok(e.buf)
    }

    /// Decodes what [`Model::encode`] wrote; bodies are slices of `data`.
    pub fn decode(data: Bytes) -> Result<Model> {
        let mut d = Decoder::new(data, "snapshot data");
        let version = d.u8()?;
        if version != SNAPSHOT_DATA_VERSION {
            return Err(ClusterError::UnsupportedVersion {
                what: "snapshot data",
                found: u16::from(version),
                supported: u16::from(SNAPSHOT_DATA_VERSION),
            });
        }
        let mut model = Model::default();
        let n = d.count("snapshot addresses", MAX_SNAPSHOT_ADDRESSES, 14)?;
        for _ in 0..n {
            let address = d.str("address", MAX_ADDRESS_BYTES)?;
            let mut state = AddressState {
                next_id: d.u64()?,
                ..Default::default()
            };
            let m = d.count("snapshot messages", MAX_SNAPSHOT_MESSAGES, 12)?;
            for _ in 0..m {
                let id = d.u64()?;
                state
                    .messages
                    .insert(id, d.bytes("message", MAX_MESSAGE_BYTES)?);
            }
            model.addresses.insert(address, state);
        }
        let n = d.count("snapshot cursors", MAX_SNAPSHOT_ADDRESSES, 10)?;
        for _ in 0..n {
            let name = d.str("subscription", MAX_ADDRESS_BYTES)?;
            model.cursors.insert(name, d.u64()?);
        }
        d.finish()?;
        Ok(model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn produce(address: &str, bodies: &[&'static [u8]]) -> Request {
        Request::Produce {
            address: address.into(),
            messages: bodies.iter().map(|b| Bytes::from_static(b)).collect(),
        }
    }

    #[test]
    fn produce_settle_and_cursor_apply_deterministically() {
        let mut m = Model::default();
        assert_eq!(
            m.apply(&produce("q", &[b"a", b"b", b"c"])),
            Response::Produced {
                first_id: 0,
                count: 3
            }
        );
        assert_eq!(
            m.apply(&produce("q", &[b"d"])),
            Response::Produced {
                first_id: 3,
                count: 1
            }
        );
        let settle = Request::Settle {
            address: "q".into(),
            message_ids: vec![1, 1, 9],
        };
        assert_eq!(m.apply(&settle), Response::Settled { removed: 1 });
        let ids: Vec<u64> = m.messages("q").iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, [0, 2, 3]);
        m.apply(&Request::Cursor {
            subscription: "s".into(),
            floor: 5,
        });
        assert_eq!(
            m.apply(&Request::Cursor {
                subscription: "s".into(),
                floor: 2
            }),
            Response::CursorMoved { floor: 5 }
        );
    }

    #[test]
    fn snapshot_data_round_trips_and_rejects_damage() {
        let mut m = Model::default();
        m.apply(&produce("q1", &[b"x", b"yy"]));
        m.apply(&produce("q2", &[b"zzz"]));
        m.apply(&Request::Settle {
            address: "q1".into(),
            message_ids: vec![0],
        });
        m.apply(&Request::Cursor {
            subscription: "c:l".into(),
            floor: 7,
        });
        let data = m.encode().unwrap();
        assert_eq!(Model::decode(Bytes::from(data.clone())).unwrap(), m);
        for cut in 0..data.len() {
            assert!(Model::decode(Bytes::copy_from_slice(&data[..cut])).is_err());
        }
    }
}
