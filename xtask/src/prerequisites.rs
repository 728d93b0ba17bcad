//! PostgreSQL, memcached and Redis on this machine: checked, and installed from Debian's packages
//! when we are root and have apt-get.

use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use distributed_testkit::{memcached_program, postgres_bin_dir, redis_program};

/// A missing server and the Debian package that brings it.
struct Missing {
    what: &'static str,
    package: &'static str,
    /// Its init script, in case the package's postinst starts it.
    service: &'static str,
}

fn missing() -> Vec<Missing> {
    let mut missing = Vec::new();
    if postgres_bin_dir().is_err() {
        missing.push(Missing {
            what: "PostgreSQL (initdb, pg_ctl, pg_basebackup, psql)",
            package: "postgresql",
            service: "postgresql",
        });
    }
    if memcached_program().is_err() {
        missing.push(Missing {
            what: "memcached",
            package: "memcached",
            service: "memcached",
        });
    }
    if redis_program().is_err() {
        missing.push(Missing {
            what: "redis-server",
            package: "redis-server",
            service: "redis-server",
        });
    }
    missing
}

/// Makes sure the servers the rig starts are installed.
pub(crate) fn ensure() -> anyhow::Result<()> {
    let missing = missing();
    if missing.is_empty() {
        return Ok(());
    }
    let what: Vec<&str> = missing.iter().map(|m| m.what).collect();
    let packages: Vec<&str> = missing.iter().map(|m| m.package).collect();
    let can_install = rustix::process::geteuid().is_root() && succeeds("apt-get", &["--version"]);
    if !can_install {
        bail!(
            "missing {}: install them (Debian: apt-get install {})",
            what.join(", "),
            packages.join(" ")
        );
    }
    eprintln!("xtask: installing {}", what.join(", "));
    install(&missing)?;
    let still_missing: Vec<&str> = self::missing().iter().map(|m| m.what).collect();
    if !still_missing.is_empty() {
        bail!(
            "still missing after apt-get install: {}",
            still_missing.join(", ")
        );
    }
    Ok(())
}

fn install(missing: &[Missing]) -> anyhow::Result<()> {
    run("apt-get", &["update"])?;
    let mut packages: Vec<&str> = missing.iter().map(|m| m.package).collect();
    // The rig looks for /usr/lib/postgresql/15/bin first; take that version when the archive
    // has it, else the distribution's default.
    if let Some(postgres) = packages.iter_mut().find(|p| **p == "postgresql")
        && succeeds("apt-cache", &["show", "postgresql-15"])
    {
        *postgres = "postgresql-15";
    }
    let mut args = vec!["install", "-y", "--no-install-recommends"];
    args.extend(&packages);
    run("apt-get", &args)?;
    // These packages were absent, so any service of theirs now running was started by the
    // install (where policy-rc.d allows it), not by anyone else: the rig starts its own servers.
    for service in missing.iter().map(|m| m.service) {
        if succeeds("service", &[service, "status"]) {
            eprintln!("xtask: stopping the {service} service the package install started");
            run("service", &[service, "stop"])?;
        }
    }
    Ok(())
}

fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(program)
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("{program} {} failed: {status}", args.join(" "));
    }
    Ok(())
}
