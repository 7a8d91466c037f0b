//! The bare baseline: `backstop.v1.Resilience` implemented as no-ops.
//!
//! Same service, same paths, same message types and similar response sizes
//! as Backstop, but no decision is made: what is left is the cost of tonic,
//! HTTP/2, protobuf and the loopback network on this machine. Backstop's
//! figures are reported as ratios to this, measured in the same run.

use backstop::proto;
use backstop::proto::resilience_server::{Resilience, ResilienceServer};
use std::io::Write as _;
use tonic::{Request, Response, Status};

/// A permit-sized string, so responses weigh what Backstop's weigh.
const PERMIT: &str =
    "2.8f3a.1c2.1.0.0.7d0.19bd2f6a1b0.19bd2f87800.6f1e0c3b9a2d4e5f60718293a4b5c6d7";

fn allowed() -> proto::CanProceedResponse {
    proto::CanProceedResponse {
        allowed: true,
        reason: proto::Reason::Allowed as i32,
        state: proto::BreakerState::Closed as i32,
        permit: PERMIT.into(),
        ..Default::default()
    }
}

fn recorded() -> proto::RecordOutcomeResponse {
    proto::RecordOutcomeResponse {
        classified_as: proto::OutcomeClass::Success as i32,
        state: proto::BreakerState::Closed as i32,
        retry: Some(proto::RetryAdvice {
            retry: false,
            delay: Some(prost_types::Duration::default()),
            reason: proto::RetryReason::Succeeded as i32,
        }),
        stale_permit: false,
        duplicate: false,
        degraded: false,
        cost: 0.0,
    }
}

struct Noop;

#[tonic::async_trait]
impl Resilience for Noop {
    async fn can_proceed(
        &self,
        _r: Request<proto::CanProceedRequest>,
    ) -> Result<Response<proto::CanProceedResponse>, Status> {
        Ok(Response::new(allowed()))
    }

    async fn record_outcome(
        &self,
        _r: Request<proto::RecordOutcomeRequest>,
    ) -> Result<Response<proto::RecordOutcomeResponse>, Status> {
        Ok(Response::new(recorded()))
    }

    async fn route(
        &self,
        r: Request<proto::RouteRequest>,
    ) -> Result<Response<proto::RouteResponse>, Status> {
        let r = r.into_inner();
        Ok(Response::new(proto::RouteResponse {
            target: r.candidates.first().cloned().unwrap_or(r.route),
            permit: PERMIT.into(),
            state: proto::BreakerState::Closed as i32,
            ..Default::default()
        }))
    }

    async fn finish_request(
        &self,
        _r: Request<proto::FinishRequestRequest>,
    ) -> Result<Response<proto::FinishRequestResponse>, Status> {
        Ok(Response::new(proto::FinishRequestResponse::default()))
    }

    async fn can_proceed_batch(
        &self,
        r: Request<proto::CanProceedBatchRequest>,
    ) -> Result<Response<proto::CanProceedBatchResponse>, Status> {
        let n = r.into_inner().items.len();
        let items = (0..n)
            .map(|_| proto::CanProceedResult {
                result: Some(proto::can_proceed_result::Result::Ok(allowed())),
            })
            .collect();
        Ok(Response::new(proto::CanProceedBatchResponse { items }))
    }

    async fn record_outcome_batch(
        &self,
        r: Request<proto::RecordOutcomeBatchRequest>,
    ) -> Result<Response<proto::RecordOutcomeBatchResponse>, Status> {
        let n = r.into_inner().items.len();
        let items = (0..n)
            .map(|_| proto::RecordOutcomeResult {
                result: Some(proto::record_outcome_result::Result::Ok(recorded())),
            })
            .collect();
        Ok(Response::new(proto::RecordOutcomeBatchResponse { items }))
    }

    type DecideStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<proto::DecideResponse, Status>> + Send>,
    >;

    /// Answers each item at once, in order, with the no-op answer of its kind
    /// (the same shape as Backstop's Decide: a reader task and a bounded channel).
    async fn decide(
        &self,
        r: Request<tonic::Streaming<proto::DecideRequest>>,
    ) -> Result<Response<Self::DecideStream>, Status> {
        use proto::decide_request::Request as Q;
        use proto::decide_response::Response as A;
        let mut inbound = r.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                let response = match m.request {
                    Some(Q::CanProceed(_)) => A::CanProceed(allowed()),
                    Some(Q::RecordOutcome(_)) => A::RecordOutcome(recorded()),
                    Some(Q::Route(q)) => A::Route(proto::RouteResponse {
                        target: q.candidates.first().cloned().unwrap_or(q.route),
                        permit: PERMIT.into(),
                        state: proto::BreakerState::Closed as i32,
                        ..Default::default()
                    }),
                    None => A::Error(proto::ItemError::default()),
                };
                let out = proto::DecideResponse {
                    id: m.id,
                    response: Some(response),
                };
                if tx.send(Ok(out)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// Runs the baseline server until killed; prints `baseline listening grpc=ADDR`.
pub async fn serve(listen: std::net::SocketAddr) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let mut out = std::io::stdout();
    let _ = writeln!(out, "baseline listening grpc={addr}");
    let _ = out.flush();
    tonic::transport::Server::builder()
        .add_service(ResilienceServer::new(Noop))
        .serve_with_incoming(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
        )
        .await
        .map_err(|e| e.to_string())
}
