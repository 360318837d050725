//! The access log: one JSON line per proxied request, off by default
//! (`--access-log PATH|-`). Lines go through a bounded channel to one writer
//! task, so a slow disk never slows a request; a full channel drops the
//! line and counts it. SIGHUP reopens the file (for log rotation).

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// Where access log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessTarget {
    /// Standard output (`-`).
    Stdout,
    /// A file, appended to.
    File(PathBuf),
}

impl AccessTarget {
    /// `-` is standard output, anything else a file path.
    pub fn parse(s: &str) -> Self {
        if s == "-" {
            AccessTarget::Stdout
        } else {
            AccessTarget::File(PathBuf::from(s))
        }
    }
}

/// One proxied request as the access log records it (and `weft tap` shows
/// it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccessEntry {
    /// RFC 3339 UTC, milliseconds.
    pub time: String,
    /// Service asked for (`null` when the request named none).
    pub service: Option<String>,
    /// The calling service (`-` through the shared proxy).
    pub caller: String,
    /// Instance of the last attempt.
    pub instance: Option<String>,
    /// Node of that instance.
    pub node: Option<String>,
    /// HTTP method.
    pub method: String,
    /// The request's path (no query: it may carry secrets).
    pub path: String,
    /// Status the app got.
    pub status: u16,
    /// Time to the response head, in milliseconds.
    pub duration_ms: f64,
    /// Attempts sent to instances (retries and hedges included).
    pub attempts: u8,
    /// Total time spent waiting before retries, in milliseconds.
    pub retry_wait_ms: f64,
    /// The `weft-error` code when the mesh made the answer.
    pub weft_error: Option<String>,
}

#[derive(Debug)]
enum Message {
    Line(Box<AccessEntry>),
    Reopen(Option<AccessTarget>),
}

/// The handle the data plane records through; cheap to clone.
#[derive(Debug, Clone)]
pub struct AccessLog {
    enabled: Arc<AtomicBool>,
    tx: mpsc::Sender<Message>,
}

impl AccessLog {
    /// Starts the writer task; `None` starts with the log off.
    pub fn start(target: Option<AccessTarget>) -> AccessLog {
        let (tx, rx) = mpsc::channel(4096);
        let enabled = Arc::new(AtomicBool::new(target.is_some()));
        let flag = enabled.clone();
        // A thread of its own: file writes never block a runtime worker.
        let spawned = std::thread::Builder::new()
            .name("weft-access-log".into())
            .spawn(move || write_lines(rx, target, flag));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the access log writer");
            enabled.store(false, Ordering::Relaxed);
        }
        AccessLog { enabled, tx }
    }

    /// A log that is off and has no writer (tests, tools).
    pub fn off() -> AccessLog {
        let (tx, _) = mpsc::channel(1);
        AccessLog {
            enabled: Arc::new(AtomicBool::new(false)),
            tx,
        }
    }

    /// True when lines are being written: callers build entries only then.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Queues one line (dropped, and counted, when the writer lags).
    pub fn record(&self, entry: AccessEntry) {
        if self.enabled() && self.tx.try_send(Message::Line(Box::new(entry))).is_err() {
            metrics::counter!("weft_access_log_dropped_total").increment(1);
        }
    }

    /// Reopens the file, or switches to another target or off.
    pub fn reopen(&self, target: Option<AccessTarget>) {
        let _ = self.tx.try_send(Message::Reopen(target));
    }
}

fn write_lines(
    mut rx: mpsc::Receiver<Message>,
    target: Option<AccessTarget>,
    enabled: Arc<AtomicBool>,
) {
    let mut out = open(target.as_ref());
    while let Some(msg) = rx.blocking_recv() {
        match msg {
            Message::Line(entry) => {
                if let (Some(w), Ok(mut line)) = (out.as_mut(), serde_json::to_vec(&*entry)) {
                    line.push(b'\n');
                    if let Err(e) = w.write_all(&line).and_then(|()| w.flush()) {
                        tracing::warn!(error = %e, "access log write failed");
                    }
                }
            }
            Message::Reopen(target) => {
                out = open(target.as_ref());
                enabled.store(out.is_some(), Ordering::Relaxed);
            }
        }
    }
}

fn open(target: Option<&AccessTarget>) -> Option<Box<dyn Write + Send>> {
    match target? {
        AccessTarget::Stdout => Some(Box::new(std::io::stdout())),
        AccessTarget::File(path) => {
            match std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                Ok(f) => Some(Box::new(f)),
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "cannot open the access log");
                    None
                }
            }
        }
    }
}

/// `now` as RFC 3339 UTC with milliseconds.
pub fn rfc3339(now: SystemTime) -> String {
    let since = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let secs = since.as_secs();
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60,
        since.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_796_118_337_113);
        assert_eq!(rfc3339(t), "2026-12-01T09:45:37.113Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }
}
