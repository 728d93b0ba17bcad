//! After teardown: nothing we started may still run, and the rig directory must be gone.

use std::{fs, path::Path};

use anyhow::bail;

/// Kills whatever survived the teardown of the rig in `dir` (the `pids` we recorded, and any
/// process whose command line names `dir`, as `pgrep -f DIR` would find), removes `dir` if it is
/// still there, and fails if there was anything to clean.
pub(crate) fn clean_or_fail(dir: &Path, pids: &[u32]) -> anyhow::Result<()> {
    let dir_text = dir.display().to_string();
    let mut survivors: Vec<(u32, String)> = pids
        .iter()
        .filter(|&&pid| is_alive(pid))
        .map(|&pid| (pid, cmdline(pid).unwrap_or_default()))
        .collect();
    for (pid, cmdline) in processes() {
        if cmdline.contains(&dir_text)
            && pid != std::process::id()
            && is_alive(pid)
            && !survivors.iter().any(|(known, _)| *known == pid)
        {
            survivors.push((pid, cmdline));
        }
    }
    for (pid, _) in &survivors {
        kill(*pid);
    }
    let dir_survived = dir.exists();
    if dir_survived {
        let _ = fs::remove_dir_all(dir);
    }
    if survivors.is_empty() && !dir_survived {
        return Ok(());
    }
    let mut report = Vec::new();
    for (pid, cmdline) in &survivors {
        report.push(format!("process {pid} ({cmdline}) survived and was killed"));
    }
    if dir_survived {
        report.push(format!("{dir_text} survived and was removed"));
    }
    bail!("teardown left things behind:\n  {}", report.join("\n  "))
}

fn processes() -> Vec<(u32, String)> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, cmdline(pid)?)))
        .collect()
}

fn cmdline(pid: u32) -> Option<String> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|&b| b == 0)
            .map(String::from_utf8_lossy)
            .collect::<Vec<_>>()
            .join(" ")
            .trim_end()
            .to_owned(),
    )
}

/// Live and not a zombie.
pub(crate) fn is_alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, state)| !state.starts_with(['Z', 'X']))
    })
}

fn kill(pid: u32) {
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _already_gone = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clean_teardown_passes() -> anyhow::Result<()> {
        let gone = std::env::temp_dir().join("distributed-rig-never-created-by-this-test");
        clean_or_fail(&gone, &[])
    }

    #[test]
    fn a_leftover_directory_is_removed_and_reported() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("xtask-survivor-test-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        let report = clean_or_fail(&dir, &[]).err().map(|e| e.to_string());
        assert!(report.is_some_and(|r| r.contains("survived and was removed")));
        assert!(!dir.exists());
        Ok(())
    }

    #[test]
    fn a_leftover_process_is_killed_and_reported() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("xtask-survivor-proc-{}", std::process::id()));
        let mut sleeper = std::process::Command::new("sleep").arg("60").spawn()?;
        let report = clean_or_fail(&dir, &[sleeper.id()])
            .err()
            .map(|e| e.to_string());
        let _ = sleeper.wait();
        assert!(report.is_some_and(|r| r.contains("survived and was killed")));
        Ok(())
    }
}
