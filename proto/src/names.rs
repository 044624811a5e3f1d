//! The lifecycle's names on the wire: each `tern_core::lifecycle` type and its proto enum,
//! both ways. An unspecified or unknown value reads as `None`.

use crate::v1 as pb;
use tern_core::{FailoverKind, Health, JobKind, JobState, SyncMode, VmState};

macro_rules! both_ways {
    ($core:ident, $wire:ident { $($c:ident <=> $w:ident),+ $(,)? }) => {
        impl From<$core> for pb::$wire {
            fn from(v: $core) -> Self {
                match v {
                    $($core::$c => pb::$wire::$w),+
                }
            }
        }

        impl pb::$wire {
            /// The lifecycle's value as a message field holds it.
            pub fn write(v: $core) -> i32 {
                pb::$wire::from(v) as i32
            }

            /// The lifecycle's value, `None` when unspecified or unknown.
            pub fn read(v: i32) -> Option<$core> {
                match pb::$wire::try_from(v).ok()? {
                    $(pb::$wire::$w => Some($core::$c),)+
                    _ => None,
                }
            }
        }
    };
}

both_ways!(VmState, VmState {
    Protected <=> Protected,
    FailedOver <=> FailedOver,
    FailoverCommitted <=> FailoverCommitted,
    Reprotected <=> Reprotected,
    FailedBack <=> FailedBack,
    FailbackCommitted <=> FailbackCommitted,
});
both_ways!(Health, Health { Normal <=> Normal, Warning <=> Warning, Critical <=> Critical });
both_ways!(JobKind, JobKind {
    InitialSync <=> InitialSync,
    TestFailover <=> TestFailover,
    PlannedFailover <=> PlannedFailover,
    UnplannedFailover <=> UnplannedFailover,
    ChangePoint <=> ChangePoint,
    Failback <=> Failback,
    Plan <=> Plan,
    FailbackDrill <=> FailbackDrill,
});
both_ways!(JobState, JobState { Running <=> Running, Succeeded <=> Succeeded, Failed <=> Failed });
both_ways!(SyncMode, SyncMode { Before <=> Before, During <=> During });
both_ways!(FailoverKind, FailoverKind { Planned <=> Planned, Unplanned <=> Unplanned });

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_goes_over_the_wire_and_back() {
        for &s in VmState::ALL {
            assert_eq!(pb::VmState::read(pb::VmState::write(s)), Some(s));
        }
        for &k in JobKind::ALL {
            assert_eq!(pb::JobKind::read(pb::JobKind::write(k)), Some(k));
        }
        for &h in Health::ALL {
            assert_eq!(pb::Health::read(pb::Health::write(h)), Some(h));
        }
        assert_eq!(pb::VmState::read(0), None);
        assert_eq!(pb::VmState::read(99), None);
    }
}
