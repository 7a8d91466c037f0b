//! The dashboard's JSON API beyond `/api/snapshot`: recent events, traffic
//! history, routes, queues, and the operator actions. Thin adapters over
//! the engine; every decision (what a route would choose, what history is
//! kept) is made there.
//!
//! History is its own endpoint rather than part of the snapshot: 90 buckets
//! x 5 series for every target would make a 1,000-target snapshot
//! megabytes, polled every few seconds. The snapshot carries each target's
//! 15-minute totals (enough to sort and filter by); the page asks for the
//! series of the targets it actually shows.

use super::{HttpState, authorized_as, json, viewer};
use crate::domain::breaker::Mode;
use crate::domain::history::{BUCKET, BUCKETS};
use crate::engine::EngineError;
use crate::engine::events::EventKind;
use crate::grpc::auth::Need;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

/// Most events `/api/events` returns at once.
pub const MAX_EVENTS: usize = 1000;
/// Events `/api/events` returns without `limit`.
const DEFAULT_EVENTS: usize = 200;
/// Most targets one `/api/history` request may name.
pub const MAX_HISTORY_TARGETS: usize = 200;
/// Recent fallbacks listed per route.
const FALLBACKS_PER_ROUTE: usize = 5;
/// The header a state-changing request must carry. Browsers cannot add it
/// to a cross-site form post, and a cross-site script adding it triggers a
/// CORS preflight this server never approves, so the sign-in cookie cannot
/// be used to act on someone's behalf (CSRF).
pub const ACTION_HEADER: &str = "x-backstop-action";

fn ok_json(v: Value) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

fn error(code: StatusCode, msg: impl Into<String>) -> Response {
    (code, json!({ "error": msg.into() }).to_string()).into_response()
}

#[derive(Deserialize, Default)]
pub(super) struct EventsQuery {
    limit: Option<usize>,
}

/// The newest retained events (oldest first), so a page opened after an
/// incident shows what happened; it then follows `/events?since=<last_seq>`.
pub(super) async fn events(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Query(q): Query<EventsQuery>,
) -> Response {
    let tenant = match viewer(&s, &headers) {
        Ok(t) => t,
        Err(denied) => return denied,
    };
    let limit = q.limit.unwrap_or(DEFAULT_EVENTS).min(MAX_EVENTS);
    // The seq is read first: an event published in between is both listed
    // and resumed after, and the page drops duplicates by seq.
    let last_seq = s.engine.events().last_seq();
    let filter = crate::engine::watch::WatchFilter {
        tenant,
        ..Default::default()
    };
    let events = s.engine.events().recent(limit, |e| filter.matches(e));
    ok_json(json!({
        "last_seq": events.last().map_or(last_seq, |e| e.seq.max(last_seq)),
        "now_ms": json::ms(s.engine.now()),
        "events": events.iter().map(|e| json::event(e)).collect::<Vec<_>>(),
    }))
}

#[derive(Deserialize, Default)]
pub(super) struct HistoryQuery {
    /// Comma-separated target names.
    targets: Option<String>,
}

/// The last 15 minutes of the named targets, one 10-second bucket per
/// array element, oldest first; `null` for a target with no history (no
/// traffic on this replica yet, or beyond `[events] history_targets`).
pub(super) async fn history(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Query(q): Query<HistoryQuery>,
) -> Response {
    let tenant = match viewer(&s, &headers) {
        Ok(t) => t,
        Err(denied) => return denied,
    };
    let names: Vec<&str> = q
        .targets
        .as_deref()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect();
    if names.len() > MAX_HISTORY_TARGETS {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "{} targets named; at most {MAX_HISTORY_TARGETS} per request",
                names.len()
            ),
        );
    }
    let now = s.engine.now();
    let h = s.engine.history();
    let targets: serde_json::Map<String, Value> = names
        .iter()
        .map(|&n| {
            // Another tenant's name reads like one with no history.
            let v = if tenant.as_ref().is_some_and(|t| !t.owns(n)) {
                Value::Null
            } else {
                h.series(n, now).map_or(Value::Null, |x| json::series(&x))
            };
            (n.to_string(), v)
        })
        .collect();
    ok_json(json!({
        "bucket_ms": BUCKET.as_millis() as u64,
        "buckets": BUCKETS,
        "now_ms": json::ms(now),
        "cap": h.cap(),
        "held": h.held(),
        "capped": h.capped(),
        "targets": targets,
    }))
}

