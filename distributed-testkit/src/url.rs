//! Just enough URL handling to point a connection string at another `host:port`.

use std::net::SocketAddr;

use crate::RigError;

/// `scheme://user@` | `host:port` | `/path?query`.
fn split(url: &str) -> Result<(&str, &str, &str), RigError> {
    let bad = || RigError::BadUrl {
        url: url.to_owned(),
    };
    let authority_start = url.find("://").ok_or_else(bad)? + 3;
    let authority_len = url[authority_start..]
        .find(['/', '?', '#'])
        .unwrap_or(url.len() - authority_start);
    let authority_end = authority_start + authority_len;
    let host_start = url[authority_start..authority_end]
        .rfind('@')
        .map_or(authority_start, |at| authority_start + at + 1);
    if host_start == authority_end {
        return Err(bad());
    }
    Ok((
        &url[..host_start],
        &url[host_start..authority_end],
        &url[authority_end..],
    ))
}

/// `url` with its `host:port` replaced by `addr`; user, path and query are kept.
pub(crate) fn with_host_port(url: &str, addr: SocketAddr) -> Result<String, RigError> {
    let (before, _, after) = split(url)?;
    Ok(format!("{before}{addr}{after}"))
}

/// The `host:port` of `url`.
pub(crate) fn host_port(url: &str) -> Result<&str, RigError> {
    split(url).map(|(_, host_port, _)| host_port)
}

/// The explicit port of `url`.
pub(crate) fn port_of(url: &str) -> Result<u16, RigError> {
    let (_, host_port, _) = split(url)?;
    // The port follows the last colon, unless that colon is inside an IPv6 literal.
    let port = host_port
        .rsplit_once(':')
        .filter(|(host, _)| !host.starts_with('[') || host.ends_with(']'))
        .map(|(_, port)| port);
    port.and_then(|port| port.parse().ok())
        .ok_or_else(|| RigError::BadUrl {
            url: url.to_owned(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 4000))
    }

    #[test]
    fn rewrites_host_and_port_keeping_user_path_and_query() -> Result<(), RigError> {
        assert_eq!(
            with_host_port(
                "postgres://postgres@127.0.0.1:5432/app?sslmode=disable",
                addr()
            )?,
            "postgres://postgres@127.0.0.1:4000/app?sslmode=disable"
        );
        assert_eq!(
            with_host_port("postgres://u:p%40ss@db.example:5432", addr())?,
            "postgres://u:p%40ss@127.0.0.1:4000"
        );
        assert_eq!(
            with_host_port("redis://[::1]:6379/0", addr())?,
            "redis://127.0.0.1:4000/0"
        );
        assert_eq!(
            with_host_port("postgresql://localhost/db", addr())?,
            "postgresql://127.0.0.1:4000/db"
        );
        Ok(())
    }

    #[test]
    fn finds_the_port() -> Result<(), RigError> {
        assert_eq!(
            port_of("postgres://postgres@127.0.0.1:5433/postgres")?,
            5433
        );
        assert_eq!(port_of("redis://[::1]:6380")?, 6380);
        assert!(port_of("redis://[::1]").is_err());
        assert!(port_of("postgres://localhost/db").is_err());
        Ok(())
    }

    #[test]
    fn rejects_what_is_not_a_url() {
        assert!(with_host_port("127.0.0.1:5432", addr()).is_err());
        assert!(with_host_port("postgres://user@/db", addr()).is_err());
    }
}
