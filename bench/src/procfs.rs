//! What the kernel says about a server process: CPU time and memory, read
//! from `/proc`, so hub, NATS and Redis are measured the same way.

use std::fs;
use std::path::Path;

/// Run time in nanoseconds of the thread whose `/proc` directory is `task`
/// (the first field of its `schedstat`).
fn schedstat_ns(task: &Path) -> Option<u64> {
    fs::read_to_string(task.join("schedstat"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// CPU time the process has used, in nanoseconds: the sum of its threads'
/// run time (`/proc/PID/task/*/schedstat`, nanosecond precision). Falls back
/// to `utime + stime` of `/proc/PID/stat` (clock ticks) when schedstat is
/// missing.
pub fn cpu_ns(pid: u32) -> Option<u64> {
    let mut total = 0u64;
    let mut any = false;
    if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
        for ns in tasks.flatten().filter_map(|t| schedstat_ns(&t.path())) {
            total += ns;
            any = true;
        }
    }
    if any {
        return Some(total);
    }
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    ticks_ns(&stat)
}

/// CPU time of every thread of `pids` in nanoseconds, summed by thread
/// name (`comm`: the hub's `tokio-rt-worker` call lane, `freshness-strea`
/// stream lane, `freshness-wal` log writer, ...). A thread that ended
/// before the read is missing, so the parts may sum to less than
/// [`cpu_ns_all`].
pub fn cpu_ns_by_thread(pids: &[u32]) -> std::collections::BTreeMap<String, u64> {
    let mut by = std::collections::BTreeMap::new();
    for pid in pids {
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            if let Some(ns) = schedstat_ns(&t.path()) {
                let comm = fs::read_to_string(t.path().join("comm")).unwrap_or_default();
                *by.entry(comm.trim_end().to_owned()).or_insert(0) += ns;
            }
        }
    }
    by
}

/// [`cpu_ns`] summed over several processes (the replicas of one region);
/// `None` when there are none or one cannot be read.
pub fn cpu_ns_all(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&p| cpu_ns(p)).sum()
}

/// [`rss`] summed over several processes.
pub fn rss_all(pids: &[u32]) -> Option<(u64, u64)> {
    if pids.is_empty() {
        return None;
    }
    pids.iter()
        .map(|&p| rss(p))
        .try_fold((0, 0), |(r, h), x| x.map(|(a, b)| (r + a, h + b)))
}

/// `utime + stime` of a `/proc/PID/stat` line, in nanoseconds (USER_HZ = 100).
fn ticks_ns(stat: &str) -> Option<u64> {
    // Fields after the command name, which is in parentheses and may hold
    // spaces: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) * 10_000_000)
}

/// Resident and peak resident memory in bytes (`VmRSS`, `VmHWM`).
pub fn rss(pid: u32) -> Option<(u64, u64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU time of this process's threads named `name` (`comm`), in
/// nanoseconds.
pub fn self_threads_cpu_ns(name: &str) -> Option<u64> {
    cpu_ns_by_thread(&[std::process::id()]).get(name).copied()
}

/// CPU time of the calling thread, in nanoseconds.
pub fn thread_self_cpu_ns() -> Option<u64> {
    schedstat_ns(Path::new("/proc/thread-self"))
}

/// Puts the calling thread under SCHED_FIFO (priority 10) with `chrt`
/// (util-linux); whether it took. Needs the privilege to (root, or
/// CAP_SYS_NICE); without it the thread keeps its policy.
pub fn run_this_thread_fifo() -> bool {
    let Ok(link) = fs::read_link("/proc/thread-self") else {
        return false;
    };
    let Some(tid) = link.file_name().and_then(|t| t.to_str()).map(str::to_owned) else {
        return false;
    };
    std::process::Command::new("chrt")
        .args(["--fifo", "-p", "10", &tid])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// CPU time of this process (the load generator), in nanoseconds.
pub fn self_cpu_ns() -> Option<u64> {
    cpu_ns(std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_spaces_in_the_name() {
        let line = "42 (a b) S 1 2 3 4 5 6 7 8 9 10 150 25 0 0";
        assert_eq!(ticks_ns(line), Some(175 * 10_000_000));
    }

    #[test]
    fn reads_this_process() {
        let (rss, hwm) = rss(std::process::id()).unwrap();
        assert!(rss > 0 && hwm >= rss);
        assert!(self_cpu_ns().is_some());
        assert!(thread_self_cpu_ns().is_some());
        let me = std::thread::current();
        // The test harness names its threads after the test.
        let name: String = me.name().unwrap_or("").chars().take(15).collect();
        assert!(name.is_empty() || self_threads_cpu_ns(&name).is_some());
        assert_eq!(self_threads_cpu_ns("no-such-thread"), None);
    }

    #[test]
    fn sums_a_process_s_cpu_by_thread_name() {
        // Two threads of one name spin a little, report their own CPU time
        // and stay alive until the process has been read.
        let (report, reports) = std::sync::mpsc::channel();
        let mut ends = Vec::new();
        let mut threads = Vec::new();
        for _ in 0..2 {
            let report = report.clone();
            let (end, ended) = std::sync::mpsc::channel::<()>();
            ends.push(end);
            threads.push(
                std::thread::Builder::new()
                    .name("procfs-spin".into())
                    .spawn(move || {
                        // Runs until this thread has used 5 ms of CPU.
                        let start = thread_self_cpu_ns().unwrap();
                        let mut now = start;
                        while now < start + 5_000_000 {
                            now = thread_self_cpu_ns().unwrap();
                        }
                        report.send(now).unwrap();
                        ended.recv().ok();
                    })
                    .unwrap(),
            );
        }
        let own: u64 = reports.iter().take(2).sum();
        let by = cpu_ns_by_thread(&[std::process::id()]);
        drop(ends);
        for t in threads {
            t.join().unwrap();
        }
        let spun = by.get("procfs-spin").copied().unwrap_or(0);
        assert!(spun >= own, "{spun} < {own}: {by:?}");
    }
}