/// Each configured route: its targets in order, the one Route would choose
/// now (computed by the engine without admitting), and recent fallbacks.
pub(super) async fn routes(State(s): State<HttpState>, headers: HeaderMap) -> Response {
    let tenant = match viewer(&s, &headers) {
        Ok(t) => t,
        Err(denied) => return denied,
    };
    let previews = s.engine.preview_routes().await;
    let routes: Vec<Value> = previews
        .iter()
        .filter(|r| tenant.as_ref().is_none_or(|t| t.owns(&r.name)))
        .map(|r| {
            let fallbacks = s.engine.events().recent(FALLBACKS_PER_ROUTE, |e| {
                matches!(&e.kind, EventKind::FallbackActivated { route, .. } if *route == r.name)
            });
            json!({
                "route": r.name.as_ref(),
                "strategy": r.strategy.as_str(),
                "targets": r.targets.iter().map(|t| t.as_ref()).collect::<Vec<_>>(),
                "chosen": r.chosen.as_deref(),
                "unavailable": r.unavailable.iter().map(|(t, why)| json!({
                    "target": t.as_ref(), "reason": why.as_str(),
                })).collect::<Vec<_>>(),
                "recent_fallbacks": fallbacks.iter().map(|e| json::event(e)).collect::<Vec<_>>(),
                // End to end (requests named by request_id), since start.
                "requests": s.engine.metrics().requests.summary(&r.name),
            })
        })
        .collect();
    ok_json(json!({ "routes": routes }))
}

/// Every route, caller and tenant spend limit with its level (a tenant's
/// viewer: its routes' and its own only). Money is in the prices' currency.
pub(super) async fn spend(State(s): State<HttpState>, headers: HeaderMap) -> Response {
    let tenant = match viewer(&s, &headers) {
        Ok(t) => t,
        Err(denied) => return denied,
    };
    let now = s.engine.now();
    let scopes: Vec<Value> = s
        .engine
        .spend_levels()
        .iter()
        .filter(|l| {
            tenant.as_ref().is_none_or(|t| {
                l.key.strip_prefix("route:").is_some_and(|r| t.owns(r))
                    || l.key.strip_prefix("tenant:") == Some(t.name.as_ref())
            })
        })
        .map(|l| {
            json!({
                "scope": l.key.as_ref(),
                "limit": crate::domain::spend::dollars(l.limit.amount),
                "window_s": l.limit.window.as_secs_f64(),
                "available": l.available_micros / 1e6,
                "spent": crate::domain::spend::dollars(l.total_micros),
            })
        })
        .collect();
    ok_json(json!({ "now_ms": json::ms(now), "scopes": scopes }))
}

/// Depth, oldest age, in flight and dead letters of every queue.
pub(super) async fn queues(State(s): State<HttpState>, headers: HeaderMap) -> Response {
    let tenant = match viewer(&s, &headers) {
        Ok(t) => t,
        Err(denied) => return denied,
    };
    match s.engine.queue_stats("").await {
        Ok(stats) => ok_json(json!({
            "queues": stats.iter().filter(|q| tenant.as_ref().is_none_or(|t| t.owns(&q.queue))).map(|q| json!({
                "queue": q.queue, "depth": q.depth, "in_flight": q.in_flight,
                "dead_letters": q.dead_letters,
                "oldest_age_ms": q.oldest_age.as_millis() as u64, "bytes": q.bytes,
            })).collect::<Vec<_>>(),
        })),
        Err(e) => engine_error(e),
    }
}

