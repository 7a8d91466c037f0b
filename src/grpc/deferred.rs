//! `backstop.v1.Deferred`: the deferred-request queue.

use super::{check_len, from_proto_duration, reason, status, to_proto_duration, to_timestamp};
use crate::domain::Time;
use crate::engine::Engine;
use crate::engine::queue::{Claimed, DEFERRED_MESSAGE, DeferArgs, Item};
use crate::proto;
use crate::proto::deferred_server::Deferred;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// Who may call what (ListDeadLetters carries other queues' payloads;
/// Requeue is an operator action) is `auth::AuthLayer`'s to check.
pub struct DeferredService {
    engine: Arc<Engine>,
}

impl DeferredService {
    pub fn new(engine: Arc<Engine>) -> Self {
        DeferredService { engine }
    }
}

fn item(it: Item) -> proto::DeferredItem {
    proto::DeferredItem {
        id: it.id.to_string(),
        queue: it.queue,
        payload: it.payload,
        metadata: it.metadata,
        attempt: it.attempt,
        max_attempts: it.max_attempts,
        enqueued_at: Some(to_timestamp(it.enqueued_at)),
        last_error: it.last_error,
        dead_lettered_at: it.dead_lettered_at.map(to_timestamp),
        ..Default::default()
    }
}

fn claimed(c: Claimed) -> proto::DeferredItem {
    proto::DeferredItem {
        lease_token: c.lease_token,
        lease_expires_at: Some(to_timestamp(c.lease_until)),
        target: c.target.to_string(),
        permit: c.permit,
        key_slot: c.key_slot.map(|k| k.to_string()).unwrap_or_default(),
        ..item(c.item)
    }
}

#[tonic::async_trait]
impl Deferred for DeferredService {
    async fn defer(
        &self,
        req: Request<proto::DeferRequest>,
    ) -> Result<Response<proto::DeferResponse>, Status> {
        let t = super::tenant::of(&req);
        let r = req.into_inner();
        super::tenant::check(t.as_deref(), "queue", &r.queue)?;
        let not_before = match r.not_before {
            Some(t) if t.seconds < 0 || t.nanos < 0 => {
                return Err(Status::invalid_argument("not_before is before 1970"));
            }
            Some(t) => Some(Time::from_nanos(
                (t.seconds as u64)
                    .saturating_mul(1_000_000_000)
                    .saturating_add(t.nanos as u64),
            )),
            None => None,
        };
        let res = self
            .engine
            .defer(DeferArgs {
                queue: r.queue,
                payload: r.payload,
                metadata: r.metadata,
                idempotency_key: r.idempotency_key,
                not_before,
                max_attempts: r.max_attempts,
                estimated_tokens: r.estimated_tokens,
                required_context_tokens: r.required_context_tokens,
            })
            .await
            .map_err(status)?;
        Ok(Response::new(proto::DeferResponse {
            id: res.id.to_string(),
            duplicate: res.duplicate,
            depth: res.depth,
            message: DEFERRED_MESSAGE.into(),
        }))
    }

    async fn claim(
        &self,
        req: Request<proto::ClaimRequest>,
    ) -> Result<Response<proto::ClaimResponse>, Status> {
        let t = super::tenant::of(&req);
        let r = req.into_inner();
        super::tenant::check(t.as_deref(), "queue", &r.queue)?;
        check_len(&r.worker, "worker", 256)?;
        let lease = from_proto_duration(r.lease, "lease")?;
        let wait = from_proto_duration(r.wait, "wait")?;
        let res = self
            .engine
            .claim_as(
                &r.queue,
                r.max_items,
                lease,
                wait,
                crate::engine::queue::Worker {
                    name: &r.worker,
                    priority: crate::wire::priority_from(r.priority)
                        .map_err(Status::invalid_argument)?,
                },
            )
            .await
            .map_err(status)?;
        let (blocked_reason, retry_after) = match res.blocked {
            Some((why, after)) if res.items.is_empty() => {
                (reason(why) as i32, after.map(to_proto_duration))
            }
            _ => (0, None),
        };
        Ok(Response::new(proto::ClaimResponse {
            items: res.items.into_iter().map(claimed).collect(),
            blocked_reason,
            retry_after,
        }))
    }

