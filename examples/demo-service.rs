//! A demo HTTP service whose failures can be dialled in: an error rate, added
//! latency, and flapping (down D ms of every P ms), so chaos scenarios and
//! `weft demo` have an instance that misbehaves on purpose.
//!
//! `GET /` answers the service's `--name`; `GET /health` answers `ok`. While
//! flapping down, every request gets `503` and the connection is closed.
//! On start it prints one line, `demo-service NAME listening on ADDR`, so a
//! parent that passed `--port 0` learns the port.

use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::Rng;
use tokio::net::TcpListener;

/// A demo HTTP service with injectable faults.
#[derive(Debug, Parser)]
#[command(name = "demo-service", version, about, long_about = None)]
struct Args {
    /// Port on 127.0.0.1 (0 picks a free one and prints it).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Name answered on `GET /`.
    #[arg(long, default_value = "demo")]
    name: String,
    /// Fraction of requests answered with 500, in [0, 1].
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Latency added before every answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Flapping: down this many milliseconds of every --flap-period-ms.
    #[arg(long, default_value_t = 0)]
    flap_down_ms: u64,
    /// Flapping period in milliseconds (0: never flaps).
    #[arg(long, default_value_t = 0)]
    flap_period_ms: u64,
}

/// What the service does, fixed at start.
#[derive(Debug, Clone)]
struct Behaviour {
    name: String,
    error_rate: f64,
    latency: Duration,
    flap: Flap,
    started: Instant,
}

/// Down `down_ms` at the end of every `period_ms`, starting up.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Flap {
    down_ms: u64,
    period_ms: u64,
}

impl Flap {
    /// Whether the service is down `elapsed_ms` after start.
    fn is_down(&self, elapsed_ms: u64) -> bool {
        if self.period_ms == 0 || self.down_ms == 0 {
            return false;
        }
        let down = self.down_ms.min(self.period_ms);
        elapsed_ms % self.period_ms >= self.period_ms - down
    }
}

fn main() {
    let args = Args::parse();
    if !(0.0..=1.0).contains(&args.error_rate) {
        eprintln!(
            "demo-service: --error-rate {} must be in [0, 1]",
            args.error_rate
        );
        std::process::exit(64);
    }
    if args.flap_down_ms > 0 && args.flap_period_ms == 0 {
        eprintln!("demo-service: --flap-down-ms needs --flap-period-ms");
        std::process::exit(64);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("demo-service: cannot start the runtime: {e}");
            std::process::exit(70);
        }
    };
    let behaviour = Arc::new(Behaviour {
        name: args.name.clone(),
        error_rate: args.error_rate,
        latency: Duration::from_millis(args.latency_ms),
        flap: Flap {
            down_ms: args.flap_down_ms,
            period_ms: args.flap_period_ms,
        },
        started: Instant::now(),
    });
    if let Err(e) = runtime.block_on(serve(args.port, behaviour)) {
        eprintln!("demo-service: {e}");
        std::process::exit(69);
    }
}

async fn serve(port: u16, behaviour: Arc<Behaviour>) -> std::io::Result<()> {
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    let addr = listener.local_addr()?;
    let mut out = std::io::stdout();
    writeln!(out, "demo-service {} listening on {addr}", behaviour.name)?;
    out.flush()?;
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(_) => {
                // Out of file descriptors or similar: back off, keep serving.
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let behaviour = behaviour.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let behaviour = behaviour.clone();
                async move { Ok::<_, Infallible>(answer(&behaviour, req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn answer(b: &Behaviour, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let elapsed_ms = u64::try_from(b.started.elapsed().as_millis()).unwrap_or(u64::MAX);
    if b.flap.is_down(elapsed_ms) {
        let mut resp = text(StatusCode::SERVICE_UNAVAILABLE, "down (flapping)\n");
        resp.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("close"),
        );
        return resp;
    }
    if !b.latency.is_zero() {
        tokio::time::sleep(b.latency).await;
    }
    match req.uri().path() {
        "/health" => text(StatusCode::OK, "ok\n"),
        "/" => {
            let fail = b.error_rate > 0.0 && rand::thread_rng().gen_bool(b.error_rate);
            if fail {
                text(StatusCode::INTERNAL_SERVER_ERROR, "injected error\n")
            } else {
                text(StatusCode::OK, &b.name)
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp
}

#[cfg(test)]
mod tests {
    use super::Flap;

    #[test]
    fn no_flapping_by_default() {
        let f = Flap {
            down_ms: 0,
            period_ms: 0,
        };
        assert!((0..10_000).all(|t| !f.is_down(t)));
        let f = Flap {
            down_ms: 0,
            period_ms: 1000,
        };
        assert!((0..10_000).all(|t| !f.is_down(t)));
    }

    #[test]
    fn down_at_the_end_of_each_period() {
        let f = Flap {
            down_ms: 200,
            period_ms: 1000,
        };
        assert!(!f.is_down(0));
        assert!(!f.is_down(799));
        assert!(f.is_down(800));
        assert!(f.is_down(999));
        assert!(!f.is_down(1000));
        let down = (0..10_000).filter(|t| f.is_down(*t)).count();
        assert_eq!(down, 2000);
    }

    #[test]
    fn down_longer_than_period_is_always_down() {
        let f = Flap {
            down_ms: 5000,
            period_ms: 1000,
        };
        assert!((0..3000).all(|t| f.is_down(t)));
    }
}
