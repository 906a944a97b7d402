//! Optional mapping of events to OCSF 1.1 "API Activity" (class 6003) records for SIEMs.
//!
//! The mapping is a convenience for ingestion: `events.jsonl` stays the record that is hashed,
//! signed and verified; `ocsf.jsonl` is derived from it and carries each event's hash in
//! `metadata.uid` so a SIEM record can be traced back.

use serde_json::{json, Value};

use crate::event::{parse_time, Event};
use crate::hash::{to_hex, Hash};

/// OCSF `activity_id` for an action's verb (`job.created` → Create).
fn activity(action: &str) -> (u32, &'static str) {
    let verb = action.rsplit('.').next().unwrap_or(action);
    match verb {
        "created" | "create" | "submitted" | "issued" | "started" | "launched" => (1, "Create"),
        "read" | "listed" | "exported" | "viewed" | "connected" => (2, "Read"),
        "updated" | "update" | "paused" | "resumed" | "suspended" | "restored" | "rotated" | "scrubbed" => {
            (3, "Update")
        }
        "deleted" | "delete" | "revoked" | "terminated" | "removed" => (4, "Delete"),
        _ => (99, "Other"),
    }
}

/// The OCSF API Activity record for `event`.
pub fn api_activity(event: &Event, hash: &Hash) -> Value {
    let (activity_id, activity_name) = activity(&event.action);
    let time_ms = parse_time(&event.time).map_or(0, |t| (t.unix_timestamp_nanos() / 1_000_000) as i64);
    json!({
        "class_uid": 6003,
        "class_name": "API Activity",
        "category_uid": 6,
        "category_name": "Application Activity",
        "activity_id": activity_id,
        "activity_name": activity_name,
        "type_uid": 600300 + activity_id,
        "severity_id": 1,
        "status_id": 1,
        "time": time_ms,
        "actor": {"user": {"uid": event.actor.id, "type": event.actor.kind}},
        "api": {"operation": event.action, "service": {"name": "cella"}},
        "resources": [{"type": event.resource.kind, "uid": event.resource.id}],
        "cloud": {"provider": "cella", "account": {"uid": event.tenant}},
        "metadata": {
            "version": "1.1.0",
            "product": {"name": "Cella", "vendor_name": "Cella"},
            "uid": to_hex(hash),
            "sequence": event.seq,
            "log_name": event.chain,
        },
        "unmapped": {"details": event.details},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_verbs_to_ocsf_activities() {
        assert_eq!(activity("job.created").0, 1);
        assert_eq!(activity("session.terminated").0, 4);
        assert_eq!(activity("session.suspended").0, 3);
        assert_eq!(activity("vm.rebooted").0, 99);
    }
}
