//! The topology: one leader, zero or more followers, and the timing knobs that go with them.

use std::fmt;
use std::time::Duration;

/// The longest replication-lag window we accept. Anything longer is a typo (seconds taken for
/// milliseconds, say), not a real setting: a day of pinning is "always read the leader".
pub const MAX_LAG_WINDOW: Duration = Duration::from_secs(24 * 60 * 60);

/// The longest any other timing setting may be, here and in the adapters' pool builders
/// (probe interval, back-off, re-admission ramp, timeouts): a day. Longer is a unit mistaken,
/// and no arithmetic on a setting within it can overflow.
pub const MAX_TIMING: Duration = MAX_LAG_WINDOW;

/// One database server: a name for logs and metrics, and a connection string for the adapter.
///
/// The `Debug` and `Display` forms never show a password (see [`redact_url`]).
#[derive(Clone, PartialEq, Eq)]
pub struct Node {
    name: String,
    url: String,
}

impl Node {
    /// A server called `name` (used in logs and metrics) reached at `url`.
    pub fn new(name: impl Into<String>, url: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            url: url.into(),
        }
    }

    /// The name given to this server; safe to log.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The connection string, password included: hand it to a driver, never to a log.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The connection string with any password removed; safe to log.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("url", &self.redacted_url())
            .finish()
    }
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.redacted_url())
    }
}

