//! `backstop.v1.Resilience`: CanProceed, RecordOutcome, Route, their
//! batches, and Decide (all three over one long-lived stream).

use super::tenant;
use super::{
    breaker_state, check_len, from_outcome_class, from_proto_duration, outcome_class, reason,
    status, to_proto_duration,
};
use crate::config::Tenant;
use crate::domain::retry::RetryReason;
use crate::engine::principal_rate::Limiter;
use crate::engine::requests::{ClientMeasure, MAX_REQUEST_ID};
use crate::engine::{Admission, AdmitArgs, Engine, OutcomeReport, RouteQuery};
use crate::proto;
use crate::proto::resilience_server::Resilience;
use std::sync::Arc;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

/// Most items one batch call may carry.
pub const MAX_BATCH: usize = 1000;
/// Longest `caller` / `error_type` accepted.
const MAX_LABEL: usize = 256;
/// Most requests one Decide stream may have outstanding (decided but not
/// yet answered); past it an item gets RESOURCE_EXHAUSTED.
pub const MAX_OUTSTANDING: usize = 1024;

/// Who a call is from: the principal it was authenticated as (if any) and
/// the tenant that confines it (if any).
#[derive(Clone, Copy, Default)]
struct Who<'a> {
    principal: Option<&'a str>,
    tenant: Option<&'a Tenant>,
}

/// The key a request id is tracked under: tenants name their requests
/// independently, so a tenant's id lives in its own space (two tenants'
/// `req-1` are two requests, and one cannot finish the other's).
fn request_key<'a>(who: Who<'_>, id: &'a str) -> Result<std::borrow::Cow<'a, str>, Status> {
    check_len(id, "request_id", MAX_REQUEST_ID)?;
    Ok(match who.tenant {
        Some(t) if !id.is_empty() => format!("{}\u{0}{id}", t.name).into(),
        _ => id.into(),
    })
}

/// [`Who`], owned: taken from a request's extensions once, lent per decision.
struct Caller {
    principal: Option<Arc<str>>,
    tenant: Option<Arc<Tenant>>,
}

impl Caller {
    fn of<T>(req: &Request<T>) -> Caller {
        Caller {
            principal: super::auth::principal(req),
            tenant: tenant::of(req),
        }
    }

    fn who(&self) -> Who<'_> {
        Who {
            principal: self.principal.as_deref(),
            tenant: self.tenant.as_deref(),
        }
    }
}

#[derive(Clone)]
pub struct ResilienceService {
    engine: Arc<Engine>,
}

impl ResilienceService {
    pub fn new(engine: Arc<Engine>) -> Self {
        ResilienceService { engine }
    }

    /// The decision bucket of the call's principal (see `principal_rate.rs`).
    fn limiter<T>(&self, req: &Request<T>) -> Option<Arc<Limiter>> {
        self.engine
            .decision_limiter(req.extensions().get::<crate::config::Principal>())
    }

    /// Charges `n` decisions before any is made: past the principal's
    /// rate the whole call is RESOURCE_EXHAUSTED and nothing changes.
    fn charge<T>(&self, req: &Request<T>, n: usize) -> Result<(), Status> {
        let l = self.limiter(req);
        self.engine
            .charge_decisions(l.as_deref(), n as u64)
            .map_err(status)
    }

    async fn can_proceed_one(
        &self,
        r: &proto::CanProceedRequest,
        who: Who<'_>,
    ) -> Result<proto::CanProceedResponse, Status> {
        tenant::check(who.tenant, "target", &r.target)?;
        check_len(&r.caller, "caller", MAX_LABEL)?;
        self.engine
            .note_request(&request_key(who, &r.request_id)?, "")
            .map_err(status)?;
        let args = AdmitArgs {
            caller: &r.caller,
            estimated_tokens: r.estimated_tokens,
            attempt: r.attempt,
            priority: crate::wire::priority_from(r.priority).map_err(Status::invalid_argument)?,
            max_output_tokens: r.max_output_tokens,
            spend_scoped: false,
        };
        let adm = self
            .engine
            .can_proceed(&r.target, args)
            .await
            .map_err(status)?;
        Ok(admission(adm))
    }

