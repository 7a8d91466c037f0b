//! JSON payloads of the SSE stream (what the dashboard reads).

use crate::domain::Time;
use crate::domain::history::{Point, Series, Totals};
use crate::engine::events::{Event, EventKind};
use crate::engine::watch::WatchItem;
use crate::engine::{BudgetView, TargetView};
use serde_json::{Value, json};

pub fn ms(t: Time) -> u64 {
    t.as_nanos() / 1_000_000
}

fn opt_ms(t: Option<Time>) -> Value {
    t.map_or(Value::Null, |t| json!(ms(t)))
}

fn budget(b: &BudgetView, key_slot: Option<&str>) -> Value {
    json!({
        "kind": b.kind,
        "limit": b.limit,
        "window_ms": b.window.as_millis() as u64,
        "available": b.available,
        "group": b.group.as_deref(),
        "key_slot": key_slot,
    })
}

pub fn target(v: &TargetView) -> Value {
    let c = &v.counters;
    let mut budgets: Vec<Value> = v
        .slots
        .iter()
        .flat_map(|s| {
            s.budgets
                .iter()
                .map(|b| budget(b, s.name.as_deref()))
                .collect::<Vec<_>>()
        })
        .collect();
    budgets.extend(v.groups.iter().map(|b| budget(b, None)));
    let classes: serde_json::Map<String, Value> = crate::domain::OutcomeClass::ALL
        .iter()
        .map(|cl| (cl.as_str().to_string(), json!(c.by_class[cl.index()])))
        .collect();
    json!({
        "target": v.name.as_ref(),
        "state": v.state.as_str(),
        "open_until_ms": opt_ms(v.open_until),
        "consecutive_failures": v.consecutive_failures,
        "probes_outstanding": v.probes_outstanding,
        "admitted": c.admitted,
        "refused": c.refused,
        "outcomes": classes,
        "budgets": budgets,
        "paused_until_ms": opt_ms(v.slots.iter().filter_map(|s| s.paused_until).max()),
        "disabled_key_slots": v.slots.iter().filter(|s| s.disabled_until.is_some()).filter_map(|s| s.name.as_deref()).collect::<Vec<_>>(),
        "last_cause": v.last_cause,
        "forced_reason": v.forced_reason,
        "in_flight": v.in_flight,
        "latency_ms": v.latency.map(|d| d.as_secs_f64() * 1000.0),
        "distinct_failing_callers": v.distinct_failing_callers,
        "spend": {
            "total": v.spend_total,
            "limits": v.spend_limits.iter().map(|l| json!({
                "scope": l.scope.as_ref(), "limit": l.limit,
                "window_ms": l.window.as_millis() as u64, "available": l.available,
            })).collect::<Vec<_>>(),
        },
        "adaptive": v.adaptive.as_ref().map(|a| json!({
            "limit": a.limit, "min": a.min, "max": a.max, "last_change": a.last_change,
        })),
        "learned": v.slots.iter().flat_map(|s| s.learned.iter().map(|(kind, l)| json!({
            "key_slot": s.name.as_deref(), "kind": kind.as_str(), "limit": l.limit,
            "remaining": l.remaining, "reset_at_ms": ms(l.reset_at),
            "observed_at_ms": ms(l.observed_at),
        }))).collect::<Vec<_>>(),
        "key_slots": v.slots.iter().map(|s| json!({
            "name": s.name.as_deref(), "in_flight": s.in_flight,
            "paused_until_ms": opt_ms(s.paused_until),
            "disabled_until_ms": opt_ms(s.disabled_until),
            "disabled_reason": s.disabled_reason,
        })).collect::<Vec<_>>(),
    })
}

/// A target's 15-minute history totals (None: no history kept for it).
pub fn totals(t: Option<Totals>) -> Value {
    t.map_or(
        Value::Null,
        |t| json!({ "admitted": t.admitted, "refused": t.refused, "failed": t.failed }),
    )
}

/// A target's history as parallel arrays, oldest bucket first (compact for
/// sparklines: one number per bucket per series).
pub fn series(s: &Series) -> Value {
    let p = &s.points;
    let q = |f: fn(&Point) -> Option<f64>| -> Vec<Value> {
        p.iter()
            .map(|x| f(x).map_or(Value::Null, |v| json!((v * 10.0).round() / 10.0)))
            .collect()
    };
    json!({
        "start_ms": ms(s.start),
        "admitted": p.iter().map(|x| x.admitted).collect::<Vec<_>>(),
        "refused": p.iter().map(|x| x.refused).collect::<Vec<_>>(),
        "failed": p.iter().map(|x| x.failed).collect::<Vec<_>>(),
        "p50_ms": q(|x| x.p50_ms),
        "p99_ms": q(|x| x.p99_ms),
    })
}

