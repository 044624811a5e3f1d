//! Capped exponential backoff with jitter, for reconnecting to a peer.

use std::time::Duration;

/// Delays between attempts: `first`, doubling up to `cap`, each shortened by up to a fifth
/// at random so that many clients of one restarted server do not retry in step. `reset`
/// after every successful connect, so that the next outage starts again at `first`.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    cap: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(first: Duration, cap: Duration) -> Self {
        Self { first, cap, next: first }
    }

    pub fn reset(&mut self) {
        self.next = self.first;
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.cap);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        base - base / 5 * (nanos % 1000) / 1000
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter_and_starts_over_on_reset() {
        let (first, cap) = (Duration::from_millis(200), Duration::from_secs(2));
        let mut b = Backoff::new(first, cap);
        let mut bases = Vec::new();
        for _ in 0..8 {
            let d = b.next_delay();
            let base = bases.last().map_or(first, |&p: &Duration| (p * 2).min(cap));
            assert!(d <= base && d >= base * 4 / 5, "{d:?} for a base of {base:?}");
            bases.push(base);
        }
        assert_eq!(bases.last(), Some(&cap));
        b.reset();
        assert!(b.next_delay() <= first);
    }
}
