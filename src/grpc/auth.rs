//! Who may call what: one layer in front of every gRPC service (and the
//! same decision for the HTTP side).
//!
//! **With `[auth]`**, every call but health and reflection needs
//! `authorization: Bearer <token>` whose SHA-256 is a principal's
//! `token_sha256` (UNAUTHENTICATED otherwise), and the principal needs the
//! call's role (PERMISSION_DENIED otherwise, naming the role):
//! * `agent`: Resilience, Deferred Defer / Claim / Ack / Nack, Events Watch;
//! * `viewer`: Admin reads (ListTargets, GetTarget, GetCluster), Watch,
//!   QueueStats, ListDeadLetters, the dashboard, `/events`, `/api/snapshot`;
//! * `operator`: viewer + SetBreakerState, ResetTarget, Requeue, ReloadConfig.
//!
//! The `[server] admin_token`, if also set, is a principal named "admin"
//! with every role. Tokens are compared by their SHA-256 in constant time,
//! and never logged. `[auth]` is read at every call, so a config reload
//! adds, removes or rotates principals at once.
//!
//! **Without `[auth]`** the server behaves as before roles existed: the
//! agent path is open, and with `admin_token` set, what an operator does
//! or sees fleet-wide (Admin, ListDeadLetters, Requeue, Watch) needs it.
//!
//! The principal of an allowed call goes into the request's extensions, for
//! the audit of operator actions (see `admin.rs`).

use crate::config::{Config, Principal, roles};
use crate::engine::Engine;
use axum::http::{Request, Response};
use sha2::Digest as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::Status;

/// The names of a verified client certificate (mTLS): its subject common
/// name and its DNS and URI subject alternative names. The TLS acceptor
/// puts it in each request's extensions (see `server/tls.rs`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    pub names: Vec<String>,
}

/// What a call needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Health, reflection, and anything unknown (tonic answers UNIMPLEMENTED).
    Open,
    Agent,
    /// Agent or viewer (Watch).
    AgentOrViewer,
    Viewer,
    Operator,
}

impl Need {
    fn allows(self, bits: u8) -> bool {
        let viewer = bits & (roles::VIEWER | roles::OPERATOR) != 0;
        match self {
            Need::Open => true,
            Need::Agent => bits & roles::AGENT != 0,
            Need::AgentOrViewer => bits & roles::AGENT != 0 || viewer,
            Need::Viewer => viewer,
            Need::Operator => bits & roles::OPERATOR != 0,
        }
    }

    fn role_name(self) -> &'static str {
        match self {
            Need::Open => "none",
            Need::Agent => "the agent role",
            Need::AgentOrViewer => "the agent or viewer role",
            Need::Viewer => "the viewer (or operator) role",
            Need::Operator => "the operator role",
        }
    }
}

/// The role a gRPC method needs, and whether the admin token guards it
/// when there is no `[auth]` (the behaviour from before roles).
pub fn need(path: &str) -> (Need, bool) {
    let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
        return (Need::Open, false);
    };
    match (service, method) {
        ("backstop.v1.Resilience", _) => (Need::Agent, false),
        ("backstop.v1.Deferred", "Defer" | "Claim" | "Ack" | "Nack") => (Need::Agent, false),
        ("backstop.v1.Deferred", "QueueStats") => (Need::Viewer, false),
        ("backstop.v1.Deferred", "ListDeadLetters") => (Need::Viewer, true),
        ("backstop.v1.Deferred", "Requeue") => (Need::Operator, true),
        ("backstop.v1.Events", _) => (Need::AgentOrViewer, true),
        ("backstop.v1.Admin", "ListTargets" | "GetTarget" | "GetCluster") => (Need::Viewer, true),
        ("backstop.v1.Admin", _) => (Need::Operator, true),
        _ => (Need::Open, false),
    }
}

/// The principal the `admin_token` stands for when `[auth]` is set.
const ADMIN: &str = "admin";