pub fn event(e: &Event) -> Value {
    let mut v = match &e.kind {
        EventKind::BreakerTransition {
            from,
            to,
            cause,
            class,
            failures,
            caller,
            open_until,
        } => json!({
            "from": from.as_str(), "to": to.as_str(), "cause": cause,
            "class": class.map(|c| c.as_str()), "failures": failures,
            "caller": caller.as_deref(), "open_until_ms": opt_ms(*open_until),
        }),
        EventKind::ProbeExpired { probe } => json!({ "probe": probe }),
        EventKind::TargetForced { mode, reason } => {
            json!({ "mode": format!("{mode:?}"), "reason": reason })
        }
        EventKind::RateLimited {
            key_slot,
            kind,
            until,
            why,
        } => json!({
            "key_slot": key_slot.as_deref(), "budget": kind.map(|k| k.as_str()),
            "until_ms": ms(*until), "why": why,
        }),
        EventKind::BudgetRestored { key_slot } => json!({ "key_slot": key_slot.as_deref() }),
        EventKind::KeySlotDisabled {
            key_slot,
            until,
            why,
        } => json!({
            "key_slot": key_slot.as_ref(), "until_ms": ms(*until), "why": why,
        }),
        EventKind::FallbackActivated {
            route,
            from,
            to,
            depth,
            why,
        } => json!({
            "route": route.as_ref(), "from": from.as_deref(), "to": to.as_ref(),
            "depth": depth, "why": why.as_str(),
        }),
        EventKind::RouteExhausted { route, retry_after } => json!({
            "route": route.as_ref(), "retry_after_ms": retry_after.map(|d| d.as_millis() as u64),
        }),
        EventKind::TargetReset => json!({}),
        EventKind::ItemDeferred { queue, id, depth } => {
            json!({ "queue": queue.as_ref(), "id": id.to_string(), "depth": depth })
        }
        EventKind::ItemDrained { queue, id } => {
            json!({ "queue": queue.as_ref(), "id": id.to_string() })
        }
        EventKind::ItemDeadLettered {
            queue,
            id,
            reason,
            attempts,
        } => json!({
            "queue": queue.as_ref(), "id": id.to_string(), "reason": reason, "attempts": attempts,
        }),
        EventKind::RedisUnavailable { replica, error } => json!({
            "replica": replica.as_ref(), "error": error,
        }),
        EventKind::RedisRestored { replica, merged } => json!({
            "replica": replica.as_ref(), "merged": merged,
        }),
        EventKind::ConfigMismatch { replicas } => json!({ "replicas": replicas }),
        EventKind::ConfigReloaded {
            digest,
            previous_digest,
            added,
            removed,
            changed,
            needs_restart,
            source,
        } => json!({
            "digest": digest, "previous_digest": previous_digest, "added": added,
            "removed": removed, "changed": changed, "needs_restart": needs_restart,
            "source": source,
        }),
        EventKind::TargetRemoved { reason } => json!({ "reason": reason }),
        EventKind::SpendLimitReached {
            scope,
            limit,
            window,
            retry_after,
        } => json!({
            "scope": scope.as_ref(), "limit": limit, "window_ms": window.as_millis() as u64,
            "retry_after_ms": retry_after.as_millis() as u64,
        }),
        EventKind::LimitAdapted {
            limit,
            previous,
            why,
        } => json!({ "limit": limit, "previous": previous, "why": why }),
        EventKind::OperatorAction {
            action,
            principal,
            tenant,
            reason,
            via,
        } => json!({
            "action": action.as_ref(), "principal": principal.as_ref(),
            "tenant": tenant.as_ref(), "reason": reason, "via": via.as_ref(),
        }),
    };
    if let Value::Object(m) = &mut v {
        m.insert("seq".into(), json!(e.seq));
        m.insert("at_ms".into(), json!(ms(e.at)));
        m.insert("target".into(), json!(e.target.as_ref()));
        m.insert("kind".into(), json!(e.kind.name()));
    }
    v
}

pub fn item(w: &WatchItem) -> Value {
    match w {
        WatchItem::Event(e) => event(e),
        WatchItem::Snapshot(p) => json!({
            "kind": "snapshot", "seq": p.seq, "at_ms": ms(p.at),
            "part": p.part, "parts": p.parts,
            "targets": p.targets().iter().map(target).collect::<Vec<_>>(),
        }),
        WatchItem::Gap {
            missed_from,
            reason,
        } => json!({
            "kind": "gap", "missed_from": missed_from, "reason": reason,
        }),
    }
}
