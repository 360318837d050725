//! Logs: readable text or JSON lines on stderr, with a level that SIGHUP can
//! change (`log_level` in the config file, else `RUST_LOG`).

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// The level when neither the config file nor `RUST_LOG` names one.
pub const DEFAULT_LEVEL: &str = "warn,weft=info";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

impl LogFormat {
    /// Parses "text" or "json".
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }
}

/// The installed logger; changes its level while the node runs.
#[derive(Debug, Clone)]
pub struct Logging {
    filter: reload::Handle<EnvFilter, Registry>,
}

impl Logging {
    /// Installs the process's logger (once), at `level` or `RUST_LOG`.
    pub fn init(format: LogFormat, level: Option<&str>) -> Logging {
        let _ = FORMAT.set(format);
        let (filter, handle) = reload::Layer::new(filter_for(level));
        let registry = tracing_subscriber::registry().with(filter);
        let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
        let _ = match format {
            LogFormat::Text => registry.with(fmt).try_init(),
            LogFormat::Json => registry.with(fmt.json().flatten_event(true)).try_init(),
        };
        Logging { filter: handle }
    }

    /// Applies a new level (`None`: back to `RUST_LOG` or the default).
    pub fn set_level(&self, level: Option<&str>) -> Result<(), String> {
        if let Some(l) = level {
            EnvFilter::try_new(l).map_err(|e| format!("log_level {l:?}: {e}"))?;
        }
        self.filter
            .reload(filter_for(level))
            .map_err(|e| e.to_string())
    }
}

fn filter_for(level: Option<&str>) -> EnvFilter {
    level
        .and_then(|l| EnvFilter::try_new(l).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new(DEFAULT_LEVEL))
}

static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// A line for the operator (ready, joined, draining, left): plain text on
/// stderr, or one JSON object in JSON mode. Never filtered by the level.
pub fn announce(line: &str) {
    match FORMAT.get() {
        Some(LogFormat::Json) => {
            let event = serde_json::json!({
                "timestamp": weft_runtime::access_log::rfc3339(std::time::SystemTime::now()),
                "level": "INFO",
                "target": "weft",
                "message": line,
            });
            eprintln!("{event}");
        }
        _ => eprintln!("{line}"),
    }
}
