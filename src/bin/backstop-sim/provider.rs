//! The fake provider: an HTTP server following the scenario's timeline in
//! compressed time, and the minimal HTTP/1.1 client the agents call it with.
//!
//! Its answers carry what real providers send (see
//! shared provider-signals notes): 529 `overloaded_error`, 429 with
//! `retry-after` / `retry-after-ms` and `anthropic-ratelimit-*` or
//! `x-ratelimit-*` headers, 401 for a revoked key, 400 "prompt is too long".
//! Hints are in REAL time (the clients and Backstop live in real time); the
//! timeline is in simulated time. Every call is logged: the report counts
//! wasted calls and 429s from what the provider saw, not from what agents
//! believe they did.

use crate::scenario::{Kind, Scenario};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Simulated time: `ms_per_sec` real milliseconds per simulated second.
#[derive(Clone, Copy)]
pub struct Clock {
    pub start: Instant,
    pub ms_per_sec: f64,
}

impl Clock {
    pub fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * 1000.0 / self.ms_per_sec
    }

    /// A simulated span as real time.
    pub fn real(&self, sim_secs: f64) -> Duration {
        Duration::from_secs_f64((sim_secs.max(0.0) * self.ms_per_sec / 1000.0).min(3600.0))
    }

    /// A real span as simulated seconds.
    pub fn sim(&self, real: Duration) -> f64 {
        real.as_secs_f64() * 1000.0 / self.ms_per_sec
    }

    pub async fn sleep(&self, sim_secs: f64) {
        tokio::time::sleep(self.real(sim_secs)).await;
    }
}

/// One call as the provider saw it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Call {
    pub t: f64,
    pub model: usize,
    pub status: u16,
    /// Answered with an outage or revoked-key failure: a call made while the model was down.
    pub wasted: bool,
}

struct Shared {
    scenario: Scenario,
    clock: Clock,
    log: Mutex<Vec<Call>>,
    /// Per model: the theoretical arrival time (GCRA, simulated s) of the hidden limit.
    tat: Mutex<Vec<f64>>,
}