    /// `principal`: who the call was authenticated as, if anyone. A report
    /// that names no `caller` is attributed to it, so that quorum tripping
    /// (`min_distinct_callers`) tells authenticated agents apart without
    /// each having to name itself.
    async fn record_one(
        &self,
        r: &proto::RecordOutcomeRequest,
        who: Who<'_>,
    ) -> Result<proto::RecordOutcomeResponse, Status> {
        tenant::check(who.tenant, "target", &r.target)?;
        check_len(&r.caller, "caller", MAX_LABEL)?;
        let caller = match (r.caller.as_str(), who.principal) {
            ("", Some(p)) => p,
            (c, _) => c,
        };
        check_len(&r.error_type, "error_type", MAX_LABEL)?;
        check_len(&r.key_slot, "key_slot", MAX_LABEL)?;
        // Checked before the outcome is applied, so a bad request id or
        // finish never leaves an applied outcome behind an error.
        check_len(&r.request_id, "request_id", MAX_REQUEST_ID)?;
        let finish = crate::wire::request_result_from(r.finish)
            .map_err(|e| Status::invalid_argument(format!("finish: {e}")))?;
        if finish.is_some() && r.request_id.is_empty() {
            return Err(Status::invalid_argument(
                "finish needs the request_id of the request it closes",
            ));
        }
        let report = OutcomeReport {
            permit: &r.permit,
            class: from_outcome_class(r.outcome)?,
            http_status: r.http_status,
            error_type: &r.error_type,
            latency: from_proto_duration(r.latency, "latency")?,
            retry_after: from_proto_duration(r.retry_after, "retry_after")?,
            input_tokens: r.input_tokens,
            output_tokens: r.output_tokens,
            attempt: r.attempt,
            headers: r
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
            key_slot: &r.key_slot,
            caller,
        };
        let res = self
            .engine
            .record_outcome(&r.target, report)
            .await
            .map_err(status)?;
        // A repeated report (its answer was lost) is not another attempt.
        if !res.duplicate {
            self.engine
                .note_request_outcome(&request_key(who, &r.request_id)?, finish)
                .map_err(status)?;
        }
        Ok(proto::RecordOutcomeResponse {
            cost: crate::domain::spend::dollars(res.cost_micros),
            classified_as: outcome_class(res.classified_as) as i32,
            state: breaker_state(res.state) as i32,
            retry: Some(proto::RetryAdvice {
                retry: res.advice.retry,
                delay: Some(to_proto_duration(res.advice.delay)),
                reason: retry_reason(res.advice.reason) as i32,
            }),
            stale_permit: res.stale,
            duplicate: res.duplicate,
            degraded: res.degraded,
        })
    }
}

impl ResilienceService {
    async fn route_one(
        &self,
        r: &proto::RouteRequest,
        who: Who<'_>,
    ) -> Result<proto::RouteResponse, Status> {
        if !r.route.is_empty() {
            tenant::check(who.tenant, "route", &r.route)?;
        }
        for c in &r.candidates {
            tenant::check(who.tenant, "target", c)?;
        }
        check_len(&r.caller, "caller", MAX_LABEL)?;
        self.engine
            .note_request(&request_key(who, &r.request_id)?, &r.route)
            .map_err(status)?;
        let d = self
            .engine
            .route(RouteQuery {
                route: &r.route,
                candidates: &r.candidates,
                estimated_tokens: r.estimated_tokens,
                required_context_tokens: r.required_context_tokens,
                exclude: &r.exclude,
                caller: &r.caller,
                attempt: r.attempt,
                strategy: crate::wire::strategy_from(r.strategy)
                    .map_err(Status::invalid_argument)?,
                expected_output_tokens: r.expected_output_tokens,
                priority: crate::wire::priority_from(r.priority)
                    .map_err(Status::invalid_argument)?,
                max_output_tokens: r.max_output_tokens,
            })
            .await
            .map_err(|e| match (e, who.tenant) {
                // The engine lists the configured routes; a tenant must not
                // learn the others' names from it.
                (crate::engine::EngineError::NotFound(_), Some(t)) => {
                    tenant::not_found(t, "route", &r.route)
                }
                (e, _) => status(e),
            })?;
        let skipped = d
            .skipped
            .iter()
            .map(|s| proto::Skip {
                target: s.target.to_string(),
                reason: reason(s.reason) as i32,
                retry_after: s.retry_after.map(to_proto_duration),
            })
            .collect();
        let mut out = proto::RouteResponse {
            fallback_depth: d.fallback_depth,
            skipped,
            retry_after: d.retry_after.map(to_proto_duration),
            strategy: crate::wire::strategy(d.strategy) as i32,
            reason: d.reason,
            ..Default::default()
        };
        if let Some((target, adm, settings)) = d.chosen {
            out.target = target.to_string();
            out.state = breaker_state(adm.state) as i32;
            out.permit = adm.token;
            out.key_slot = adm.key_slot.map(|k| k.to_string()).unwrap_or_default();
            out.max_tokens = settings.max_tokens;
            out.cost_per_mtok_input = settings.cost_per_mtok_input;
            out.cost_per_mtok_output = settings.cost_per_mtok_output;
            out.degraded = adm.degraded;
        }
        Ok(out)
    }

