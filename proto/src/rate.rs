//! A cap on bytes per second for a stream (the agent's `--max-rate`, the relay's
//! `--relay-max-rate`): sends are spaced so that the average stays under the cap. Idle time
//! earns no credit, so a burst after a quiet spell is one batch, not a backlog's worth.

use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug)]
pub struct RateLimiter {
    /// Bytes per second; 0: no cap.
    rate: u64,
    /// When the next send may start.
    next: Option<Instant>,
}

impl RateLimiter {
    pub fn new(rate: u64) -> Self {
        RateLimiter { rate, next: None }
    }

    /// Waits until `bytes` more may go, then counts them.
    pub async fn take(&mut self, bytes: u64) {
        if self.rate == 0 {
            return;
        }
        let now = Instant::now();
        let start = match self.next {
            Some(next) if next > now => {
                tokio::time::sleep_until(next).await;
                next
            }
            _ => now,
        };
        self.next = Some(start + Duration::from_secs_f64(bytes as f64 / self.rate as f64));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In the runtime's virtual time: 10 sends of 1 MB at 2 MB/s take 4.5 s (the first goes
    /// at once), a quiet spell earns nothing, and no cap means no wait.
    #[tokio::test(start_paused = true)]
    async fn sends_are_spaced_to_the_rate_and_idle_time_earns_no_credit() {
        let mut r = RateLimiter::new(2_000_000);
        let t0 = Instant::now();
        for _ in 0..10 {
            r.take(1_000_000).await;
        }
        assert_eq!(Instant::now() - t0, Duration::from_millis(4500));
        tokio::time::sleep(Duration::from_secs(60)).await;
        let t1 = Instant::now();
        r.take(1_000_000).await;
        r.take(1_000_000).await;
        assert_eq!(
            Instant::now() - t1,
            Duration::from_millis(500),
            "after idling, one batch at once, then spaced"
        );
        let mut free = RateLimiter::new(0);
        let t2 = Instant::now();
        free.take(u64::MAX).await;
        assert_eq!(Instant::now(), t2);
    }
}
