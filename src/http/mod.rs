//! The HTTP side: Prometheus metrics, Server-Sent Events for browsers, the
//! live dashboard, and liveness/readiness probes. Thin adapters like `grpc`.

mod json;

use crate::domain::event::EventKind;
use crate::engine::Engine;
use crate::engine::watch::{SnapshotPart, WatchFilter, WatchItem};
use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio_stream::wrappers::ReceiverStream;

/// The dashboard: one self-contained page, no build step, no external assets.
const DASHBOARD: &str = include_str!("dashboard.html");

#[derive(Clone)]
pub struct HttpState {
    pub engine: Arc<Engine>,
    /// False once the server starts draining.
    pub ready: Arc<AtomicBool>,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/metrics", get(metrics))
        .route("/events", get(events))
        .route("/api/snapshot", get(snapshot))
        .route("/api/event-kinds", get(event_kinds))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn dashboard() -> Html<&'static str> {
    Html(DASHBOARD)
}

async fn metrics(State(s): State<HttpState>) -> Response {
    let body = s.engine.render_metrics();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// With `[server] admin_token` set, what shows the whole fleet (`/events`,
/// `/api/snapshot`) needs `Authorization: Bearer <admin_token>`.
fn authorized(s: &HttpState, headers: &HeaderMap) -> Option<Response> {
    let token = crate::grpc::auth::OperatorToken(s.engine.config().server.admin_token.clone());
    let header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if token.check_http(header) {
        None
    } else {
        Some(
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "this server has an admin token: send `Authorization: Bearer <admin_token>`\n",
            )
                .into_response(),
        )
    }
}

/// The current state of every target (what a Snapshot event carries), for polling.
async fn snapshot(State(s): State<HttpState>, headers: HeaderMap) -> Response {
    if let Some(denied) = authorized(&s, &headers) {
        return denied;
    }
    let item = WatchItem::Snapshot(SnapshotPart::whole(
        s.engine.events().last_seq(),
        s.engine.now(),
        s.engine.snapshot(&WatchFilter::default()).await.into(),
    ));
    (
        [(header::CONTENT_TYPE, "application/json")],
        json::item(&item).to_string(),
    )
        .into_response()
}

/// The event kind names the stream can carry (the dashboard subscribes to each).
async fn event_kinds() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_string(&EventKind::NAMES).unwrap_or_else(|_| "[]".into()),
    )
        .into_response()
}

async fn readyz(State(s): State<HttpState>) -> Response {
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    }
}

#[derive(Deserialize, Default)]
struct EventsQuery {
    /// Resume after this seq (the `Last-Event-ID` header wins when present).
    since: Option<u64>,
    /// Comma-separated target / route / queue names.
    targets: Option<String>,
    /// Comma-separated event kinds (`breaker_transition`, `rate_limited`, ...).
    kinds: Option<String>,
}

fn bad_request(msg: String) -> Response {
    (StatusCode::BAD_REQUEST, msg).into_response()
}

async fn events(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Query(q): Query<EventsQuery>,
) -> Response {
    if let Some(denied) = authorized(&s, &headers) {
        return denied;
    }
    let since = match headers
        .get("last-event-id")
        .map(|v| v.to_str().map(str::parse::<u64>))
    {
        Some(Ok(Ok(n))) => n,
        Some(_) => return bad_request("Last-Event-ID must be an event seq (a number)\n".into()),
        None => q.since.unwrap_or(0),
    };
    let mut filter = WatchFilter::default();
    if let Some(t) = q.targets.as_deref().filter(|t| !t.is_empty()) {
        filter.targets = t.split(',').map(|s| s.trim().to_string()).collect();
    }
    if let Some(k) = q.kinds.as_deref().filter(|k| !k.is_empty()) {
        for name in k.split(',').map(str::trim) {
            match EventKind::parse_name(name) {
                Some(known) => {
                    filter.kinds.insert(known);
                }
                None => {
                    return bad_request(format!(
                        "unknown event kind {name:?}; known kinds: {}\n",
                        EventKind::NAMES.join(", ")
                    ));
                }
            }
        }
    }
    let mut watcher = match s.engine.watch(since, filter).await {
        Ok(w) => w,
        Err(crate::engine::EngineError::ResourceExhausted(m)) => {
            return (StatusCode::SERVICE_UNAVAILABLE, m).into_response();
        }
        Err(e) => return bad_request(e.to_string()),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<SseEvent, Infallible>>(4);
    tokio::spawn(async move {
        loop {
            // Notice a browser that went away even while nothing happens.
            let next = tokio::select! {
                w = watcher.next() => w,
                _ = tx.closed() => None,
            };
            let Some(item) = next else { break };
            let (id, name) = match &item {
                WatchItem::Event(e) => (Some(e.seq), e.kind.name()),
                WatchItem::Snapshot(p) => (Some(p.seq), "snapshot"),
                WatchItem::Gap { .. } => (None, "gap"),
            };
            let mut ev = SseEvent::default()
                .event(name)
                .data(json::item(&item).to_string());
            if let Some(id) = id {
                ev = ev.id(id.to_string());
            }
            if tx.send(Ok(ev)).await.is_err() {
                break;
            }
        }
    });
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}