    /// One item of a Decide stream: the same answer as the unary call, in a
    /// span of its own (`Decide.CanProceed` …) with the unary span's fields,
    /// joined to the item's `traceparent`, else to the stream's.
    async fn decide_one(
        &self,
        r: proto::DecideRequest,
        stream_parent: &str,
        who: Who<'_>,
    ) -> proto::DecideResponse {
        use proto::decide_request::Request as Q;
        use proto::decide_response::Response as A;
        let m = self.engine.metrics();
        let parent = if r.traceparent.is_empty() {
            stream_parent
        } else {
            r.traceparent.as_str()
        };
        let response = match &r.request {
            Some(Q::CanProceed(q)) => {
                let _timer = m.rpc("Decide.CanProceed");
                let span = crate::rpc_span!(
                    "Decide.CanProceed",
                    target = %q.target,
                    caller = %q.caller,
                    attempt = q.attempt,
                    allowed = tracing::field::Empty,
                    reason = tracing::field::Empty,
                    state = tracing::field::Empty,
                );
                crate::telemetry::join_traceparent(&span, parent);
                let res = self.can_proceed_one(q, who).instrument(span.clone()).await;
                if let Ok(res) = &res {
                    record_admission(&span, res);
                }
                res.map(A::CanProceed)
            }
            Some(Q::RecordOutcome(q)) => {
                let _timer = m.rpc("Decide.RecordOutcome");
                let span = crate::rpc_span!(
                    "Decide.RecordOutcome",
                    target = %q.target,
                    caller = %q.caller,
                    http_status = q.http_status,
                    class = tracing::field::Empty,
                    state = tracing::field::Empty,
                    retry = tracing::field::Empty,
                );
                crate::telemetry::join_traceparent(&span, parent);
                let res = self.record_one(q, who).instrument(span.clone()).await;
                if let Ok(res) = &res {
                    record_outcome(&span, res);
                }
                res.map(A::RecordOutcome)
            }
            Some(Q::Route(q)) => {
                let _timer = m.rpc("Decide.Route");
                let span = crate::rpc_span!(
                    "Decide.Route",
                    route = %q.route,
                    caller = %q.caller,
                    target = tracing::field::Empty,
                    fallback_depth = tracing::field::Empty,
                );
                crate::telemetry::join_traceparent(&span, parent);
                let res = self.route_one(q, who).instrument(span.clone()).await;
                if let Ok(out) = &res {
                    record_route(&span, out);
                }
                res.map(A::Route)
            }
            None => Err(Status::invalid_argument(
                "the item has no request: set one of can_proceed, record_outcome or route",
            )),
        };
        proto::DecideResponse {
            id: r.id,
            response: Some(response.unwrap_or_else(|s| A::Error(item_error(s)))),
        }
    }

    /// Like [`ResilienceService::decide_one`], within the item's deadline.
    async fn decide_within(
        &self,
        r: proto::DecideRequest,
        stream_parent: &str,
        who: Who<'_>,
    ) -> proto::DecideResponse {
        let id = r.id;
        let deadline = match from_proto_duration(r.deadline, "deadline") {
            Ok(d) => d,
            Err(s) => return item_failed(id, s),
        };
        match deadline {
            None => self.decide_one(r, stream_parent, who).await,
            Some(d) => {
                match tokio::time::timeout(d, self.decide_one(r, stream_parent, who)).await {
                    Ok(resp) => resp,
                    Err(_) => item_failed(
                        id,
                        Status::deadline_exceeded(format!(
                            "not decided within the item's deadline of {d:?}"
                        )),
                    ),
                }
            }
        }
    }
}

