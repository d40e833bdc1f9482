//! LockLease: checks beyond the schema. Who holds a lease is reported by the agents, not
//! decided here.

use breakwater_api::LockLease;

use super::{Assessment, Verdict, reason};
use crate::selector;

pub fn assess(lease: &LockLease) -> Assessment {
    let accepted = match (lease.spec.ttl.to_std(), selector::check(&lease.spec.pod_selector)) {
        (Err(err), _) => Verdict::fail(reason::INVALID, format!("spec.ttl: {err}")),
        (_, Err(err)) => Verdict::fail(reason::INVALID_SELECTOR, format!("spec.podSelector.{err}")),
        (Ok(ttl), Ok(())) => {
            let what = match lease.spec.holders {
                1 => "lock".to_string(),
                n => format!("semaphore of {n}"),
            };
            Verdict::ok(reason::ACCEPTED, format!("{what} with a {}s ttl", ttl.as_secs_f64()))
        }
    };
    Assessment { accepted, resolved_refs: None, targets: None }
}
