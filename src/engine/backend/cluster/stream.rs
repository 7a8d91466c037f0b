//! Events across replicas: one Redis Stream every replica appends to and
//! reads from, so `Watch`, `/events` and the dashboard on any replica show
//! the whole cluster, in one order, resumable by seq.
//!
//! A stream, not pub/sub: pub/sub drops what is published while a replica
//! is disconnected; a stream keeps it (up to `MAXLEN`), and a replica that
//! reconnects reads on from the last id it saw. An event's seq is its stream
//! id (`<ms>-<n>` as `ms << 20 | n`), so every replica numbers every event
//! the same and a dashboard can resume on another replica. Reading blocks
//! (`XREAD BLOCK`), so it has its own connection, never the decision one.

use super::Inner;
use super::link::{Conn, Link};
use crate::domain::Time;
use crate::domain::event::EventKind;
use crate::engine::events::Event;
use crate::proto;
use prost::Message as _;
use redis::Value;
use std::sync::Arc;
use std::time::Duration;

/// The wire form of an event in the stream.
pub(super) fn encode(at: Time, target: &Arc<str>, kind: EventKind) -> Vec<u8> {
    let ev = Event {
        seq: 0,
        at,
        target: target.clone(),
        kind,
    };
    crate::wire::event_to_proto(&ev).encode_to_vec()
}

/// A stream id as a seq: `<ms>-<n>` -> `ms << 20 | n` (n < 2^20 per ms).
pub(super) fn seq_of(id: &str) -> Option<u64> {
    let (ms, n) = id.split_once('-')?;
    let (ms, n) = (ms.parse::<u64>().ok()?, n.parse::<u64>().ok()?);
    Some((ms << 20) | n.min((1 << 20) - 1))
}

fn entries(v: &Value) -> Vec<(String, Vec<u8>)> {
    // [[id, [field, value, ...]], ...]
    let mut out = Vec::new();
    if let Value::Array(items) = v {
        for it in items {
            if let Value::Array(pair) = it
                && let (Some(id), Some(Value::Array(fields))) = (pair.first(), pair.get(1))
            {
                let id = String::from_utf8_lossy(&super::bytes(id)).into_owned();
                let mut data = Vec::new();
                for kv in fields.chunks(2) {
                    if super::bytes(&kv[0]) == b"e" {
                        data = kv.get(1).map(super::bytes).unwrap_or_default();
                    }
                }
                out.push((id, data));
            }
        }
    }
    out
}

fn publish(inner: &Inner, id: &str, data: &[u8]) {
    let Some(seq) = seq_of(id) else { return };
    let Ok(ev) = proto::Event::decode(data) else {
        return;
    };
    let Some((at, target, kind)) = crate::wire::event_from_proto(ev) else {
        return;
    };
    // Operators changed a breaker somewhere: refusals cached here may be wrong.
    if matches!(
        kind,
        EventKind::TargetForced { .. }
            | EventKind::TargetReset
            | EventKind::BreakerTransition { .. }
    ) && let Some(m) = inner.metas.get(target.as_ref())
    {
        m.forget_refusal();
        if matches!(
            kind,
            EventKind::TargetForced { .. } | EventKind::TargetReset
        ) {
            m.forget_heard_open();
        }
    }
    // A breaker opened on some replica: remembered here even for a target
    // this replica has not decided on yet (if it is in the config; targets
    // created on first use count against this replica's cap only when its
    // own clients use them), for when this replica must decide without Redis.
    if let EventKind::BreakerTransition {
        to: crate::domain::breaker::BreakerState::Open,
        open_until: Some(until),
        ..
    } = &kind
        && let Some(m) = inner.known_meta(&target)
    {
        m.heard_open(*until);
    }
    if matches!(kind, EventKind::ItemDeferred { .. }) {
        inner.queue_wake.notify_waiters();
    }
    inner.events.publish_numbered(seq, at, &target, kind);
}

/// Reads the stream for ever: first the retained tail (so a dashboard that
/// opens this replica sees what happened before it started), then live.
pub(super) async fn read(inner: Arc<Inner>) {
    let key = inner.keys.events();
    let tail = inner.config.load().events.ring_size;
    let mut last: Option<String> = None;
    loop {
        let conn = Link::dial_reader(&super::link::Endpoint::of(&inner.cluster)).await;
        let Ok(mut conn) = conn else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        if last.is_none() {
            match backlog(&mut conn, &key, tail).await {
                Ok(entries) => {
                    for (id, data) in &entries {
                        publish(&inner, id, data);
                    }
                    last = Some(
                        entries
                            .last()
                            .map_or_else(|| "0-0".to_string(), |e| e.0.clone()),
                    );
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            }
        }
        loop {
            let from = last.clone().unwrap_or_else(|| "$".into());
            let r: redis::RedisResult<Value> = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(1024)
                .arg("BLOCK")
                .arg(500)
                .arg("STREAMS")
                .arg(&key)
                .arg(&from)
                .query_async(&mut conn)
                .await;
            match r {
                Ok(Value::Array(streams)) => {
                    for s in streams {
                        if let Value::Array(kv) = s
                            && let Some(items) = kv.get(1)
                        {
                            for (id, data) in entries(items) {
                                publish(&inner, &id, &data);
                                last = Some(id);
                            }
                        }
                    }
                }
                Ok(_) => {} // nothing new within the block time
                Err(_) => break,
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The last `n` entries, oldest first.
async fn backlog(
    conn: &mut Conn,
    key: &str,
    n: usize,
) -> redis::RedisResult<Vec<(String, Vec<u8>)>> {
    let v: Value = redis::cmd("XREVRANGE")
        .arg(key)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(n)
        .query_async(conn)
        .await?;
    let mut e = entries(&v);
    e.reverse();
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_become_increasing_seqs() {
        let a = seq_of("1764000000000-0").expect("id");
        let b = seq_of("1764000000000-7").expect("id");
        let c = seq_of("1764000000001-0").expect("id");
        assert!(a < b && b < c);
        assert_eq!(seq_of("garbage"), None);
        let ev = encode(Time::from_secs(5), &Arc::from("t"), EventKind::TargetReset);
        let back =
            crate::wire::event_from_proto(proto::Event::decode(ev.as_slice()).expect("decodes"))
                .expect("an event");
        assert_eq!(back.0, Time::from_secs(5));
        assert_eq!(back.1.as_ref(), "t");
        assert_eq!(back.2, EventKind::TargetReset);
    }
}