/// The decision's fields on its span (unary call or Decide item alike).
fn record_admission(span: &tracing::Span, res: &proto::CanProceedResponse) {
    span.record("allowed", res.allowed);
    span.record("reason", res.reason().as_str_name());
    span.record("state", res.state().as_str_name());
}

fn record_outcome(span: &tracing::Span, res: &proto::RecordOutcomeResponse) {
    span.record("class", res.classified_as().as_str_name());
    span.record("state", res.state().as_str_name());
    span.record("retry", res.retry.as_ref().is_some_and(|a| a.retry));
}

fn record_route(span: &tracing::Span, out: &proto::RouteResponse) {
    span.record("fallback_depth", out.fallback_depth);
    if !out.target.is_empty() {
        span.record("target", out.target.as_str());
    }
}

fn item_failed(id: u64, s: Status) -> proto::DecideResponse {
    proto::DecideResponse {
        id,
        response: Some(proto::decide_response::Response::Error(item_error(s))),
    }
}

pub(crate) fn admission(a: Admission) -> proto::CanProceedResponse {
    proto::CanProceedResponse {
        allowed: a.allowed,
        reason: reason(a.reason) as i32,
        state: breaker_state(a.state) as i32,
        retry_after: a.retry_after.map(to_proto_duration),
        permit: a.token,
        key_slot: a.key_slot.map(|k| k.to_string()).unwrap_or_default(),
        shadow_reason: a.shadow_reason.map_or(0, |r| reason(r) as i32),
        degraded: a.degraded,
    }
}

fn retry_reason(r: RetryReason) -> proto::RetryReason {
    match r {
        RetryReason::Succeeded => proto::RetryReason::Succeeded,
        RetryReason::Retryable => proto::RetryReason::Retryable,
        RetryReason::Persistent => proto::RetryReason::Persistent,
        RetryReason::BadInput => proto::RetryReason::BadInput,
        RetryReason::MaxRetries => proto::RetryReason::MaxRetries,
        RetryReason::BudgetExhausted => proto::RetryReason::RetryBudgetExhausted,
        RetryReason::CorrectAndRetry => proto::RetryReason::CorrectAndRetry,
        RetryReason::CircuitOpen => proto::RetryReason::CircuitOpen,
    }
}

fn item_error(s: Status) -> proto::ItemError {
    proto::ItemError {
        code: s.code() as i32,
        message: s.message().to_string(),
    }
}

