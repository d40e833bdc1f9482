//! Reading script replies: the scripts answer arrays of integers, and a reply of another
//! shape means the scripts and the code calling them disagree — a permanent error.

use redis::Value;

use crate::Error;

pub(crate) fn unexpected(script: &'static str, reply: &[Value]) -> Error {
    Error::UnexpectedReply { script, reply: format!("{reply:?}") }
}

pub(crate) fn int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(i) => Some(*i),
        _ => None,
    }
}

/// Exactly `N` integers.
pub(crate) fn ints<const N: usize>(values: &[Value]) -> Option<[i64; N]> {
    if values.len() != N {
        return None;
    }
    let mut out = [0; N];
    for (slot, value) in out.iter_mut().zip(values) {
        *slot = int(value)?;
    }
    Some(out)
}