/// Removes the password from a connection string, in both URL form
/// (`postgres://user:secret@host/db`) and key-value form (`host=h password=secret`).
///
/// ```
/// use distributed_core::redact_url;
/// assert_eq!(redact_url("postgres://app:s3cret@db:5432/app"), "postgres://app:***@db:5432/app");
/// assert_eq!(redact_url("host=db password=s3cret user=app"), "host=db password=*** user=app");
/// ```
pub fn redact_url(url: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let authority = &rest[..authority_end];
        // The last '@' ends the userinfo: a password may itself contain '@'.
        if let Some(at) = authority.rfind('@') {
            let userinfo = &authority[..at];
            if let Some(colon) = userinfo.find(':') {
                let mut out = String::with_capacity(url.len());
                out.push_str(&url[..scheme_end + 3]);
                out.push_str(&userinfo[..colon]);
                out.push_str(":***");
                out.push_str(&rest[at..]);
                return redact_query_password(&out);
            }
        }
        return redact_query_password(url);
    }
    url.split(' ')
        .map(|part| match part.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
            _ => part.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `?password=...` in a URL's query string.
fn redact_query_password(url: &str) -> String {
    let Some(q) = url.find('?') else {
        return url.to_owned();
    };
    let (head, query) = url.split_at(q + 1);
    let query = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&");
    format!("{head}{query}")
}

/// Why a [`ConfigBuilder`] refused to build.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// [`ConfigBuilder::leader`] was never called.
    #[error("no leader configured: call .leader(name, url)")]
    NoLeader,
    /// A server was given an empty name.
    #[error("a server has an empty name")]
    EmptyName,
    /// A server was given an empty connection string.
    #[error("server `{0}` has an empty connection string")]
    EmptyUrl(String),
    /// Two servers share a name: metrics and logs could not tell them apart.
    #[error("two servers are both named `{0}`")]
    DuplicateName(String),
    /// A follower points at the leader's connection string: its "follower" reads would be leader
    /// reads, and its lag checks meaningless.
    #[error("follower `{0}` has the leader's connection string")]
    FollowerIsLeader(String),
    /// The replication-lag window is zero: every pin would expire at once.
    #[error("the replication-lag window is zero; it must cover the followers' real lag")]
    ZeroLagWindow,
    /// The replication-lag window is longer than [`MAX_LAG_WINDOW`].
    #[error("the replication-lag window of {0:?} is longer than a day; was a unit mistaken?")]
    LagWindowTooLong(Duration),
    /// A timing setting other than the lag window is zero.
    #[error("`{0}` must be greater than zero")]
    ZeroDuration(&'static str),
    /// A timing setting other than the lag window is longer than [`MAX_TIMING`].
    #[error("`{0}` of {1:?} is longer than a day; was a unit mistaken?")]
    DurationTooLong(&'static str, Duration),
}

/// A validated topology and its timing settings. Build one with [`Config::builder`].
///
/// ```
/// use std::time::Duration;
/// use distributed_core::Config;
///
/// let config = Config::builder()
///     .leader("sydney", "postgres://app:secret@leader.example/app")
///     .follower("frankfurt", "postgres://app:secret@follower-eu.example/app")
///     .lag_window(Duration::from_secs(2))
///     .build()?;
/// assert_eq!(config.followers().len(), 1);
/// # Ok::<(), distributed_core::ConfigError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Config {
    leader: Node,
    followers: Vec<Node>,
    lag_window: Duration,
    max_follower_lag: Duration,
    cache_timeout: Duration,
    readmit_ramp: Duration,
    probe_interval: Duration,
    probe_backoff_max: Duration,
}

impl Config {
    /// Starts a builder with the defaults listed on each of its methods.
    pub fn builder() -> ConfigBuilder {
        ConfigBuilder::default()
    }

    /// The leader: every write goes here.
    pub fn leader(&self) -> &Node {
        &self.leader
    }

    /// The followers, in the order given; [`Target::Follower`](crate::Target::Follower) indexes
    /// this slice.
    pub fn followers(&self) -> &[Node] {
        &self.followers
    }

    /// How long a scope stays pinned to the leader after it writes.
    pub fn lag_window(&self) -> Duration {
        self.lag_window
    }

    /// A follower measured further behind than this is skipped until it catches up.
    pub fn max_follower_lag(&self) -> Duration {
        self.max_follower_lag
    }

    /// How long a routing decision waits for the cache before reading the leader instead.
    pub fn cache_timeout(&self) -> Duration {
        self.cache_timeout
    }

    /// How long a re-admitted follower takes to get its full share of reads back.
    pub fn readmit_ramp(&self) -> Duration {
        self.readmit_ramp
    }

    /// How often the health and lag monitor looks at each follower.
    pub fn probe_interval(&self) -> Duration {
        self.probe_interval
    }

    /// The longest wait between two probes of a follower that is down.
    pub fn probe_backoff_max(&self) -> Duration {
        self.probe_backoff_max
    }
}

/// Builds a [`Config`]; [`build`](ConfigBuilder::build) validates everything at once.
#[derive(Debug, Clone)]
#[must_use]
pub struct ConfigBuilder {
    leader: Option<Node>,
    followers: Vec<Node>,
    lag_window: Duration,
    max_follower_lag: Option<Duration>,
    cache_timeout: Duration,
    readmit_ramp: Duration,
    probe_interval: Duration,
    probe_backoff_max: Duration,
}

impl Default for ConfigBuilder {
    fn default() -> Self {
        Self {
            leader: None,
            followers: Vec::new(),
            lag_window: Duration::from_secs(2),
            max_follower_lag: None,
            cache_timeout: Duration::from_millis(100),
            readmit_ramp: Duration::from_secs(10),
            probe_interval: Duration::from_millis(250),
            probe_backoff_max: Duration::from_secs(30),
        }
    }
}

impl ConfigBuilder {
    /// The leader (required).
    pub fn leader(mut self, name: impl Into<String>, url: impl Into<String>) -> Self {
        self.leader = Some(Node::new(name, url));
        self
    }

    /// Adds a follower. None at all is valid: every read then goes to the leader.
    pub fn follower(mut self, name: impl Into<String>, url: impl Into<String>) -> Self {
        self.followers.push(Node::new(name, url));
        self
    }

    /// How long a scope reads the leader after it writes; it must cover the real replication
    /// lag. Default 2 s; zero and more than a day are rejected.
    pub fn lag_window(mut self, window: Duration) -> Self {
        self.lag_window = window;
        self
    }

    /// Followers measured further behind than this are skipped. Default: the lag window, so that
    /// a follower lagging past the window cannot serve a read that the window let through.
    /// Zero and more than [`MAX_TIMING`] are rejected, as for every timing setting below.
    pub fn max_follower_lag(mut self, lag: Duration) -> Self {
        self.max_follower_lag = Some(lag);
        self
    }

    /// How long to wait for the cache before failing safe to the leader. Default 100 ms.
    pub fn cache_timeout(mut self, timeout: Duration) -> Self {
        self.cache_timeout = timeout;
        self
    }

    /// How long a follower that came back takes to get its full share of reads. Default 10 s.
    pub fn readmit_ramp(mut self, ramp: Duration) -> Self {
        self.readmit_ramp = ramp;
        self
    }

    /// How often followers are probed for health, lag and replayed position. Default 250 ms:
    /// lag is known to within one interval, and in causal mode a scope waits up to one
    /// interval longer than replication itself before its reads return to a follower. Each
    /// probe is one tiny query per server per app server.
    pub fn probe_interval(mut self, interval: Duration) -> Self {
        self.probe_interval = interval;
        self
    }

    /// The longest back-off between probes of a follower that is down. Default 30 s.
    pub fn probe_backoff_max(mut self, max: Duration) -> Self {
        self.probe_backoff_max = max;
        self
    }

    /// Validates and builds.
    ///
    /// # Errors
    /// The first problem found, as a [`ConfigError`] naming it.
    pub fn build(self) -> Result<Config, ConfigError> {
        let leader = self.leader.ok_or(ConfigError::NoLeader)?;
        let mut names: Vec<&str> = Vec::with_capacity(1 + self.followers.len());
        for node in std::iter::once(&leader).chain(&self.followers) {
            if node.name.trim().is_empty() {
                return Err(ConfigError::EmptyName);
            }
            if node.url.trim().is_empty() {
                return Err(ConfigError::EmptyUrl(node.name.clone()));
            }
            if names.contains(&node.name.as_str()) {
                return Err(ConfigError::DuplicateName(node.name.clone()));
            }
            names.push(&node.name);
        }
        if let Some(f) = self.followers.iter().find(|f| f.url == leader.url) {
            return Err(ConfigError::FollowerIsLeader(f.name.clone()));
        }
        if self.lag_window.is_zero() {
            return Err(ConfigError::ZeroLagWindow);
        }
        if self.lag_window > MAX_LAG_WINDOW {
            return Err(ConfigError::LagWindowTooLong(self.lag_window));
        }
        let max_follower_lag = self.max_follower_lag.unwrap_or(self.lag_window);
        for (name, value) in [
            ("max_follower_lag", max_follower_lag),
            ("cache_timeout", self.cache_timeout),
            ("readmit_ramp", self.readmit_ramp),
            ("probe_interval", self.probe_interval),
            ("probe_backoff_max", self.probe_backoff_max),
        ] {
            check_timing(name, value)?;
        }
        Ok(Config {
            leader,
            followers: self.followers,
            lag_window: self.lag_window,
            max_follower_lag,
            cache_timeout: self.cache_timeout,
            readmit_ramp: self.readmit_ramp,
            probe_interval: self.probe_interval,
            probe_backoff_max: self.probe_backoff_max,
        })
    }
}

/// A timing setting must be above zero and at most [`MAX_TIMING`].
pub(crate) fn check_timing(name: &'static str, value: Duration) -> Result<(), ConfigError> {
    if value.is_zero() {
        return Err(ConfigError::ZeroDuration(name));
    }
    if value > MAX_TIMING {
        return Err(ConfigError::DurationTooLong(name, value));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> ConfigBuilder {
        Config::builder()
            .leader("leader", "postgres://l/app")
            .follower("f1", "postgres://f1/app")
    }

    #[test]
    fn valid_config_builds_with_defaults() {
        let c = base().build().unwrap();
        assert_eq!(c.leader().name(), "leader");
        assert_eq!(c.followers().len(), 1);
        assert_eq!(c.lag_window(), Duration::from_secs(2));
        assert_eq!(c.max_follower_lag(), c.lag_window());
    }

    #[test]
    fn zero_followers_is_valid() {
        let c = Config::builder().leader("l", "x").build().unwrap();
        assert!(c.followers().is_empty());
    }

    #[test]
    fn each_bad_config_is_named() {
        let cases: Vec<(ConfigBuilder, ConfigError)> = vec![
            (Config::builder(), ConfigError::NoLeader),
            (
                Config::builder().follower("f", "postgres://f"),
                ConfigError::NoLeader,
            ),
            (
                base().follower("f1", "postgres://other"),
                ConfigError::DuplicateName("f1".into()),
            ),
            (
                base().follower("leader", "postgres://z"),
                ConfigError::DuplicateName("leader".into()),
            ),
            (
                base().follower("f2", "postgres://l/app"),
                ConfigError::FollowerIsLeader("f2".into()),
            ),
            (base().follower(" ", "postgres://z"), ConfigError::EmptyName),
            (
                base().follower("f2", ""),
                ConfigError::EmptyUrl("f2".into()),
            ),
            (
                base().lag_window(Duration::ZERO),
                ConfigError::ZeroLagWindow,
            ),
            (
                base().lag_window(MAX_LAG_WINDOW + Duration::from_secs(1)),
                ConfigError::LagWindowTooLong(MAX_LAG_WINDOW + Duration::from_secs(1)),
            ),
            (
                base().cache_timeout(Duration::ZERO),
                ConfigError::ZeroDuration("cache_timeout"),
            ),
            (
                base().max_follower_lag(Duration::ZERO),
                ConfigError::ZeroDuration("max_follower_lag"),
            ),
        ];
        for (builder, expected) in cases {
            assert_eq!(builder.build().unwrap_err(), expected);
        }
    }

    #[test]
    fn a_day_is_the_longest_window_accepted() {
        assert!(base().lag_window(MAX_LAG_WINDOW).build().is_ok());
    }

    /// Every duration setting, through zero, the longest accepted, one past it and
    /// `Duration::MAX`: each builds or is a typed error naming it, and what builds can be
    /// used (see the monitor's test of the extremes).
    #[test]
    fn every_duration_setting_is_bounded_at_both_ends() {
        type Set = fn(ConfigBuilder, Duration) -> ConfigBuilder;
        let settings: [(&str, Set); 5] = [
            ("max_follower_lag", ConfigBuilder::max_follower_lag),
            ("cache_timeout", ConfigBuilder::cache_timeout),
            ("readmit_ramp", ConfigBuilder::readmit_ramp),
            ("probe_interval", ConfigBuilder::probe_interval),
            ("probe_backoff_max", ConfigBuilder::probe_backoff_max),
        ];
        let past = MAX_TIMING + Duration::from_nanos(1);
        for (name, set) in settings {
            assert_eq!(
                set(base(), Duration::ZERO).build().unwrap_err(),
                ConfigError::ZeroDuration(name)
            );
            assert!(
                set(base(), Duration::from_nanos(1)).build().is_ok(),
                "{name}"
            );
            assert!(set(base(), MAX_TIMING).build().is_ok(), "{name}");
            assert_eq!(
                set(base(), past).build().unwrap_err(),
                ConfigError::DurationTooLong(name, past)
            );
            assert_eq!(
                set(base(), Duration::MAX).build().unwrap_err(),
                ConfigError::DurationTooLong(name, Duration::MAX)
            );
        }
        assert_eq!(
            base().lag_window(Duration::MAX).build().unwrap_err(),
            ConfigError::LagWindowTooLong(Duration::MAX)
        );
    }

    #[test]
    fn passwords_never_show() {
        let n = Node::new(
            "l",
            "postgres://app:hunter2@db:5432/app?sslmode=require&password=x",
        );
        let shown = format!("{n:?} {n}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("password=***"), "{shown}");
        assert_eq!(redact_url("postgres://a:b@c@h/db"), "postgres://a:***@h/db");
        assert_eq!(redact_url("postgres://h/db"), "postgres://h/db");
        assert_eq!(redact_url("postgres://user@h/db"), "postgres://user@h/db");
        assert_eq!(redact_url("host=h PASSWORD=p"), "host=h PASSWORD=***");
    }
}
