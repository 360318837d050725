//! Process faults and bookkeeping: start real `weft node` and `demo-service`
//! processes, `kill -9`, SIGSTOP/SIGCONT and restart them, and never leave
//! one behind (every child is killed when its handle drops, also on panic).
//!
//! Only PIDs this module spawned are ever signalled.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use crate::ChaosError;

/// A child process that dies with its handle.
#[derive(Debug)]
pub struct Proc {
    /// Label for reports (`n2`, `web@n2`).
    pub label: String,
    child: Option<Child>,
    paused: bool,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
}

impl Proc {
    /// Spawns `program args`, stdout and stderr appended to `log`.
    pub fn spawn(
        label: &str,
        program: &Path,
        args: Vec<String>,
        log: &Path,
    ) -> Result<Proc, ChaosError> {
        let mut p = Proc {
            label: label.to_string(),
            child: None,
            paused: false,
            program: program.to_path_buf(),
            args,
            log: log.to_path_buf(),
        };
        p.start()?;
        Ok(p)
    }

    fn start(&mut self) -> Result<(), ChaosError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| ChaosError::Io(format!("{}: {e}", self.log.display())))?;
        let err_log = log
            .try_clone()
            .map_err(|e| ChaosError::Io(format!("{}: {e}", self.log.display())))?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err_log)
            .spawn()
            .map_err(|e| ChaosError::Io(format!("cannot start {}: {e}", self.program.display())))?;
        self.child = Some(child);
        self.paused = false;
        Ok(())
    }

    /// The PID while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether a process is started and not yet reaped.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// `kill -9` and reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused = false;
    }

    /// SIGSTOP: the process keeps its sockets but answers nothing.
    pub fn pause(&mut self) -> Result<(), ChaosError> {
        self.signal(libc::SIGSTOP)?;
        self.paused = true;
        Ok(())
    }

    /// SIGCONT after [`Proc::pause`].
    pub fn resume(&mut self) -> Result<(), ChaosError> {
        self.signal(libc::SIGCONT)?;
        self.paused = false;
        Ok(())
    }

    /// Starts the same command again (same flags, same data dir).
    pub fn restart(&mut self) -> Result<(), ChaosError> {
        self.kill9();
        self.start()
    }

    /// An exit status if the process ended on its own (a crash, for a node
    /// nobody stopped); `None` while it runs or after a deliberate kill.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => {
                self.child = None;
                Some(status)
            }
            _ => None,
        }
    }

    fn signal(&self, sig: libc::c_int) -> Result<(), ChaosError> {
        let pid = self
            .pid()
            .ok_or_else(|| ChaosError::Process(format!("{} is not running", self.label)))?;
        let pid = libc::pid_t::try_from(pid)
            .map_err(|_| ChaosError::Process(format!("{}: pid {pid} out of range", self.label)))?;
        // SAFETY: kill(2) has no memory effects; `pid` is our own unreaped
        // child (held in `self.child`), so it cannot name another process.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::kill(pid, sig) };
        if rc == 0 {
            Ok(())
        } else {
            Err(ChaosError::Process(format!(
                "signal {sig} to {} failed: {}",
                self.label,
                std::io::Error::last_os_error()
            )))
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGKILL also ends a stopped process.
        self.kill9();
    }
}

/// Spawns a demo service on `--port 0` and waits (bounded) for the line that
/// names its address.
pub fn spawn_demo(
    label: &str,
    program: &Path,
    mut args: Vec<String>,
    log: &Path,
    within: Duration,
) -> Result<(Proc, SocketAddr), ChaosError> {
    args.extend(["--port".to_string(), "0".to_string()]);
    let child = Command::new(program)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| ChaosError::Io(format!("cannot start {}: {e}", program.display())))?;
    let mut p = Proc {
        label: label.to_string(),
        child: Some(child),
        paused: false,
        program: program.to_path_buf(),
        args,
        log: log.to_path_buf(),
    };
    let stdout = p
        .child
        .as_mut()
        .and_then(|c| c.stdout.take())
        .ok_or_else(|| ChaosError::Process(format!("{label}: no stdout")))?;
    let (tx, rx) = std::sync::mpsc::channel();
    let log_path = log.to_path_buf();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(first)) = lines.next() {
            let _ = tx.send(first.clone());
            let _ = std::fs::write(&log_path, format!("{first}\n"));
        }
        // Keep draining so the service never blocks on a full pipe.
        for _ in lines {}
    });
    let line = rx.recv_timeout(within).map_err(|_| {
        ChaosError::Process(format!(
            "{label} did not report its address within {within:?}"
        ))
    })?;
    let addr = line
        .rsplit(' ')
        .next()
        .and_then(|a| a.parse::<SocketAddr>().ok())
        .ok_or_else(|| ChaosError::Process(format!("{label}: unexpected first line {line:?}")))?;
    Ok((p, addr))
}

static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());

/// A port on 127.0.0.1 the kernel just gave out for both UDP and TCP, never
/// handed out twice by this process.
pub fn free_port() -> Result<u16, ChaosError> {
    for _ in 0..200 {
        let udp = bind_fresh_udp()?;
        let port = udp
            .local_addr()
            .map_err(|e| ChaosError::Io(e.to_string()))?
            .port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(ChaosError::Io("no free port found in 200 probes".into()))
}

/// A UDP socket bound on 127.0.0.1 to a port never handed out before (by
/// this or by [`free_port`]), and now marked handed out: a port probed and
/// handed out for a node that binds it later is not taken meanwhile by a
/// socket of this process.
pub fn bind_fresh_udp() -> Result<UdpSocket, ChaosError> {
    for _ in 0..200 {
        let udp = UdpSocket::bind("127.0.0.1:0")
            .map_err(|e| ChaosError::Io(format!("cannot bind a UDP socket: {e}")))?;
        let port = udp
            .local_addr()
            .map_err(|e| ChaosError::Io(e.to_string()))?
            .port();
        let mut seen = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
        if !seen.contains(&port) {
            seen.push(port);
            return Ok(udp);
        }
    }
    Err(ChaosError::Io("no fresh UDP port in 200 tries".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct() {
        let mut ports: Vec<u16> = (0..50).map(|_| free_port().unwrap()).collect();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 50);
    }

    #[test]
    fn pause_resume_kill_and_drop() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("sleep.log");
        let mut p = Proc::spawn("sleep", Path::new("sleep"), vec!["30".into()], &log).unwrap();
        p.pause().unwrap();
        p.resume().unwrap();
        assert!(p.exited().is_none());
        p.restart().unwrap();
        assert!(p.is_running());
        let pid = p.pid().unwrap();
        drop(p);
        // Reaped by drop: the pid no longer names our child.
        assert!(
            !Path::new(&format!("/proc/{pid}/status")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .map(|s| !s.contains("sleep"))
                    .unwrap_or(true)
        );
    }

    #[test]
    fn exit_is_seen_as_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("false.log");
        let mut p = Proc::spawn("false", Path::new("false"), vec![], &log).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let status = loop {
            if let Some(s) = p.exited() {
                break s;
            }
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(!status.success());
        assert!(p.signal(libc::SIGSTOP).is_err());
    }
}
