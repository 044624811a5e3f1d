//! How far an agent's clock is off this server's: points and the write times of records
//! are dated on this server's clock (W18-A: an agent dated years ahead made a point that
//! stayed inside the retention window for good, and the journal behind it with it).

/// An agent whose clock is off this server's by more than this is warned of.
pub const WARN_MS: i64 = 2000;

/// A point whose send time is off the session's clock difference by more than this says
/// the agent's clock was set during the session (a point waits behind records on the
/// stream for less, as a rule): the difference is taken anew from it.
const STEP_MS: i64 = 10_000;

/// This server's clock minus the agent's (negative: the agent is ahead), as applied to the
/// agent's times: none within [`WARN_MS`], since hosts whose clocks agree (NTP) differ by
/// milliseconds and the Hello's trip adds some, and moving every time by that much would
/// put a write acked at T after T.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClockSkew(i64);

impl ClockSkew {
    /// The difference measured as `now - agent_ms` (the agent's clock when it sent a
    /// message that arrived at `now`); none when the agent sent no time (0).
    pub fn measured(agent_ms: i64, now: i64) -> (ClockSkew, i64) {
        let seen = if agent_ms == 0 { 0 } else { now.saturating_sub(agent_ms) };
        (ClockSkew::applied(seen), seen)
    }

    fn applied(seen: i64) -> ClockSkew {
        ClockSkew(if seen.saturating_abs() > WARN_MS { seen } else { 0 })
    }

    /// `agent_ms` on this server's clock.
    pub fn to_server(self, agent_ms: i64) -> i64 {
        agent_ms.saturating_add(self.0)
    }

    /// The difference taken anew from a message the agent sent at `sent_ms` (its clock)
    /// that arrived at `now`, when it moved by more than [`STEP_MS`] since: the agent's clock
    /// was set during the session. `None` when it did not move (or no time was sent).
    pub fn rebased(self, sent_ms: i64, now: i64) -> Option<ClockSkew> {
        let (_, seen) = ClockSkew::measured(sent_ms, now);
        (sent_ms != 0 && seen.saturating_sub(self.0).saturating_abs() > STEP_MS)
            .then(|| ClockSkew::applied(seen))
    }

    /// The difference applied, in ms.
    pub fn ms(self) -> i64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_difference_within_the_margin_is_not_applied_and_a_step_is_taken_anew() {
        let now = 1_800_000_000_000;
        assert_eq!(ClockSkew::measured(0, now), (ClockSkew(0), 0), "no time sent");
        assert_eq!(ClockSkew::measured(now - 1500, now), (ClockSkew(0), 1500), "the Hello's trip");
        let (behind, _) = ClockSkew::measured(now - 3_600_000, now);
        assert_eq!(behind.to_server(now - 3_600_000), now);
        let (ahead, seen) = ClockSkew::measured(now + 86_400_000, now);
        assert_eq!((ahead.ms(), seen), (-86_400_000, -86_400_000));
        assert_eq!(ahead.rebased(now + 86_400_000 - 5000, now), None, "moved by less than a step");
        assert_eq!(ahead.rebased(0, now), None);
        assert_eq!(ahead.rebased(now + 500, now), Some(ClockSkew(0)), "set right");
        assert_eq!(ClockSkew(0).rebased(now - 20_000, now), Some(ClockSkew(20_000)));
    }
}
