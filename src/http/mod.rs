//! The HTTP side: Prometheus metrics, Server-Sent Events for browsers, the
//! live dashboard, and liveness/readiness probes. Thin adapters like `grpc`.

mod api;
mod json;

use crate::config::Tenant;
use crate::domain::event::EventKind;
use crate::engine::Engine;
use crate::engine::watch::{SnapshotPart, WatchFilter, WatchItem};
use crate::grpc::auth::Need;
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
        .route("/login", axum::routing::post(login))
        .route("/metrics", get(metrics))
        .route("/events", get(events))
        .route("/api/snapshot", get(snapshot))
        .route("/api/event-kinds", get(event_kinds))
        .route("/api/events", get(api::events))
        .route("/api/history", get(api::history))
        .route("/api/routes", get(api::routes))
        .route("/api/queues", get(api::queues))
        .route("/api/spend", get(api::spend))
        .route(
            "/api/targets/{*rest}",
            axum::routing::post(api::target_action),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn dashboard(State(s): State<HttpState>, headers: HeaderMap) -> Response {
    if guarded(&s) && authorized(&s, &headers).is_some() {
        return (StatusCode::UNAUTHORIZED, Html(LOGIN)).into_response();
    }
    Html(DASHBOARD).into_response()
}

async fn metrics(State(s): State<HttpState>, headers: HeaderMap) -> Response {
    let open = s
        .engine
        .config()
        .auth
        .as_ref()
        .is_none_or(|a| a.metrics_open);
    // Open metrics show the whole server; with `metrics = "token"` a
    // tenant's viewer sees only the series of its own names.
    let tenant = if open {
        None
    } else {
        match viewer(&s, &headers) {
            Ok(t) => t,
            Err(denied) => return denied,
        }
    };
    let mut body = s.engine.render_metrics();
    if let Some(t) = tenant {
        body = tenant_metrics(&body, &t);
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// The credential of an HTTP request: `Authorization: Bearer <token>`, or
/// the cookie the login form sets (browsers cannot add headers to an
/// EventSource), as an `authorization` value.
fn credential(headers: &HeaderMap) -> Option<String> {
    if let Some(h) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        return Some(h.to_string());
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().strip_prefix(COOKIE_EQ))
        .map(|t| format!("Bearer {}", percent_decode(t)))
        .next()
}

const COOKIE: &str = "backstop_token";
const COOKIE_EQ: &str = "backstop_token=";

/// What shows the fleet (`/events`, `/api/snapshot`, the dashboard;
/// `/metrics` with `[auth] metrics = "token"`) needs the viewer role, or,
/// without `[auth]`, the admin token if there is one (see grpc/auth.rs).
/// Ok carries the viewer's tenant: each page then shows only its names.
// The refusal is the handler's response as is (see `authorized_as`).
#[allow(clippy::result_large_err)]
fn viewer(s: &HttpState, headers: &HeaderMap) -> Result<Option<Arc<Tenant>>, Response> {
    authorized_as(s, headers, Need::Viewer).map(|p| p.and_then(|p| p.tenant))
}

/// The metrics text with only what a tenant may see: series naming a
/// target, route, queue or spend scope of another tenant (or of none) are
/// dropped, with the family headers kept; series naming nothing (process
/// totals, RPC latencies) stay.
fn tenant_metrics(text: &str, t: &Tenant) -> String {
    let scope_prefixes = [format!("route:{}", t.prefix), format!("tenant:{}", t.name)];
    let mut out = String::with_capacity(text.len() / 2);
    for line in text.lines() {
        let keep = line.starts_with('#')
            || label_values(line).all(|(k, v)| match k {
                "target" | "route" | "queue" => t.owns(v),
                // A caller is not a tenant's name: its series are dropped.
                "caller" => v.is_empty(),
                "scope" => scope_prefixes.iter().any(|p| v.starts_with(p.as_str())),
                _ => true,
            });
        if keep {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// (name, value) of each label of one exposition line (values are quoted;
/// the exposition escapes `"` and `\` inside them).
fn label_values(line: &str) -> impl Iterator<Item = (&str, &str)> {
    let inner = line
        .split_once('{')
        .and_then(|(_, rest)| rest.rsplit_once('}'))
        .map_or("", |(l, _)| l);
    let mut rest = inner;
    std::iter::from_fn(move || {
        let (name, after) = rest.split_once("=\"")?;
        let bytes = after.as_bytes();
        let mut i = 0;
        while i < bytes.len() && bytes[i] != b'"' {
            i += if bytes[i] == b'\\' { 2 } else { 1 };
        }
        let value = after.get(..i.min(after.len()))?;
        rest = after.get(i + 1..).unwrap_or("").trim_start_matches(',');
        Some((name.trim(), value))
    })
}

fn authorized(s: &HttpState, headers: &HeaderMap) -> Option<Response> {
    authorized_as(s, headers, Need::Viewer).err()
}

/// Whether the request holds the credential `need` asks for; Ok carries the
/// principal (None without `[auth]`). Operator actions need
/// [`Need::Operator`]: the operator role, or without `[auth]` the admin
/// token (anyone, on a server with neither, as with the gRPC Admin service).
// The refusal is the handler's response as is: boxing it would only add an
// allocation on the refused path.
#[allow(clippy::result_large_err)]
fn authorized_as(
    s: &HttpState,
    headers: &HeaderMap,
    need: Need,
) -> Result<Option<crate::config::Principal>, Response> {
    let cfg = s.engine.config();
    let cred = credential(headers);
    let what = if need == Need::Operator {
        "this action"
    } else {
        "this page"
    };
    match crate::grpc::auth::authorize(&cfg, cred.as_deref(), None, need, true, what) {
        Ok(p) => Ok(p),
        Err(st) => {
            let code = if st.code() == tonic::Code::PermissionDenied {
                StatusCode::FORBIDDEN
            } else {
                StatusCode::UNAUTHORIZED
            };
            Err((
                code,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                format!(
                    "{}\n(send `Authorization: Bearer <token>`, or sign in at / for a cookie)\n",
                    st.message()
                ),
            )
                .into_response())
        }
    }
}

/// Whether viewing needs a credential at all on this server.
fn guarded(s: &HttpState) -> bool {
    let cfg = s.engine.config();
    cfg.auth.is_some() || cfg.server.admin_token.is_some()
}

/// `application/x-www-form-urlencoded` value decoding (`+` is a space).
fn percent_decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(x) => {
                        out.push(x);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The sign-in page: one field, posted to `/login`.
const LOGIN: &str = r#"<!doctype html><meta charset="utf-8"><title>Backstop: sign in</title>
<style>body{font:16px system-ui;margin:4em auto;max-width:28em}input{font:inherit;width:100%;margin:.4em 0}</style>
<h1>Backstop</h1><p>This server needs a viewer credential.</p>
<form method="post" action="/login"><label>Token <input name="token" type="password" autocomplete="current-password" autofocus></label>
<input type="submit" value="Sign in"></form>"#;

/// Checks a token from the sign-in form and, if it may view, sets it as an
/// HttpOnly, SameSite=Strict cookie (scripts cannot read it, other sites
/// cannot send it).
async fn login(State(s): State<HttpState>, body: String) -> Response {
    if body.len() > 4096 {
        return (StatusCode::PAYLOAD_TOO_LARGE, "form too large\n").into_response();
    }
    let token = body
        .split('&')
        .find_map(|kv| kv.strip_prefix("token="))
        .map(percent_decode)
        .unwrap_or_default();
    let cfg = s.engine.config();
    let cred = format!("Bearer {token}");
    match crate::grpc::auth::authorize(&cfg, Some(&cred), None, Need::Viewer, true, "sign-in") {
        Ok(_) if !token.is_empty() => {
            let encoded: String = token
                .bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect();
            (
                StatusCode::SEE_OTHER,
                [
                    (header::LOCATION, "/".to_string()),
                    (
                        header::SET_COOKIE,
                        format!("{COOKIE}={encoded}; HttpOnly; SameSite=Strict; Path=/"),
                    ),
                ],
            )
                .into_response()
        }
        _ => (
            StatusCode::UNAUTHORIZED,
            Html(format!(
                "{LOGIN}<p><b>That token may not view this server.</b></p>"
            )),
        )
            .into_response(),
    }
}

/// The current state of every target (what a Snapshot event carries), for
/// polling; plus, for the dashboard, each target's 15-minute totals
/// (`recent`, null when no history is kept for it), the history cap, and
/// whether this viewer may act (`viewer.operator`: the page shows the
/// operator buttons only then; the actions check again).
async fn snapshot(State(s): State<HttpState>, headers: HeaderMap) -> Response {
    let tenant = match viewer(&s, &headers) {
        Ok(t) => t,
        Err(denied) => return denied,
    };
    let now = s.engine.now();
    let filter = WatchFilter {
        tenant,
        ..Default::default()
    };
    let item = WatchItem::Snapshot(SnapshotPart::whole(
        s.engine.events().last_seq(),
        now,
        s.engine.snapshot(&filter).await.into(),
    ));
    let mut v = json::item(&item);
    let h = s.engine.history();
    if let Some(list) = v.get_mut("targets").and_then(|t| t.as_array_mut()) {
        for t in list {
            let recent = t
                .get("target")
                .and_then(|n| n.as_str())
                .map(|n| json::totals(h.totals(n, now)))
                .unwrap_or_default();
            if let Some(m) = t.as_object_mut() {
                m.insert("recent".into(), recent);
            }
        }
    }
    if let Some(m) = v.as_object_mut() {
        let operator = authorized_as(&s, &headers, Need::Operator).is_ok();
        m.insert(
            "viewer".into(),
            serde_json::json!({ "operator": operator, "guarded": guarded(&s) }),
        );
        m.insert(
            "history".into(),
            serde_json::json!({ "cap": h.cap(), "held": h.held(), "capped": h.capped() }),
        );
    }
    ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
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
    let tenant = match viewer(&s, &headers) {
        Ok(t) => t,
        Err(denied) => return denied,
    };
    let since = match headers
        .get("last-event-id")
        .map(|v| v.to_str().map(str::parse::<u64>))
    {
        Some(Ok(Ok(n))) => n,
        Some(_) => return bad_request("Last-Event-ID must be an event seq (a number)\n".into()),
        None => q.since.unwrap_or(0),
    };
    let mut filter = WatchFilter {
        tenant,
        ..Default::default()
    };
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
