//! Hand-parsed flags: the tasks take a handful, not worth a parser dependency.

use std::time::Duration;

use anyhow::{Context, bail};

/// The topology flags shared by `integration-test` and `topology up`, and whatever follows `--`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct TopologyFlags {
    pub(crate) apply_delay: Duration,
    pub(crate) followers: usize,
    /// Arguments after `--`, passed on untouched.
    pub(crate) passthrough: Vec<String>,
}

impl TopologyFlags {
    pub(crate) fn parse(args: &[String]) -> anyhow::Result<Self> {
        let mut flags = Self {
            apply_delay: Duration::from_millis(1000),
            followers: 2,
            passthrough: Vec::new(),
        };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            if arg == "--" {
                flags.passthrough = args.cloned().collect();
                break;
            }
            let (name, inline_value) = match arg.split_once('=') {
                Some((name, value)) => (name, Some(value.to_owned())),
                None => (arg.as_str(), None),
            };
            let mut value = || {
                inline_value
                    .clone()
                    .or_else(|| args.next().cloned())
                    .with_context(|| format!("{name} needs a value"))
            };
            match name {
                "--apply-delay-ms" => {
                    let ms = value()?;
                    flags.apply_delay = Duration::from_millis(
                        ms.parse()
                            .with_context(|| format!("--apply-delay-ms {ms:?}"))?,
                    );
                }
                "--followers" => {
                    let n = value()?;
                    flags.followers = n.parse().with_context(|| format!("--followers {n:?}"))?;
                }
                other => bail!("unknown argument {other:?} (see `cargo xtask help`)"),
            }
        }
        Ok(flags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> anyhow::Result<TopologyFlags> {
        TopologyFlags::parse(&args.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>())
    }

    #[test]
    fn defaults() -> anyhow::Result<()> {
        let flags = parse(&[])?;
        assert_eq!(flags.apply_delay, Duration::from_secs(1));
        assert_eq!(flags.followers, 2);
        assert!(flags.passthrough.is_empty());
        Ok(())
    }

    #[test]
    fn flags_in_both_spellings_and_passthrough() -> anyhow::Result<()> {
        let flags = parse(&[
            "--apply-delay-ms",
            "250",
            "--followers=3",
            "--",
            "-E",
            "test(rig)",
        ])?;
        assert_eq!(flags.apply_delay, Duration::from_millis(250));
        assert_eq!(flags.followers, 3);
        assert_eq!(flags.passthrough, ["-E", "test(rig)"]);
        Ok(())
    }

    #[test]
    fn rejects_unknown_and_malformed() {
        assert!(parse(&["--verbose"]).is_err());
        assert!(parse(&["--followers"]).is_err());
        assert!(parse(&["--apply-delay-ms", "1s"]).is_err());
    }
}
