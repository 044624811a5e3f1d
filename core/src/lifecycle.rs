//! The names a VM's lifecycle, its health, its jobs and its failovers go by, as types.
//! Each has exactly one spelling: `as_str`/`Display` write it, `FromStr` reads it, and
//! nothing else in tern spells it out.

/// A name read back (from the catalog, from the wire) that is not one of the type's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{got:?} is not a {what} (one of: {known})")]
pub struct UnknownName {
    pub what: &'static str,
    pub got: String,
    pub known: String,
}

macro_rules! named {
    ($(#[$doc:meta])* $name:ident, $what:literal { $($(#[$vdoc:meta])* $variant:ident => $s:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $s),+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = UnknownName;
            fn from_str(s: &str) -> Result<Self, UnknownName> {
                $name::ALL.iter().copied().find(|v| v.as_str() == s).ok_or_else(|| UnknownName {
                    what: $what,
                    got: s.to_string(),
                    known: $name::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>().join(", "),
                })
            }
        }
    };
}

named!(
    /// Where a VM stands in the circle: protected, failed over, committed, reprotected
    /// back to the primary site, failed back, failback committed, protected again.
    VmState, "VM state" {
        /// Replicated from its agent to this site.
        Protected => "protected",
        /// Running from a failover's output; the point can still change.
        FailedOver => "failed-over",
        /// The failover is final: points and journals are gone, the base images hold the
        /// failover point.
        FailoverCommitted => "failover-committed",
        /// The recovered VM is replicated back to a master target on the primary site.
        Reprotected => "reprotected",
        /// The master target's disks hold the recovered VM's last point.
        FailedBack => "failed-back",
        /// The failback is final; replication from the primary site can be reversed.
        FailbackCommitted => "failback-committed",
    }
);

impl VmState {
    /// Whether a VM in this state may go to `next`: the only changes tern makes.
    pub fn can_become(self, next: VmState) -> bool {
        use VmState::*;
        matches!(
            (self, next),
            (Protected, FailedOver)
                | (FailedOver, Protected)
                | (FailedOver, FailoverCommitted)
                | (FailoverCommitted, Reprotected)
                | (Reprotected, FailedBack)
                | (Reprotected, FailoverCommitted)
                | (FailedBack, FailbackCommitted)
                | (FailbackCommitted, Protected)
        )
    }

    /// An agent's (or recovered VM's agent's) replication is accepted in this state.
    pub fn takes_replication(self) -> bool {
        matches!(self, VmState::Protected | VmState::Reprotected)
    }

    /// What `drctl status` shows: a protected VM without a point yet is in its initial sync.
    pub fn shown(self, has_points: bool) -> &'static str {
        match self {
            VmState::Protected if !has_points => "initial-sync",
            s => s.as_str(),
        }
    }
}

named!(
    /// How far a VM's RPO and replication are from its policy.
    Health, "health" {
        Normal => "normal",
        /// RPO above the policy's threshold.
        Warning => "warning",
        /// RPO above twice the threshold, the agent away longer than it, stored data
        /// damaged, or replication failing on the server's side.
        Critical => "critical",
    }
);

named!(
    /// Long work the process server does in the background, followed with `drctl jobs`.
    JobKind, "job kind" {
        InitialSync => "initial-sync",
        TestFailover => "test-failover",
        PlannedFailover => "planned-failover",
        UnplannedFailover => "unplanned-failover",
        ChangePoint => "change-point",
        Failback => "failback",
        /// An operation of a recovery plan over all its VMs (the job's VM is the plan's name).
        Plan => "plan",
        /// A failback rehearsed on scratch copies (`drctl failback --drill`).
        FailbackDrill => "failback-drill",
    }
);

named!(
    JobState, "job state" {
        Running => "running",
        Succeeded => "succeeded",
        Failed => "failed",
    }
);

named!(
    /// When a reprotected VM's changes reach the master target's disks.
    SyncMode, "sync mode" {
        /// Kept in a journal on the master target, applied onto the target disks at failback.
        Before => "before",
        /// Written onto the target disks as they arrive (a full download).
        During => "during",
    }
);

named!(
    FailoverKind, "failover kind" {
        /// The source was shut down cleanly and its last changes sent first.
        Planned => "planned",
        /// The source is gone: fail over to a point already here.
        Unplanned => "unplanned",
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_reads_back_and_unknown_names_say_what_is_known() {
        for s in VmState::ALL {
            assert_eq!(s.as_str().parse::<VmState>().unwrap(), *s);
        }
        for k in JobKind::ALL {
            assert_eq!(k.to_string().parse::<JobKind>().unwrap(), *k);
        }
        let err = "failedover".parse::<VmState>().unwrap_err();
        assert!(err.to_string().contains("failed-over"), "{err}");
    }

    #[test]
    fn the_circle_is_the_only_way_round() {
        use VmState::*;
        let mut s = Protected;
        for next in [FailedOver, FailoverCommitted, Reprotected, FailedBack, FailbackCommitted, Protected] {
            assert!(s.can_become(next), "{s} -> {next}");
            s = next;
        }
        assert!(!Protected.can_become(Reprotected));
        // The one way back: a reprotect can be cancelled (`drctl reprotect-cancel`).
        assert!(Reprotected.can_become(FailoverCommitted));
        assert!(!FailedBack.can_become(Reprotected));
        assert!(!FailoverCommitted.can_become(FailedOver));
        for s in VmState::ALL {
            assert!(!s.can_become(*s), "{s} -> itself");
        }
    }
}
