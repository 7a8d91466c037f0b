//! Who may call what.
//!
//! Until principals and roles exist, one shared secret guards everything an
//! operator does or can see fleet-wide: with `[server] admin_token` set, the
//! Admin service, the dead-letter list (`ListDeadLetters`, which returns other
//! queues' payloads), `Requeue`, and `Events/Watch` (a snapshot of every
//! target) need `authorization: Bearer <admin_token>`. The agent path
//! (Resilience, Defer / Claim / Ack / Nack, QueueStats) stays open, because
//! every agent of the fleet makes those calls. Note that `Claim` returns
//! payloads by design: a worker must read what it processes.

use tonic::Status;
use tonic::metadata::MetadataMap;

/// The operator secret, if the server has one.
#[derive(Clone, Debug, Default)]
pub struct OperatorToken(pub Option<String>);

impl OperatorToken {
    /// Checks `authorization: Bearer <token>`; `what` names the call for the message.
    pub fn check(&self, metadata: &MetadataMap, what: &str) -> Result<(), Status> {
        let Some(want) = self.0.as_deref() else {
            return Ok(());
        };
        let got = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(bearer);
        match got {
            Some(g) if constant_time_eq(g.as_bytes(), want.as_bytes()) => Ok(()),
            Some(_) => Err(Status::unauthenticated(format!(
                "{what}: the admin token is wrong"
            ))),
            None => Err(Status::unauthenticated(format!(
                "{what} is an operator call: send the metadata `authorization: Bearer <admin_token>`"
            ))),
        }
    }

    /// The same check for an HTTP `Authorization` header value.
    pub fn check_http(&self, header: Option<&str>) -> bool {
        match self.0.as_deref() {
            None => true,
            Some(want) => header
                .and_then(bearer)
                .is_some_and(|g| constant_time_eq(g.as_bytes(), want.as_bytes())),
        }
    }
}

fn bearer(v: &str) -> Option<&str> {
    let (scheme, rest) = v.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

/// Compares secrets without an early exit, so timing does not reveal a prefix.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_right_bearer_token_passes() {
        let t = OperatorToken(Some("0123456789abcdef".into()));
        let mut m = MetadataMap::new();
        assert_eq!(
            t.check(&m, "Requeue").unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        m.insert("authorization", "Bearer nope".parse().expect("ascii"));
        assert!(t.check(&m, "Requeue").is_err());
        m.insert(
            "authorization",
            "bearer 0123456789abcdef".parse().expect("ascii"),
        );
        assert!(t.check(&m, "Requeue").is_ok());
        assert!(OperatorToken(None).check(&MetadataMap::new(), "x").is_ok());
        assert!(t.check_http(Some("Bearer 0123456789abcdef")));
        assert!(!t.check_http(None));
    }
}