/// Decides one call. `header` is the `authorization` value; `legacy` says
/// whether the admin token guards the call when there is no `[auth]`;
/// `what` names the call in messages.
pub fn authorize(
    cfg: &Config,
    header: Option<&str>,
    peer: Option<&PeerIdentity>,
    need: Need,
    legacy: bool,
    what: &str,
) -> Result<Option<Principal>, Status> {
    let Some(auth) = &cfg.auth else {
        return legacy_check(cfg.server.admin_token.as_deref(), header, legacy, what);
    };
    if need == Need::Open {
        return Ok(None);
    }
    let found = match (header.and_then(bearer), peer) {
        (Some(token), _) => match cfg.server.admin_token.as_deref() {
            Some(admin) if constant_time_eq(token.as_bytes(), admin.as_bytes()) => {
                Some(Principal {
                    name: Arc::from(ADMIN),
                    roles: roles::AGENT | roles::VIEWER | roles::OPERATOR,
                    token_sha256: None,
                    cert_identity: None,
                    decision_rate: None,
                    tenant: None,
                })
            }
            _ => {
                let hash: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
                // Every principal is compared, so timing says nothing about which.
                let mut hit = None;
                for p in &auth.principals {
                    if p.token_sha256.is_some_and(|h| constant_time_eq(&hash, &h)) {
                        hit = Some(p.clone());
                    }
                }
                if hit.is_none() {
                    return Err(Status::unauthenticated(format!(
                        "{what}: the bearer token matches no principal of this server"
                    )));
                }
                hit
            }
        },
        // No token: a verified client certificate may stand for a principal.
        (None, Some(id)) => auth
            .principals
            .iter()
            .find(|p| {
                p.cert_identity
                    .as_deref()
                    .is_some_and(|c| id.names.iter().any(|n| n == c))
            })
            .cloned()
            .or_else(|| {
                tracing::debug!(names = ?id.names, "client certificate matches no principal");
                None
            }),
        (None, None) => None,
    };
    let Some(p) = found else {
        return Err(Status::unauthenticated(match peer {
            Some(id) => format!(
                "{what}: the client certificate ({}) matches no principal's cert_identity, and no bearer token was sent",
                id.names.join(", ")
            ),
            None => format!(
                "{what}: this server requires a credential; send the metadata `authorization: Bearer <token>`"
            ),
        }));
    };
    if !need.allows(p.roles) {
        return Err(Status::permission_denied(format!(
            "{what} needs {}; principal {:?} has {}",
            need.role_name(),
            p.name.as_ref(),
            roles::describe(p.roles)
        )));
    }
    Ok(Some(p))
}

fn legacy_check(
    admin: Option<&str>,
    header: Option<&str>,
    legacy: bool,
    what: &str,
) -> Result<Option<Principal>, Status> {
    let Some(want) = admin.filter(|_| legacy) else {
        return Ok(None);
    };
    match header.and_then(bearer) {
        Some(g) if constant_time_eq(g.as_bytes(), want.as_bytes()) => Ok(None),
        Some(_) => Err(Status::unauthenticated(format!(
            "{what}: the admin token is wrong"
        ))),
        None => Err(Status::unauthenticated(format!(
            "{what} is an operator call: send the metadata `authorization: Bearer <admin_token>`"
        ))),
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

/// The tower layer (for `tonic::transport::Server::layer`).
#[derive(Clone)]
pub struct AuthLayer {
    pub engine: Arc<Engine>,
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            engine: self.engine.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    engine: Arc<Engine>,
}

impl<S, B> tower_service::Service<Request<B>> for Auth<S>
where
    S: tower_service::Service<Request<B>, Response = Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let (need, legacy) = need(req.uri().path());
        let cfg = self.engine.cfg();
        // Without [auth], only the admin-token calls are checked: the agent
        // path costs one borrow of the config and a path match.
        let checked = match &cfg.auth {
            Some(_) => need != Need::Open,
            None => legacy && cfg.server.admin_token.is_some(),
        };
        if checked {
            let header = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok());
            let what = req.uri().path().rsplit('/').next().unwrap_or("this call");
            let peer = req
                .extensions()
                .get::<crate::server::tls::ConnInfo>()
                .and_then(|c| c.peer.as_deref());
            match authorize(&cfg, header, peer, need, legacy, what) {
                Ok(Some(p)) => {
                    req.extensions_mut().insert(p);
                }
                Ok(None) => {}
                Err(status) => {
                    let res = status.into_http();
                    return Box::pin(async move { Ok(res) });
                }
            }
        }
        let fut = self.inner.call(req);
        Box::pin(fut)
    }
}

/// The principal a call was authenticated as (None without `[auth]` or an
/// admin token, or for calls that needed no credential).
pub fn principal<T>(req: &tonic::Request<T>) -> Option<Arc<str>> {
    req.extensions().get::<Principal>().map(|p| p.name.clone())
}

/// Who made a call, for logs and events ("-" when the server has no principals).
pub fn who<T>(req: &tonic::Request<T>) -> Arc<str> {
    req.extensions()
        .get::<Principal>()
        .map_or_else(|| Arc::from("-"), audit_name)
}

