//! Corrects two gRPC status codes that tonic picks for malformed requests
//! before our handlers run, so every service answers bad input alike:
//!
//! * a message over `max_message_bytes` is OUT_OF_RANGE in tonic; gRPC clients
//!   (and the gRPC spec's own servers) say RESOURCE_EXHAUSTED for it;
//! * a body that does not decode, on services using tonic's prost codec (the
//!   standard health service), is INTERNAL; it is the client's fault, so
//!   INVALID_ARGUMENT (our own services already answer that via `grpc::codec`).
//!
//! Both errors happen while decoding the request, before any response is
//! sent, so tonic answers them "trailers-only": the status is in the response
//! headers, which is the only place this layer looks. It never touches a
//! successful response's body.

use axum::http::{HeaderValue, Request, Response};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The tower layer (for `tonic::transport::Server::layer`).
#[derive(Clone, Copy, Debug, Default)]
pub struct StatusMapLayer;

impl<S> tower_layer::Layer<S> for StatusMapLayer {
    type Service = StatusMap<S>;
    fn layer(&self, inner: S) -> StatusMap<S> {
        StatusMap { inner }
    }
}

#[derive(Clone, Debug)]
pub struct StatusMap<S> {
    inner: S,
}

impl<S, B, RB> tower_service::Service<Request<B>> for StatusMap<S>
where
    S: tower_service::Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<RB>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut res = fut.await?;
            remap(res.headers_mut());
            Ok(res)
        })
    }
}

/// Rewrites the status in trailers-only headers, if it is one of the two.
pub fn remap(headers: &mut axum::http::HeaderMap) {
    let code = match headers.get("grpc-status").map(HeaderValue::as_bytes) {
        Some(b"11") => 11,
        Some(b"13") => 13,
        _ => return,
    };
    let message = headers
        .get("grpc-message")
        .map(|v| percent_decode(v.as_bytes()))
        .unwrap_or_default();
    let new = match code {
        11 if message.contains("message length too large") => "8",
        13 if message.contains("failed to decode") || message.contains("decode Protobuf") => "3",
        _ => return,
    };
    headers.insert("grpc-status", HeaderValue::from_static(new));
}

/// grpc-message is percent-encoded (gRPC over HTTP/2 spec).
fn percent_decode(b: &[u8]) -> String {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(h) = b.get(i + 1..i + 3)
            && let Ok(s) = std::str::from_utf8(h)
            && let Ok(v) = u8::from_str_radix(s, 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderMap;

    fn with(status: &'static str, msg: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_static(status));
        h.insert("grpc-message", HeaderValue::from_static(msg));
        h
    }

    #[test]
    fn oversized_and_undecodable_requests_get_the_codes_clients_expect() {
        let mut h = with(
            "11",
            "Error,%20decoded%20message%20length%20too%20large:%20found%205000000%20bytes",
        );
        remap(&mut h);
        assert_eq!(h["grpc-status"], "8");
        let mut h = with("13", "failed%20to%20decode%20Protobuf%20message");
        remap(&mut h);
        assert_eq!(h["grpc-status"], "3");
        // Anything else is left alone.
        let mut h = with("13", "the%20store%20failed");
        remap(&mut h);
        assert_eq!(h["grpc-status"], "13");
        let mut h = with("11", "out%20of%20range");
        remap(&mut h);
        assert_eq!(h["grpc-status"], "11");
    }
}