fn engine_error(e: EngineError) -> Response {
    let code = match &e {
        EngineError::InvalidArgument(_) => StatusCode::BAD_REQUEST,
        EngineError::NotFound(_) => StatusCode::NOT_FOUND,
        EngineError::ResourceExhausted(_) => StatusCode::TOO_MANY_REQUESTS,
        EngineError::FailedPrecondition(_) => StatusCode::CONFLICT,
        EngineError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    error(code, e.to_string())
}

#[derive(Deserialize)]
struct BreakerBody {
    /// "force_open" | "force_closed" | "automatic".
    mode: String,
    #[serde(default)]
    reason: String,
}

/// `POST /api/targets/<name>/breaker` (`{"mode": "force_open", "reason": ...}`)
/// and `POST /api/targets/<name>/reset`: the Admin service's operations,
/// for a viewer holding the operator credential. The name may contain `/`
/// (`openai/gpt-4o`), raw or as `%2F`, so the action is the last segment.
pub(super) async fn target_action(
    State(s): State<HttpState>,
    headers: HeaderMap,
    Path(rest): Path<String>,
    body: String,
) -> Response {
    let principal = match authorized_as(&s, &headers, Need::Operator) {
        Ok(p) => p,
        Err(denied) => return denied,
    };
    if headers.get(ACTION_HEADER).is_none() {
        return error(
            StatusCode::FORBIDDEN,
            format!("operator actions need the header `{ACTION_HEADER}: 1` (CSRF protection)"),
        );
    }
    if body.len() > 4096 {
        return error(StatusCode::PAYLOAD_TOO_LARGE, "body larger than 4096 bytes");
    }
    let Some((target, action)) = rest.rsplit_once('/') else {
        return error(
            StatusCode::NOT_FOUND,
            "use /api/targets/<name>/breaker or /api/targets/<name>/reset",
        );
    };
    if let Some(t) = principal.as_ref().and_then(|p| p.tenant.as_ref())
        && !t.owns(target)
    {
        let e = crate::grpc::tenant::not_found(t, "target", target);
        return error(StatusCode::NOT_FOUND, e.message());
    }
    let by = principal.as_ref().map_or_else(
        || "-".into(),
        |p| crate::grpc::auth::audit_name(p).to_string(),
    );
    let result = match action {
        "breaker" => {
            let b: BreakerBody = match serde_json::from_str(&body) {
                Ok(b) => b,
                Err(e) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "body must be JSON {{\"mode\": \"force_open\"|\"force_closed\"|\"automatic\", \"reason\": \"...\"}}: {e}"
                        ),
                    );
                }
            };
            let mode = match b.mode.as_str() {
                "force_open" => Mode::ForcedOpen,
                "force_closed" => Mode::ForcedClosed,
                "automatic" => Mode::Automatic,
                other => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "mode {other:?}: use \"force_open\", \"force_closed\" or \"automatic\""
                        ),
                    );
                }
            };
            let reason = match (by.as_str(), b.reason.trim()) {
                ("-", r) => r.to_string(),
                (who, "") => format!("by {who}"),
                (who, r) => format!("{r} (by {who})"),
            };
            let r = s.engine.set_breaker_mode(target, mode, &reason).await;
            tracing::info!(principal = %by, action = "set_breaker_state", target = %target, mode = ?mode, reason = %b.reason, via = "dashboard", "operator action");
            if r.is_ok() {
                s.engine.audit(
                    target,
                    "set_breaker_state",
                    principal.as_ref(),
                    &format!("{mode:?}: {}", b.reason.trim()),
                    "dashboard",
                );
            }
            r
        }
        "reset" => {
            let r = s.engine.reset_target(target).await;
            tracing::info!(principal = %by, action = "reset_target", target = %target, via = "dashboard", "operator action");
            if r.is_ok() {
                s.engine
                    .audit(target, "reset_target", principal.as_ref(), "", "dashboard");
            }
            r
        }
        _ => {
            return error(
                StatusCode::NOT_FOUND,
                format!("unknown action {action:?}; use breaker or reset"),
            );
        }
    };
    match result {
        Ok(v) => ok_json(json::target(&v)),
        Err(e) => engine_error(e),
    }
}