/// The whole principal a call was authenticated as (None without `[auth]`).
pub fn principal_of<T>(req: &tonic::Request<T>) -> Option<Principal> {
    req.extensions().get::<Principal>().cloned()
}

/// How the audit names a principal: its name, and its tenant when it has
/// one ("oncall of tenant support"), so every operator action's event and
/// log line say both.
pub fn audit_name(p: &Principal) -> Arc<str> {
    match &p.tenant {
        None => p.name.clone(),
        Some(t) => Arc::from(format!("{} of tenant {}", p.name, t.name).as_str()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(toml: &str) -> Config {
        Config::parse(toml, "t.toml").expect("valid")
    }

    fn sha(s: &str) -> String {
        sha2::Sha256::digest(s.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[test]
    fn without_auth_only_the_admin_token_guards_operator_calls() {
        let c = cfg("[server]\nadmin_token = \"0123456789abcdef\"\n");
        let (n, legacy) = need("/backstop.v1.Deferred/Requeue");
        let e = authorize(&c, None, None, n, legacy, "Requeue").unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(authorize(&c, Some("Bearer nope"), None, n, legacy, "Requeue").is_err());
        assert!(
            authorize(
                &c,
                Some("bearer 0123456789abcdef"),
                None,
                n,
                legacy,
                "Requeue"
            )
            .is_ok()
        );
        let (n, legacy) = need("/backstop.v1.Resilience/CanProceed");
        assert!(authorize(&c, None, None, n, legacy, "CanProceed").is_ok());
        let (n, legacy) = need("/backstop.v1.Deferred/QueueStats");
        assert!(
            authorize(&c, None, None, n, legacy, "QueueStats").is_ok(),
            "open as before"
        );
        assert!(authorize(&Config::default(), None, None, Need::Operator, true, "x").is_ok());
    }

    #[test]
    fn principals_get_exactly_their_roles() {
        let c = cfg(&format!(
            r#"
[server]
admin_token = "0123456789abcdef-admin"
[[auth.principals]]
name = "fleet"
roles = ["agent"]
token_sha256 = "{}"
[[auth.principals]]
name = "oncall"
roles = ["operator"]
token_sha256 = "{}"
[[auth.principals]]
name = "grafana"
roles = ["viewer"]
token_sha256 = "{}"
"#,
            sha("agent-token"),
            sha("oncall-token"),
            sha("viewer-token")
        ));
        let call = |token: Option<&str>, path: &str| {
            let (n, legacy) = need(path);
            let h = token.map(|t| format!("Bearer {t}"));
            authorize(&c, h.as_deref(), None, n, legacy, "call")
                .map(|p| p.map(|p| p.name.to_string()))
        };
        let decide = "/backstop.v1.Resilience/CanProceed";
        let force = "/backstop.v1.Admin/SetBreakerState";
        let get = "/backstop.v1.Admin/GetTarget";
        let watch = "/backstop.v1.Events/Watch";
        assert_eq!(
            call(Some("agent-token"), decide).unwrap().as_deref(),
            Some("fleet")
        );
        assert_eq!(
            call(None, decide).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            call(Some("wrong"), decide).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        let denied = call(Some("agent-token"), force).unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(
            denied.message().contains("operator role"),
            "{}",
            denied.message()
        );
        assert!(call(Some("agent-token"), watch).is_ok());
        assert!(call(Some("viewer-token"), get).is_ok());
        assert!(call(Some("viewer-token"), watch).is_ok());
        assert_eq!(
            call(Some("viewer-token"), force).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            call(Some("viewer-token"), decide).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        assert!(call(Some("oncall-token"), force).is_ok());
        assert!(
            call(Some("oncall-token"), get).is_ok(),
            "operator includes viewer"
        );
        assert_eq!(
            call(Some("oncall-token"), decide).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            call(Some("0123456789abcdef-admin"), force)
                .unwrap()
                .as_deref(),
            Some("admin")
        );
        assert!(
            call(None, "/grpc.health.v1.Health/Check").is_ok(),
            "health stays open"
        );
    }

    #[test]
    fn bad_principal_config_is_a_located_error() {
        let e = Config::parse(
            "[[auth.principals]]\nname = \"x\"\nroles = [\"root\"]\ntoken_sha256 = \"abc\"\n",
            "t.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown role \"root\""), "{e}");
        assert!(e.contains("64 hex digits"), "{e}");
        assert!(e.contains("t.toml:"), "{e}");
    }
}
