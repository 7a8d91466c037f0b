//! `backstop.v1.Events`: the live event stream.

use super::admin::budget;
use super::{breaker_state, opt_timestamp, status, to_timestamp};
use crate::engine::watch::{WatchFilter, WatchItem};
use crate::engine::{Engine, TargetView};
use crate::proto;
use crate::proto::event::Kind;
use crate::proto::events_server::Events;
use std::sync::Arc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// `Watch` needs the agent or viewer role (or, without `[auth]`, the admin
/// token): checked by `auth::AuthLayer` before the call gets here.
pub struct EventsService {
    engine: Arc<Engine>,
}

impl EventsService {
    pub fn new(engine: Arc<Engine>) -> Self {
        EventsService { engine }
    }
}

/// Maps the proto kind enum to the engine's event names: `EVENT_KIND_X` is
/// the kind named `x` (SNAPSHOT and GAP are not events and match nothing).
fn kind_name(k: proto::EventKind) -> Option<&'static str> {
    let name = k
        .as_str_name()
        .strip_prefix("EVENT_KIND_")?
        .to_ascii_lowercase();
    crate::domain::event::EventKind::parse_name(&name)
}

pub(crate) fn target_snapshot(v: &TargetView) -> proto::TargetSnapshot {
    let mut budgets: Vec<proto::BudgetStatus> = Vec::new();
    for s in &v.slots {
        for b in &s.budgets {
            let mut p = budget(b);
            if let Some(name) = &s.name {
                p.group = format!("key:{name}");
            }
            budgets.push(p);
        }
    }
    budgets.extend(v.groups.iter().map(budget));
    proto::TargetSnapshot {
        target: v.name.to_string(),
        state: breaker_state(v.state) as i32,
        open_until: opt_timestamp(v.open_until),
        consecutive_failures: v.consecutive_failures,
        probes_outstanding: v.probes_outstanding,
        counters: Some(super::outcome_counters(&v.counters)),
        budgets,
        paused_until: opt_timestamp(v.slots.iter().filter_map(|s| s.paused_until).max()),
        last_cause: v.last_cause.clone().unwrap_or_default(),
    }
}

pub(crate) fn item(w: WatchItem) -> proto::Event {
    match w {
        WatchItem::Event(e) => crate::wire::event_to_proto(&e),
        WatchItem::Snapshot(p) => proto::Event {
            seq: p.seq,
            at: Some(to_timestamp(p.at)),
            target: String::new(),
            kind: Some(Kind::Snapshot(proto::Snapshot {
                targets: p.targets().iter().map(target_snapshot).collect(),
                part: p.part,
                parts: p.parts,
            })),
        },
        WatchItem::Gap {
            missed_from,
            reason: r,
        } => proto::Event {
            seq: 0,
            at: None,
            target: String::new(),
            kind: Some(Kind::Gap(proto::Gap {
                missed_from,
                reason: r,
            })),
        },
    }
}

/// Builds a filter from wire values, rejecting unknown kinds.
pub(crate) fn filter(targets: Vec<String>, kinds: &[i32]) -> Result<WatchFilter, Status> {
    let mut f = WatchFilter {
        targets: targets.into_iter().collect(),
        ..Default::default()
    };
    for &k in kinds {
        let kind = proto::EventKind::try_from(k)
            .map_err(|_| Status::invalid_argument(format!("kinds: {k} is not an EventKind")))?;
        if let Some(name) = kind_name(kind) {
            f.kinds.insert(name);
        }
    }
    Ok(f)
}

#[tonic::async_trait]
impl Events for EventsService {
    type WatchStream = ReceiverStream<Result<proto::Event, Status>>;

    async fn watch(
        &self,
        req: Request<proto::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let tenant = super::tenant::of(&req);
        let r = req.into_inner();
        let mut f = filter(r.targets, &r.kinds)?;
        f.tenant = tenant;
        let mut watcher = self.engine.watch(r.since_seq, f).await.map_err(status)?;
        // A small buffer to the connection (a few snapshot parts): when it
        // fills, the watcher's own (bounded) buffer lags and turns into Gap +
        // Snapshot; the engine never waits, and an unread stream holds little.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                // Notice a client that went away even while nothing happens,
                // so its subscriber slot is given back at once.
                let next = tokio::select! {
                    w = watcher.next() => w,
                    _ = tx.closed() => None,
                };
                let Some(w) = next else { break };
                if tx.send(Ok(item(w))).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_name_has_a_wire_kind_and_back() {
        let mut mapped = Vec::new();
        for v in 0..64 {
            if let Ok(k) = proto::EventKind::try_from(v)
                && let Some(n) = kind_name(k)
            {
                mapped.push(n);
            }
        }
        assert_eq!(mapped, crate::domain::event::EventKind::NAMES.to_vec());
    }
}
