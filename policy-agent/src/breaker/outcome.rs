//! What one access-log entry says about the call it records: whether it counts at all, and
//! whether it failed or was slow. Pure, so the definitions documented in `docs/agent.md`
//! are held to by unit tests.

use std::time::Duration;

use envoy_types::pb::envoy::data::accesslog::v3::{AccessLogCommon, HttpAccessLogEntry, ResponseFlags};

/// One call's outcome as the breaker counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Call {
    pub failed: bool,
    pub slow: bool,
}

/// The outcome of the call `entry` records, or None when it says nothing about the target:
/// a call Envoy refused itself — rate-limited (`RL`: the breaker's own rejections, or a
/// limit) or over its own connection limits (`UO`) — never reached the target.
///
/// A call failed when it got no response code, a code of 500 or above, or when Envoy flags
/// an upstream failure: connection failure or termination, remote reset, request timeout,
/// no healthy upstream. It was slow when it took longer than `slow_after` (`None`: no
/// slow-call rule), from the first byte of the request to the last byte of the response.
pub fn classify(entry: &HttpAccessLogEntry, slow_after: Option<Duration>) -> Option<Call> {
    let common = entry.common_properties.as_ref();
    let flags = common.and_then(|c| c.response_flags.as_ref());
    if flags.is_some_and(|f| f.rate_limited || f.upstream_overflow) {
        return None;
    }
    let code = entry.response.as_ref().and_then(|r| r.response_code.as_ref()).map_or(0, |c| c.value);
    let failed = code == 0 || code >= 500 || flags.is_some_and(upstream_failure);
    let slow = slow_after.is_some_and(|limit| common.and_then(duration).is_some_and(|took| took > limit));
    Some(Call { failed, slow })
}

fn upstream_failure(flags: &ResponseFlags) -> bool {
    flags.upstream_connection_failure
        || flags.upstream_connection_termination
        || flags.upstream_remote_reset
        || flags.upstream_request_timeout
        || flags.no_healthy_upstream
}

/// The whole call's duration: Envoy's `duration`, else the time to the last byte sent back.
fn duration(common: &AccessLogCommon) -> Option<Duration> {
    let d = common.duration.as_ref().or(common.time_to_last_downstream_tx_byte.as_ref())?;
    let secs = u64::try_from(d.seconds).ok()?;
    let nanos = u32::try_from(d.nanos).ok()?;
    Some(Duration::new(secs, nanos))
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::data::accesslog::v3::HttpResponseProperties;
    use envoy_types::pb::google::protobuf::{Duration as PbDuration, UInt32Value};

    use super::*;

    fn entry(code: u32, millis: i32, flags: ResponseFlags) -> HttpAccessLogEntry {
        HttpAccessLogEntry {
            common_properties: Some(AccessLogCommon {
                response_flags: Some(flags),
                duration: Some(PbDuration { seconds: 0, nanos: millis * 1_000_000 }),
                ..Default::default()
            }),
            response: Some(HttpResponseProperties {
                response_code: (code > 0).then_some(UInt32Value { value: code }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    const SLOW: Option<Duration> = Some(Duration::from_millis(100));

    #[test]
    fn failures_are_5xx_no_response_and_upstream_flags() {
        let ok = |code| classify(&entry(code, 1, ResponseFlags::default()), SLOW);
        assert_eq!(ok(200), Some(Call { failed: false, slow: false }));
        assert_eq!(ok(404), Some(Call { failed: false, slow: false }), "a 4xx is the caller's fault");
        assert_eq!(ok(429), Some(Call { failed: false, slow: false }));
        assert_eq!(ok(500), Some(Call { failed: true, slow: false }));
        assert_eq!(ok(503), Some(Call { failed: true, slow: false }));
        assert_eq!(ok(0), Some(Call { failed: true, slow: false }), "no response at all");
        let flagged = |flags| classify(&entry(200, 1, flags), SLOW).map(|c| c.failed);
        for flags in [
            ResponseFlags { upstream_connection_failure: true, ..Default::default() },
            ResponseFlags { upstream_connection_termination: true, ..Default::default() },
            ResponseFlags { upstream_remote_reset: true, ..Default::default() },
            ResponseFlags { upstream_request_timeout: true, ..Default::default() },
            ResponseFlags { no_healthy_upstream: true, ..Default::default() },
        ] {
            assert_eq!(flagged(flags), Some(true), "{flags:?}");
        }
    }

    #[test]
    fn envoys_own_refusals_do_not_count() {
        let rl = ResponseFlags { rate_limited: true, ..Default::default() };
        let uo = ResponseFlags { upstream_overflow: true, ..Default::default() };
        assert_eq!(classify(&entry(503, 1, rl), SLOW), None);
        assert_eq!(classify(&entry(503, 1, uo), SLOW), None);
    }

    #[test]
    fn slow_is_strictly_longer_than_the_threshold() {
        let call = |millis| classify(&entry(200, millis, ResponseFlags::default()), SLOW).map(|c| c.slow);
        assert_eq!(call(100), Some(false));
        assert_eq!(call(101), Some(true));
        assert_eq!(classify(&entry(200, 900, ResponseFlags::default()), None).map(|c| c.slow), Some(false));
        // A slow failure is both.
        assert_eq!(
            classify(&entry(500, 900, ResponseFlags::default()), SLOW),
            Some(Call { failed: true, slow: true })
        );
        // Without a duration a call is not slow.
        let mut bare = entry(200, 0, ResponseFlags::default());
        if let Some(common) = bare.common_properties.as_mut() {
            common.duration = None;
        }
        assert_eq!(classify(&bare, SLOW).map(|c| c.slow), Some(false));
    }
}