    async fn ack(
        &self,
        req: Request<proto::AckRequest>,
    ) -> Result<Response<proto::AckResponse>, Status> {
        let r = req.into_inner();
        self.engine
            .ack(&r.id, &r.lease_token)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::AckResponse {}))
    }

    async fn nack(
        &self,
        req: Request<proto::NackRequest>,
    ) -> Result<Response<proto::NackResponse>, Status> {
        let r = req.into_inner();
        let delay = from_proto_duration(r.delay, "delay")?.unwrap_or_default();
        let (dead_lettered, attempt) = self
            .engine
            .nack(&r.id, &r.lease_token, delay, &r.reason)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::NackResponse {
            dead_lettered,
            attempt,
        }))
    }

    async fn list_dead_letters(
        &self,
        req: Request<proto::ListDeadLettersRequest>,
    ) -> Result<Response<proto::ListDeadLettersResponse>, Status> {
        let t = super::tenant::of(&req);
        let r = req.into_inner();
        if !r.queue.is_empty() {
            super::tenant::check(t.as_deref(), "queue", &r.queue)?;
        }
        let (items, next_page_token) = match t.as_deref() {
            // All queues asked for by a tenant: its own queues' items only,
            // read through pages of others'.
            Some(t) if r.queue.is_empty() => self
                .engine
                .list_dead_letters_within(r.page_size, &r.page_token, &|q| t.owns(q))
                .await
                .map_err(status)?,
            _ => self
                .engine
                .list_dead_letters(&r.queue, r.page_size, &r.page_token)
                .await
                .map_err(status)?,
        };
        Ok(Response::new(proto::ListDeadLettersResponse {
            items: items.into_iter().map(item).collect(),
            next_page_token,
        }))
    }

    async fn requeue(
        &self,
        req: Request<proto::RequeueRequest>,
    ) -> Result<Response<proto::RequeueResponse>, Status> {
        let by = super::auth::who(&req);
        let who = super::auth::principal_of(&req);
        let t = super::tenant::of(&req);
        let r = req.into_inner();
        // The queue check also learns the item's queue: the audit event's subject.
        let queue = std::sync::Mutex::new(String::new());
        let owns = |q: &str| {
            if let Ok(mut seen) = queue.lock() {
                q.clone_into(&mut seen);
            }
            t.as_deref().is_none_or(|t| t.owns(q))
        };
        self.engine
            .requeue_within(&r.id, &owns)
            .await
            .map_err(status)?;
        tracing::info!(principal = %by, action = "requeue", item = %r.id, "operator action");
        let queue = queue.into_inner().unwrap_or_default();
        self.engine.audit(
            &queue,
            "requeue",
            who.as_ref(),
            &format!("item {}", r.id),
            "grpc",
        );
        Ok(Response::new(proto::RequeueResponse {}))
    }

    async fn queue_stats(
        &self,
        req: Request<proto::QueueStatsRequest>,
    ) -> Result<Response<proto::QueueStatsResponse>, Status> {
        let t = super::tenant::of(&req);
        let r = req.into_inner();
        check_len(&r.queue, "queue", 256)?;
        if !r.queue.is_empty() {
            super::tenant::check(t.as_deref(), "queue", &r.queue)?;
        }
        let queues = self
            .engine
            .queue_stats(&r.queue)
            .await
            .map_err(status)?
            .into_iter()
            .filter(|q| t.as_deref().is_none_or(|t| t.owns(&q.queue)))
            .map(|q| proto::QueueStat {
                queue: q.queue,
                depth: q.depth,
                in_flight: q.in_flight,
                dead_letters: q.dead_letters,
                oldest_age: Some(to_proto_duration(q.oldest_age)),
                bytes: q.bytes,
            })
            .collect();
        Ok(Response::new(proto::QueueStatsResponse { queues }))
    }
}