fn check_batch(n: usize) -> Result<(), Status> {
    if n == 0 {
        return Err(Status::invalid_argument("the batch has no items"));
    }
    if n > MAX_BATCH {
        return Err(Status::invalid_argument(format!(
            "the batch has {n} items; the maximum is {MAX_BATCH}: split it"
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl Resilience for ResilienceService {
    async fn can_proceed(
        &self,
        req: Request<proto::CanProceedRequest>,
    ) -> Result<Response<proto::CanProceedResponse>, Status> {
        let _timer = self.engine.metrics().rpc("CanProceed");
        let span = crate::rpc_span!(
            "CanProceed",
            target = %req.get_ref().target,
            caller = %req.get_ref().caller,
            attempt = req.get_ref().attempt,
            allowed = tracing::field::Empty,
            reason = tracing::field::Empty,
            state = tracing::field::Empty,
        );
        crate::telemetry::join_caller_trace(&span, req.metadata());
        self.charge(&req, 1)?;
        let caller = Caller::of(&req);
        let who = caller.who();
        let r = req.into_inner();
        let res = self
            .can_proceed_one(&r, who)
            .instrument(span.clone())
            .await?;
        record_admission(&span, &res);
        Ok(Response::new(res))
    }

    async fn record_outcome(
        &self,
        req: Request<proto::RecordOutcomeRequest>,
    ) -> Result<Response<proto::RecordOutcomeResponse>, Status> {
        let _timer = self.engine.metrics().rpc("RecordOutcome");
        let span = crate::rpc_span!(
            "RecordOutcome",
            target = %req.get_ref().target,
            caller = %req.get_ref().caller,
            http_status = req.get_ref().http_status,
            class = tracing::field::Empty,
            state = tracing::field::Empty,
            retry = tracing::field::Empty,
        );
        crate::telemetry::join_caller_trace(&span, req.metadata());
        self.charge(&req, 1)?;
        let caller = Caller::of(&req);
        let who = caller.who();
        let r = req.into_inner();
        let res = self.record_one(&r, who).instrument(span.clone()).await?;
        record_outcome(&span, &res);
        Ok(Response::new(res))
    }

    async fn route(
        &self,
        req: Request<proto::RouteRequest>,
    ) -> Result<Response<proto::RouteResponse>, Status> {
        let _timer = self.engine.metrics().rpc("Route");
        let span = crate::rpc_span!(
            "Route",
            route = %req.get_ref().route,
            caller = %req.get_ref().caller,
            target = tracing::field::Empty,
            fallback_depth = tracing::field::Empty,
        );
        crate::telemetry::join_caller_trace(&span, req.metadata());
        self.charge(&req, 1)?;
        let caller = Caller::of(&req);
        let who = caller.who();
        let r = req.into_inner();
        let out = self.route_one(&r, who).instrument(span.clone()).await?;
        record_route(&span, &out);
        Ok(Response::new(out))
    }

    async fn finish_request(
        &self,
        req: Request<proto::FinishRequestRequest>,
    ) -> Result<Response<proto::FinishRequestResponse>, Status> {
        let _timer = self.engine.metrics().rpc("FinishRequest");
        self.charge(&req, 1)?;
        let caller = Caller::of(&req);
        let who = caller.who();
        let r = req.into_inner();
        check_len(&r.route, "route", MAX_LABEL)?;
        if !r.route.is_empty() {
            tenant::check(who.tenant, "route", &r.route)?;
        }
        let result = crate::wire::request_result_from(r.result)
            .map_err(|e| Status::invalid_argument(format!("result: {e}")))?
            .ok_or_else(|| {
                Status::invalid_argument(
                    "result is unset; say how the request ended: COMPLETED, DEFERRED or FAILED",
                )
            })?;
        let client = ClientMeasure {
            route: (!r.route.is_empty()).then_some(r.route.as_str()),
            elapsed: from_proto_duration(r.elapsed, "elapsed")?.unwrap_or_default(),
            attempts: r.attempts,
        };
        let f = self
            .engine
            .finish_request(&request_key(who, &r.request_id)?, result, client)
            .map_err(status)?;
        Ok(Response::new(proto::FinishRequestResponse {
            tracked: f.tracked,
            duplicate: f.duplicate,
            duration: Some(to_proto_duration(f.duration)),
            attempts: f.attempts,
            route: f.route.to_string(),
        }))
    }

    async fn can_proceed_batch(
        &self,
        req: Request<proto::CanProceedBatchRequest>,
    ) -> Result<Response<proto::CanProceedBatchResponse>, Status> {
        let _timer = self.engine.metrics().rpc("CanProceedBatch");
        check_batch(req.get_ref().items.len())?;
        self.charge(&req, req.get_ref().items.len())?;
        let caller = Caller::of(&req);
        let who = caller.who();
        let r = req.into_inner();
        let one = |item| async move {
            let result = match self.can_proceed_one(item, who).await {
                Ok(ok) => proto::can_proceed_result::Result::Ok(ok),
                Err(e) => proto::can_proceed_result::Result::Error(item_error(e)),
            };
            proto::CanProceedResult {
                result: Some(result),
            }
        };
        // Embedded decisions never wait: one after another is cheapest. In
        // cluster mode each waits on Redis: all at once, so items on one
        // target combine into one script and the rest share round trips.
        let items = if self.engine.decisions_wait() {
            futures_util::future::join_all(r.items.iter().map(one)).await
        } else {
            let mut items = Vec::with_capacity(r.items.len());
            for item in &r.items {
                items.push(one(item).await);
            }
            items
        };
        Ok(Response::new(proto::CanProceedBatchResponse { items }))
    }

    async fn record_outcome_batch(
        &self,
        req: Request<proto::RecordOutcomeBatchRequest>,
    ) -> Result<Response<proto::RecordOutcomeBatchResponse>, Status> {
        let _timer = self.engine.metrics().rpc("RecordOutcomeBatch");
        check_batch(req.get_ref().items.len())?;
        self.charge(&req, req.get_ref().items.len())?;
        let caller = Caller::of(&req);
        let who = caller.who();
        let r = req.into_inner();
        let one = |item| async move {
            let result = match self.record_one(item, who).await {
                Ok(ok) => proto::record_outcome_result::Result::Ok(ok),
                Err(e) => proto::record_outcome_result::Result::Error(item_error(e)),
            };
            proto::RecordOutcomeResult {
                result: Some(result),
            }
        };
        // As in can_proceed_batch: concurrently only when each waits on Redis.
        let items = if self.engine.decisions_wait() {
            futures_util::future::join_all(r.items.iter().map(one)).await
        } else {
            let mut items = Vec::with_capacity(r.items.len());
            for item in &r.items {
                items.push(one(item).await);
            }
            items
        };
        Ok(Response::new(proto::RecordOutcomeBatchResponse { items }))
    }

    type DecideStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<proto::DecideResponse, Status>> + Send>,
    >;

    /// Reads the client's requests in order and answers each as soon as it
    /// is decided. Embedded decisions never wait, so they are decided right
    /// here, in order, with no task per item; in cluster mode each waits on
    /// Redis, so items run concurrently (at most [`MAX_OUTSTANDING`]) and
    /// combine. The response channel is bounded: a client that stops reading
    /// stops being read (HTTP/2 flow control), so memory stays bounded.
    /// Writes are coalesced by tonic's encoder: it takes every answer already
    /// in the channel into one buffer and writes it when the channel is
    /// empty (or 32 KiB are pending), so a burst of answers is one write.
    async fn decide(
        &self,
        req: Request<tonic::Streaming<proto::DecideRequest>>,
    ) -> Result<Response<Self::DecideStream>, Status> {
        // Items without a traceparent of their own join the stream's trace.
        let stream_parent: Arc<str> = req
            .metadata()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .into();
        let caller = Arc::new(Caller::of(&req));
        let limiter = self.limiter(&req);
        let mut inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<proto::DecideResponse, Status>>(256);
        let svc = self.clone();
        let mut shutdown = self.engine.shutdown_signal();
        let concurrent = self.engine.decisions_wait();
        tokio::spawn(async move {
            let slots = Arc::new(tokio::sync::Semaphore::new(MAX_OUTSTANDING));
            let mut draining = *shutdown.borrow();
            while !draining {
                let next = tokio::select! {
                    m = inbound.message() => m,
                    _ = shutdown.changed() => {
                        draining = true;
                        break;
                    }
                };
                let r = match next {
                    Ok(Some(r)) => r,
                    // The client closed its side: answer what is pending, then end.
                    Ok(None) => break,
                    // A malformed message or a broken connection: say so if we can.
                    Err(s) => {
                        let _ = tx.send(Err(s)).await;
                        break;
                    }
                };
                // Each item is a decision: past the principal's rate it is
                // answered RESOURCE_EXHAUSTED and the stream goes on.
                if let Err(e) = svc.engine.charge_decisions(limiter.as_deref(), 1) {
                    if tx.send(Ok(item_failed(r.id, status(e)))).await.is_err() {
                        break;
                    }
                    continue;
                }
                if !concurrent {
                    if tx
                        .send(Ok(svc.decide_within(r, &stream_parent, caller.who()).await))
                        .await
                        .is_err()
                    {
                        break;
                    }
                    continue;
                }
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    let busy = item_failed(
                        r.id,
                        Status::resource_exhausted(format!(
                            "this stream already has {MAX_OUTSTANDING} requests outstanding; wait for answers (or open another stream)"
                        )),
                    );
                    if tx.send(Ok(busy)).await.is_err() {
                        break;
                    }
                    continue;
                };
                let (svc, tx, stream_parent) = (svc.clone(), tx.clone(), stream_parent.clone());
                let caller = caller.clone();
                tokio::spawn(async move {
                    let resp = svc.decide_within(r, &stream_parent, caller.who()).await;
                    let _ = tx.send(Ok(resp)).await;
                    drop(slot);
                });
            }
            if draining {
                // Answer what was read, then say why the stream ends, so the
                // client knows unanswered items were never decided.
                let _ = slots.acquire_many(MAX_OUTSTANDING as u32).await;
                let _ = tx
                    .send(Err(Status::unavailable(
                        "the server is shutting down: every item read was answered; send the rest to another server",
                    )))
                    .await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
