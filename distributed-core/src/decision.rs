//! Where a statement goes, and why.

use std::fmt;

/// A server of the topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// The leader.
    Leader,
    /// The follower at this index of [`Config::followers`](crate::Config::followers).
    Follower(usize),
}

impl Target {
    /// `"leader"` or `"follower"`: a label with few values, for metrics.
    pub fn kind(self) -> &'static str {
        match self {
            Target::Leader => "leader",
            Target::Follower(_) => "follower",
        }
    }
}

/// Why a [`Decision`] was made. Every variant has a short, stable [`label`](Reason::label) for
/// metrics and traces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// A write: always the leader.
    Write,
    /// The scope wrote within the lag window (or earlier in this request).
    RecentWrite,
    /// Inside a [`force_leader`](crate::force_leader) block.
    Forced,
    /// An ordinary read, served by a healthy follower.
    HealthyFollower,
    /// The scope wrote recently, and this follower has already replayed that write (causal mode).
    CaughtUpFollower,
    /// The configuration has no followers.
    NoFollowers,
    /// Every follower is down.
    NoHealthyFollower,
    /// The followers that are up are all further behind than the scope needs.
    FollowersLagging,
    /// The cache holding the pins failed or timed out; the leader is the only safe choice.
    CacheUnavailable,
    /// Causal mode with monotonic reads: a follower could serve what the scope wrote (and the
    /// tokens it was given), but none is known to have replayed as far as what the scope
    /// already read, so the leader serves it. The price of monotonic reads, counted apart from
    /// [`RecentWrite`](Reason::RecentWrite).
    MonotonicFloor,
}

impl Reason {
    /// A short `snake_case` name.
    pub fn label(self) -> &'static str {
        match self {
            Reason::Write => "write",
            Reason::RecentWrite => "recent_write",
            Reason::Forced => "forced",
            Reason::HealthyFollower => "healthy_follower",
            Reason::CaughtUpFollower => "caught_up_follower",
            Reason::NoFollowers => "no_followers",
            Reason::NoHealthyFollower => "no_healthy_follower",
            Reason::FollowersLagging => "followers_lagging",
            Reason::CacheUnavailable => "cache_unavailable",
            Reason::MonotonicFloor => "monotonic_floor",
        }
    }

    /// Every reason, for tables and dashboards.
    pub const ALL: [Reason; 10] = [
        Reason::Write,
        Reason::RecentWrite,
        Reason::Forced,
        Reason::HealthyFollower,
        Reason::CaughtUpFollower,
        Reason::NoFollowers,
        Reason::NoHealthyFollower,
        Reason::FollowersLagging,
        Reason::CacheUnavailable,
        Reason::MonotonicFloor,
    ];
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// A routing decision: the server and the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Decision {
    /// Where the statement goes.
    pub target: Target,
    /// Why.
    pub reason: Reason,
}

impl Decision {
    /// The leader, for `reason`.
    pub const fn leader(reason: Reason) -> Self {
        Self {
            target: Target::Leader,
            reason,
        }
    }

    /// Follower `index`, for `reason`.
    pub const fn follower(index: usize, reason: Reason) -> Self {
        Self {
            target: Target::Follower(index),
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct() {
        let mut labels: Vec<_> = Reason::ALL.iter().map(|r| r.label()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), Reason::ALL.len());
    }

    #[test]
    fn every_reason_is_listed_once_and_displays_its_label() {
        for (i, reason) in Reason::ALL.iter().enumerate() {
            assert!(
                !Reason::ALL[..i].contains(reason),
                "{reason:?} listed twice"
            );
            assert_eq!(reason.to_string(), reason.label());
        }
        assert_eq!(Reason::MonotonicFloor.label(), "monotonic_floor");
        assert!(Reason::ALL.contains(&Reason::MonotonicFloor));
    }
}