pub struct Provider {
    pub addr: std::net::SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Provider {
    pub async fn start(scenario: Scenario, clock: Clock) -> Result<Provider, String> {
        let n = scenario.models.len();
        let shared = Arc::new(Shared {
            scenario,
            clock,
            log: Mutex::new(Vec::new()),
            tat: Mutex::new(vec![0.0; n]),
        });
        let app = axum::Router::new()
            .route("/call", axum::routing::post(answer))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("fake provider: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Provider { addr, shared, task })
    }

    /// The calls so far, in arrival order.
    pub fn log(&self) -> Vec<Call> {
        self.shared
            .log
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default()
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// RFC 3339 (UTC, milliseconds) for Anthropic's `*-reset` headers, via the
/// days-to-civil conversion (proleptic Gregorian calendar).
fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Rate-limit headers in the provider family's own format; `wait` is real time
/// until the limit admits again.
fn limit_headers(model: &str, limit: f64, remaining: u64, wait: Duration) -> Vec<(String, String)> {
    let limit = (limit.round() as u64).max(1).to_string();
    if model.starts_with("anthropic/") {
        let reset = rfc3339(SystemTime::now() + wait);
        vec![
            ("anthropic-ratelimit-requests-limit".into(), limit),
            (
                "anthropic-ratelimit-requests-remaining".into(),
                remaining.to_string(),
            ),
            ("anthropic-ratelimit-requests-reset".into(), reset),
        ]
    } else {
        vec![
            ("x-ratelimit-limit-requests".into(), limit),
            (
                "x-ratelimit-remaining-requests".into(),
                remaining.to_string(),
            ),
            (
                "x-ratelimit-reset-requests".into(),
                format!("{}ms", wait.as_millis().max(1)),
            ),
        ]
    }
}

async fn answer(State(s): State<Arc<Shared>>, h: HeaderMap) -> Response {
    let t = s.clock.now();
    let name = header(&h, "x-model").unwrap_or("");
    let Some(model) = s.scenario.models.iter().position(|m| m.name == name) else {
        return (StatusCode::NOT_FOUND, "unknown model").into_response();
    };
    let m = &s.scenario.models[model];
    let tokens: u64 = header(&h, "x-tokens")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut status = 200u16;
    let mut error_type = "";
    let mut wasted = false;
    let mut extra: Vec<(String, String)> = Vec::new();
    let mut latency = m.latency;
    for p in s.scenario.active(model, t) {
        match p.kind {
            Kind::Outage { status: st } if status == 200 => {
                status = st;
                error_type = if st == 529 {
                    "overloaded_error"
                } else {
                    "api_error"
                };
                wasted = true;
            }
            Kind::Revoked if status == 200 => {
                status = 401;
                error_type = "authentication_error";
                wasted = true;
            }
            Kind::Slow { factor } => latency *= factor,
            _ => {}
        }
    }
    if status == 200 && tokens > m.context_window {
        status = 400;
        error_type = "invalid_request_error: prompt is too long";
    }
    if status == 200
        && let Some((rps, burst)) = s.scenario.active(model, t).find_map(|p| match p.kind {
            Kind::RateLimit { rps, burst } => Some((rps, burst)),
            _ => None,
        })
    {
        // GCRA: each call costs 1/rps simulated seconds; at most `burst` ahead.
        let mut tats = s.tat.lock().unwrap_or_else(|e| e.into_inner());
        let tat = tats[model].max(t);
        let cost = 1.0 / rps;
        let ahead = tat + cost - t;
        if ahead > burst * cost {
            let wait = s.clock.real(ahead - burst * cost);
            status = 429;
            error_type = "rate_limit_error";
            extra.push(("retry-after-ms".into(), wait.as_millis().max(1).to_string()));
            extra.push((
                "retry-after".into(),
                wait.as_secs_f64().ceil().max(1.0).to_string(),
            ));
            extra.extend(limit_headers(&m.name, burst, 0, wait));
        } else {
            tats[model] = tat + cost;
            let remaining = ((burst * cost - ahead) / cost).floor().max(0.0) as u64;
            extra.extend(limit_headers(&m.name, burst, remaining, s.clock.real(cost)));
        }
    }
    if let Ok(mut log) = s.log.lock() {
        log.push(Call {
            t,
            model,
            status,
            wasted,
        });
    }
    // Failures come back fast, answers take the model's (possibly slowed) latency.
    let took = if status == 200 { latency } else { 0.2 };
    s.clock.sleep(took).await;
    let mut resp = (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        error_type.to_string(),
    )
        .into_response();
    let hs = resp.headers_mut();
    if !error_type.is_empty()
        && let Ok(v) = HeaderValue::from_str(error_type.split(':').next().unwrap_or(""))
    {
        hs.insert("x-error-type", v);
    }
    if status == 200 {
        hs.insert("x-input-tokens", HeaderValue::from(tokens));
        let out = header(&h, "x-output-tokens")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        hs.insert("x-output-tokens", HeaderValue::from(out));
    }
    for (k, v) in extra {
        if let (Ok(k), Ok(v)) = (
            axum::http::HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(&v),
        ) {
            hs.insert(k, v);
        }
    }
    resp
}

/// What an agent got back from the provider.
pub struct Reply {
    pub status: u16,
    /// Lower-cased names.
    pub headers: Vec<(String, String)>,
    pub took: Duration,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One provider call over a fresh connection (`Connection: close`): a minimal
/// HTTP/1.1 client, so the simulator needs no HTTP client crate. Status 0 means
/// the call itself failed (connect error or 10 s timeout).
pub async fn call(addr: std::net::SocketAddr, model: &str, tokens: u64, output: u64) -> Reply {
    let started = Instant::now();
    let go = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let req = format!(
            "POST /call HTTP/1.1\r\nhost: {addr}\r\nx-model: {model}\r\nx-tokens: {tokens}\r\nx-output-tokens: {output}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = match tokio::time::timeout(Duration::from_secs(10), go).await {
        Ok(Ok(b)) => b,
        _ => {
            return Reply {
                status: 0,
                headers: Vec::new(),
                took: started.elapsed(),
            };
        }
    };
    let text = String::from_utf8_lossy(&buf);
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Reply {
        status,
        headers,
        took: started.elapsed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(951_782_400_250); // leap day 2000
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00.250Z");
    }
}
