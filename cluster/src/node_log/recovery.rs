//! Rebuilding every group's state from the node log at open: one scan, oldest record
//! first, applying each record to its group as the live path did.
//!
//! The segment log has already cut a torn or corrupt tail (`entrepot_storage` recovery),
//! so what is scanned is a prefix of what was appended. A record this build cannot read,
//! or one that breaks its group's order (an entry at or below the group's last without a
//! truncation between), is [`ClusterError::NodeLogRecord`] with its offset: the node
//! must not start on a log it misreads. Bounded: the scan stops at the log's end as it
//! was at open, and the groups at [`MAX_GROUPS_PER_NODE`](super::MAX_GROUPS_PER_NODE).

use std::collections::HashMap;

use entrepot_storage::Log;

use super::group::GroupState;
use super::record::{self, NodeRecord, NODE_LOG_FLAG};
use crate::error::{ClusterError, Result};
use crate::placement::GroupId;
use crate::types::LogId;

/// Every group's state as the log leaves it.
pub(crate) fn recover(log: &Log) -> Result<HashMap<GroupId, GroupState>> {
    let mut groups = HashMap::new();
    let end = log.next_offset();
    let mut reader = log.reader(log.first_offset());
    while reader.offset() < end {
        let Some(record) = reader.next_record()? else {
            break;
        };
        let offset = record.offset;
        if record.flags != NODE_LOG_FLAG {
            return Err(ClusterError::ForeignRecord {
                offset,
                flags: record.flags,
            });
        }
        let at = |source: ClusterError, group: Option<GroupId>| ClusterError::NodeLogRecord {
            offset,
            group,
            source: Box::new(source),
        };
        let (group, what) = record::decode(record.payload).map_err(|e| at(e, None))?;
        apply(log, &mut groups, offset, group, what).map_err(|e| at(e, Some(group)))?;
    }
    Ok(groups)
}

fn apply(
    log: &Log,
    groups: &mut HashMap<GroupId, GroupState>,
    offset: u64,
    group: GroupId,
    what: NodeRecord,
) -> Result<()> {
    if let NodeRecord::Remove = what {
        groups.remove(&group);
        return Ok(());
    }
    if !groups.contains_key(&group) {
        super::check_group_count(groups.len())?;
    }
    let state = groups.entry(group).or_default();
    match what {
        NodeRecord::Entry(id) => state.push(offset, id)?,
        NodeRecord::Truncate { since } => {
            if let Some(last) = state.truncate(since) {
                state.set_last(entry_log_id(log, last, group)?);
            }
        }
        NodeRecord::Purge(id) => state.purge(id, offset),
        NodeRecord::Vote(vote) => state.set_vote(vote, offset),
        NodeRecord::Remove => {}
    }
    Ok(())
}

/// The log id of the entry record of `group` at `offset` (after a truncation, the new
/// last entry).
pub(crate) fn entry_log_id(log: &Log, offset: u64, group: GroupId) -> Result<LogId> {
    match record::decode(log.read(offset)?.payload)? {
        (found, NodeRecord::Entry(id)) if found == group => Ok(id),
        _ => Err(ClusterError::NotAnEntry { offset, group }),
    }
}
