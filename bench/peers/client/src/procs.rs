//! The servers under test: spawning them in their own process group, measuring the CPU
//! time and peak RSS of their whole process tree from `/proc`, and stopping them.

use std::collections::HashMap;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A server process (and every process it starts), killed with its process group when
/// dropped.
pub struct Server {
    child: Child,
    name: &'static str,
    stopped: bool,
}

/// CPU seconds (user + system) of a process tree at one instant.
#[derive(Clone, Copy, Debug)]
pub struct CpuSnapshot {
    /// User plus system seconds of every live process of the tree.
    pub seconds: f64,
}

impl Server {
    /// Starts `command` as the leader of a new process group, its stdout and stderr
    /// appended to `log`, and records its pid in `pid_file` (one pid a line) so that the
    /// bench's shell trap can kill the group should this process die first.
    pub fn spawn(
        name: &'static str,
        mut command: Command,
        log: &Path,
        pid_file: &Path,
    ) -> Result<Self> {
        let out = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        command
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to SIGKILL the
        // server should this process die without dropping it.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {name}: {command:?}"))?;
        let mut pids = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(pid_file)?;
        use std::io::Write;
        writeln!(pids, "{}", child.id())?;
        Ok(Self {
            child,
            name,
            stopped: false,
        })
    }

    /// The pid of the process started (the leader of its group).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the server has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited early: {status}", self.name);
        }
        Ok(())
    }

    /// User + system CPU seconds of the server and every live descendant.
    pub fn cpu(&self) -> CpuSnapshot {
        let ticks = clock_ticks();
        let seconds = tree(self.pid())
            .iter()
            .filter_map(|pid| stat_fields(*pid))
            .map(|f| (f.utime + f.stime) as f64 / ticks)
            .sum();
        CpuSnapshot { seconds }
    }

    /// The sum over the tree of each process's peak resident set (`VmHWM`), in bytes.
    pub fn peak_rss(&self) -> u64 {
        tree(self.pid()).iter().filter_map(|pid| vm_hwm(*pid)).sum()
    }

    /// SIGTERM to the server (Miniflare's node then stops its workerd itself), then,
    /// once it has exited or `grace` has passed, SIGKILL to whatever is left of its
    /// group; once only.
    pub fn stop(&mut self, grace: Duration) {
        if std::mem::replace(&mut self.stopped, true) {
            return;
        }
        let group = -(self.child.id() as i32);
        // SAFETY: kill(2) on our own child, then on its process group.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Whatever is left of the group (the leader, or a grandchild it left behind).
        unsafe { libc::kill(group, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

struct StatFields {
    ppid: u32,
    utime: u64,
    stime: u64,
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

fn stat_fields(pid: u32) -> Option<StatFields> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: the fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): ppid is field 4, utime 14, stime 15.
    Some(StatFields {
        ppid: f.get(1)?.parse().ok()?,
        utime: f.get(11)?.parse().ok()?,
        stime: f.get(12)?.parse().ok()?,
    })
}

fn vm_hwm(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `root` and every live descendant of it.
fn tree(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(f) = stat_fields(pid) {
                children.entry(f.ppid).or_default().push(pid);
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        if let Some(kids) = children.get(&out[i]) {
            out.extend(kids);
        }
        i += 1;
    }
    out
}

/// A free TCP port on 127.0.0.1 (bound and released: free when this returns).
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}
