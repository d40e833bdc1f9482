//! The history checker: every grant a test's contenders got (fencing token, acquired and
//! expiry times from the store's clock) and every release (the store time in the release's
//! reply), checked for the lease's guarantees. A pure function, so its own tests below show
//! that it catches each violation.

/// One grant as its holder saw it. Times are the store's clock (Redis `TIME`), in µs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub holder: String,
    pub token: i64,
    pub acquired_us: i64,
    /// The latest expiry the holder was told of (after its renewals).
    pub expires_us: i64,
    /// When the release succeeded; `None` when the holder never released (it "crashed") or
    /// its release was refused because the grant had expired.
    pub released_us: Option<i64>,
}

impl Record {
    /// The grant holds over [acquired, end): until released or expired, whichever is first.
    pub fn end_us(&self) -> i64 {
        self.released_us.map_or(self.expires_us, |released| released.min(self.expires_us))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// More than `capacity` grants held at `at_us` (their tokens). For a lock: a grant that
    /// started before the previous holder's release or expiry.
    Overlap { at_us: i64, tokens: Vec<i64> },
    /// In grant order (acquired time), a token not above the one before it.
    TokenNotIncreasing { earlier: i64, later: i64 },
    /// A release that succeeded at or after the grant's expiry.
    ReleasedAfterExpiry { token: i64 },
    /// A grant that ends before it starts.
    Empty { token: i64 },
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub grants: usize,
    pub released: usize,
    /// Grants that ended by expiry (never released).
    pub expired: usize,
    /// The most grants held at one instant.
    pub max_concurrent: usize,
}

/// Checks a history against a lease of `capacity` holders.
pub fn check(history: &[Record], capacity: usize) -> Result<Summary, Vec<Violation>> {
    let mut violations = Vec::new();

    for record in history {
        if record.released_us.is_some_and(|released| released >= record.expires_us) {
            violations.push(Violation::ReleasedAfterExpiry { token: record.token });
        }
        if record.end_us() < record.acquired_us {
            violations.push(Violation::Empty { token: record.token });
        }
    }

    let mut by_grant: Vec<&Record> = history.iter().collect();
    by_grant.sort_by_key(|r| (r.acquired_us, r.token));
    for pair in by_grant.windows(2) {
        if pair[1].token <= pair[0].token {
            violations.push(Violation::TokenNotIncreasing { earlier: pair[0].token, later: pair[1].token });
        }
    }

    // Sweep over starts and ends; intervals are half-open, so at one instant ends come
    // before starts (a grant may start exactly when the previous one ends).
    let mut events: Vec<(i64, bool, i64)> = Vec::with_capacity(history.len() * 2);
    for record in history {
        events.push((record.acquired_us, true, record.token));
        events.push((record.end_us(), false, record.token));
    }
    events.sort();
    let mut held: Vec<i64> = Vec::new();
    let mut max_concurrent = 0;
    for (at_us, starts, token) in events {
        if starts {
            held.push(token);
            max_concurrent = max_concurrent.max(held.len());
            if held.len() > capacity {
                let mut tokens = held.clone();
                tokens.sort();
                violations.push(Violation::Overlap { at_us, tokens });
            }
        } else if let Some(i) = held.iter().position(|&t| t == token) {
            held.swap_remove(i);
        }
    }

    if violations.is_empty() {
        let released = history.iter().filter(|r| r.released_us.is_some()).count();
        Ok(Summary { grants: history.len(), released, expired: history.len() - released, max_concurrent })
    } else {
        Err(violations)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(token: i64, acquired: i64, expires: i64, released: Option<i64>) -> Record {
        Record {
            holder: format!("h{token}"),
            token,
            acquired_us: acquired,
            expires_us: expires,
            released_us: released,
        }
    }

    #[test]
    fn accepts_back_to_back_grants_released_or_expired() {
        let history = [
            grant(10, 0, 100, Some(40)),
            // Starts exactly at the release.
            grant(11, 40, 140, None),
            // Starts exactly at the expiry of the unreleased grant.
            grant(12, 140, 240, Some(200)),
        ];
        assert_eq!(check(&history, 1), Ok(Summary { grants: 3, released: 2, expired: 1, max_concurrent: 1 }));
    }

    #[test]
    fn catches_an_overlap_with_a_release() {
        let history = [grant(10, 0, 100, Some(40)), grant(11, 39, 140, Some(60))];
        assert_eq!(check(&history, 1), Err(vec![Violation::Overlap { at_us: 39, tokens: vec![10, 11] }]));
    }

    #[test]
    fn catches_a_grant_before_the_previous_expiry() {
        let history = [grant(10, 0, 100, None), grant(11, 99, 200, None)];
        assert!(matches!(check(&history, 1).unwrap_err()[..], [Violation::Overlap { at_us: 99, .. }]));
    }

    #[test]
    fn catches_a_token_going_backwards() {
        let history = [grant(10, 0, 100, Some(10)), grant(9, 20, 120, Some(30))];
        assert_eq!(check(&history, 1), Err(vec![Violation::TokenNotIncreasing { earlier: 10, later: 9 }]));
        // A reused token is not an increase either.
        let history = [grant(10, 0, 100, Some(10)), grant(10, 20, 120, Some(30))];
        assert_eq!(check(&history, 1), Err(vec![Violation::TokenNotIncreasing { earlier: 10, later: 10 }]));
    }

    #[test]
    fn counts_concurrent_holders_against_the_capacity() {
        let history = [
            grant(1, 0, 100, Some(50)),
            grant(2, 10, 100, Some(50)),
            grant(3, 20, 100, Some(50)),
            grant(4, 50, 150, Some(60)),
        ];
        assert_eq!(check(&history, 3).map(|s| s.max_concurrent), Ok(3));
        let history = [
            grant(1, 0, 100, None),
            grant(2, 10, 100, None),
            grant(3, 20, 100, None),
            grant(4, 30, 130, None),
        ];
        assert_eq!(check(&history, 3), Err(vec![Violation::Overlap { at_us: 30, tokens: vec![1, 2, 3, 4] }]));
    }

    #[test]
    fn catches_a_release_after_expiry() {
        let history = [grant(1, 0, 100, Some(100))];
        assert_eq!(check(&history, 1), Err(vec![Violation::ReleasedAfterExpiry { token: 1 }]));
    }
}
