//! `backstop.v1.Admin`: inspect targets and override breakers.

use super::{breaker_state, check_len, opt_timestamp, status, to_proto_duration, to_timestamp};
use crate::domain::breaker::Mode;
use crate::engine::{BudgetView, Engine, TargetView};
use crate::proto;
use crate::proto::admin_server::Admin;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct AdminService {
    engine: Arc<Engine>,
}

impl AdminService {
    pub fn new(engine: Arc<Engine>) -> Self {
        AdminService { engine }
    }
}

pub(crate) fn budget(b: &BudgetView) -> proto::BudgetStatus {
    proto::BudgetStatus {
        kind: b.kind.to_string(),
        limit: b.limit,
        window: (!b.window.is_zero()).then(|| to_proto_duration(b.window)),
        available: b.available,
        group: b.group.as_deref().unwrap_or_default().to_string(),
    }
}

pub(crate) fn target_status(v: TargetView) -> proto::TargetStatus {
    let s = &v.settings;
    let b = &s.breaker;
    let settings = proto::TargetSettings {
        breaker: Some(proto::BreakerSettings {
            failure_threshold: b.failure_threshold,
            success_threshold: b.success_threshold,
            open_duration: Some(to_proto_duration(b.open_duration)),
            half_open_max_probes: b.half_open_max_probes,
            probe_lease: Some(to_proto_duration(b.probe_lease)),
            backoff_multiplier: b.backoff_multiplier,
            max_open_duration: Some(to_proto_duration(b.max_open_duration)),
            failure_rate_threshold: b.rate_rule.map_or(0.0, |r| r.threshold),
            window: Some(to_proto_duration(b.window)),
            minimum_calls: b.rate_rule.map_or(0, |r| r.minimum_calls),
            slow_call_duration: b.slow_call_duration.map(to_proto_duration),
            persistent_open_duration: Some(to_proto_duration(b.persistent_open_duration)),
            min_distinct_callers: b.min_distinct_callers,
        }),
        max_tokens: s.max_tokens,
        context_window: s.context_window,
        cost_per_mtok_input: s.cost_per_mtok_input,
        cost_per_mtok_output: s.cost_per_mtok_output,
        keys: s.keys.iter().map(|k| k.to_string()).collect(),
        budget_groups: v.group_names.iter().map(|g| g.to_string()).collect(),
        mode: match s.mode {
            crate::config::Enforcement::Enforce => "enforce".into(),
            crate::config::Enforcement::Shadow => "shadow".into(),
        },
    };
    proto::TargetStatus {
        target: v.name.to_string(),
        state: breaker_state(v.state) as i32,
        configured: v.configured,
        open_until: opt_timestamp(v.open_until),
        consecutive_failures: v.consecutive_failures,
        half_open_successes: v.half_open_successes,
        probes_outstanding: v.probes_outstanding,
        reopen_count: v.reopen_count,
        generation: v.generation,
        counters: Some(super::outcome_counters(&v.counters)),
        window_calls: v.window_calls,
        window_failures: v.window_failures,
        settings: Some(settings),
        key_slots: v
            .slots
            .iter()
            .map(|s| proto::KeySlotStatus {
                name: s.name.as_deref().unwrap_or_default().to_string(),
                disabled: s.disabled_until.is_some(),
                disabled_until: opt_timestamp(s.disabled_until),
                disabled_reason: s.disabled_reason.clone().unwrap_or_default(),
                paused_until: opt_timestamp(s.paused_until),
                budgets: s.budgets.iter().map(budget).collect(),
                learned: s
                    .learned
                    .iter()
                    .map(|(k, l)| proto::ProviderLimit {
                        kind: k.as_str().to_string(),
                        limit: l.limit,
                        remaining: l.remaining,
                        reset_at: (l.reset_at != crate::domain::Time::ZERO)
                            .then(|| to_timestamp(l.reset_at)),
                        observed_at: Some(to_timestamp(l.observed_at)),
                    })
                    .collect(),
                in_flight: s.in_flight,
            })
            .collect(),
        forced_reason: v.forced_reason.unwrap_or_default(),
        opened_at: opt_timestamp(v.opened_at),
        last_cause: v.last_cause.unwrap_or_default(),
        in_flight: v.in_flight,
        group_budgets: v.groups.iter().map(budget).collect(),
        latency: v.latency.map(crate::wire::to_proto_duration),
        spend: Some(proto::SpendStatus {
            total: v.spend_total,
            limits: v
                .spend_limits
                .iter()
                .map(|l| proto::SpendLimitStatus {
                    scope: l.scope.to_string(),
                    limit: l.limit,
                    window: Some(crate::wire::to_proto_duration(l.window)),
                    available: l.available,
                })
                .collect(),
        }),
        adaptive_concurrency: v.adaptive.map(|a| proto::AdaptiveLimit {
            limit: a.limit,
            min: a.min,
            max: a.max,
            last_change: a.last_change,
        }),
        distinct_failing_callers: v.distinct_failing_callers,
    }
}

/// An operator's reason with who gave it, when the server knows (with `[auth]`).
fn attributed(reason: &str, by: &str) -> String {
    match (by, reason.is_empty()) {
        ("-", _) => reason.to_string(),
        (_, true) => format!("by {by}"),
        (_, false) => format!("{reason} (by {by})"),
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_targets(
        &self,
        req: Request<proto::ListTargetsRequest>,
    ) -> Result<Response<proto::ListTargetsResponse>, Status> {
        let t = super::tenant::of(&req);
        let r = req.into_inner();
        check_len(&r.prefix, "prefix", 256)?;
        check_len(&r.page_token, "page_token", 256)?;
        // A tenant lists only its own names (an unrelated prefix: nothing).
        let Some(prefix) = super::tenant::confine_prefix(t.as_deref(), &r.prefix) else {
            return Ok(Response::new(proto::ListTargetsResponse::default()));
        };
        let page = self
            .engine
            .list_targets(prefix, r.page_size, &r.page_token)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::ListTargetsResponse {
            targets: page
                .targets
                .into_iter()
                .map(|t| proto::TargetSummary {
                    target: t.name.to_string(),
                    state: breaker_state(t.state) as i32,
                    configured: t.configured,
                    open_until: opt_timestamp(t.open_until),
                    consecutive_failures: t.consecutive_failures,
                })
                .collect(),
            next_page_token: page.next_page_token,
            total: page.total,
        }))
    }

    async fn get_target(
        &self,
        req: Request<proto::GetTargetRequest>,
    ) -> Result<Response<proto::TargetStatus>, Status> {
        let t = super::tenant::of(&req);
        let r = req.into_inner();
        super::tenant::check(t.as_deref(), "target", &r.target)?;
        let v = self.engine.get_target(&r.target).await.map_err(status)?;
        Ok(Response::new(target_status(v)))
    }

    async fn set_breaker_state(
        &self,
        req: Request<proto::SetBreakerStateRequest>,
    ) -> Result<Response<proto::TargetStatus>, Status> {
        let by = super::auth::who(&req);
        let who = super::auth::principal_of(&req);
        let t = super::tenant::of(&req);
        let r = req.into_inner();
        super::tenant::check(t.as_deref(), "target", &r.target)?;
        let mode = match proto::BreakerMode::try_from(r.mode) {
            Ok(proto::BreakerMode::Automatic) => Mode::Automatic,
            Ok(proto::BreakerMode::ForceOpen) => Mode::ForcedOpen,
            Ok(proto::BreakerMode::ForceClosed) => Mode::ForcedClosed,
            _ => {
                return Err(Status::invalid_argument(format!(
                    "mode {} is not one of BREAKER_MODE_AUTOMATIC (1), BREAKER_MODE_FORCE_OPEN (2), BREAKER_MODE_FORCE_CLOSED (3)",
                    r.mode
                )));
            }
        };
        check_len(&r.reason, "reason", 1024)?;
        // Audit: the event and the target's forced reason say who.
        let reason = attributed(&r.reason, &by);
        let v = self
            .engine
            .set_breaker_mode(&r.target, mode, &reason)
            .await
            .map_err(status)?;
        tracing::info!(principal = %by, action = "set_breaker_state", target = %r.target, mode = ?mode, reason = %r.reason, "operator action");
        self.engine.audit(
            &r.target,
            "set_breaker_state",
            who.as_ref(),
            &format!("{mode:?}: {}", r.reason),
            "grpc",
        );
        Ok(Response::new(target_status(v)))
    }

    async fn get_cluster(
        &self,
        _req: Request<proto::GetClusterRequest>,
    ) -> Result<Response<proto::ClusterStatus>, Status> {
        let c = self.engine.cluster_status().await;
        let cluster = self.engine.backend().redis().is_some();
        Ok(Response::new(proto::ClusterStatus {
            replica_id: c.replica_id,
            mode: if cluster { "cluster" } else { "embedded" }.into(),
            redis_reachable: c.redis_reachable,
            redis_role: c.redis_role,
            redis_rtt: cluster.then(|| to_proto_duration(c.redis_rtt)),
            degraded: c.degraded,
            replicas: c
                .replicas
                .into_iter()
                .map(|r| proto::ReplicaStatus {
                    id: r.id,
                    address: r.address,
                    last_heartbeat: Some(to_timestamp(crate::domain::Time::from_millis(
                        r.heartbeat_ms,
                    ))),
                    config_digest: r.config_digest,
                })
                .collect(),
            config_digest: c.config_digest,
        }))
    }

    async fn reload_config(
        &self,
        req: Request<proto::ReloadConfigRequest>,
    ) -> Result<Response<proto::ReloadConfigResponse>, Status> {
        let by = super::auth::who(&req);
        let who = super::auth::principal_of(&req);
        if let Some(t) = super::tenant::of(&req) {
            return Err(Status::permission_denied(format!(
                "ReloadConfig changes every tenant's settings; principal {by:?} belongs to tenant {:?} \
                 (a principal without a tenant, with the operator role, may reload)",
                t.name.as_ref()
            )));
        }
        let r = req.into_inner();
        check_len(&r.reason, "reason", 512)?;
        let source = attributed(
            &if r.reason.is_empty() {
                "admin".to_string()
            } else {
                format!("admin: {}", r.reason)
            },
            &by,
        );
        tracing::info!(principal = %by, action = "reload_config", reason = %r.reason, "operator action");
        let rep = self
            .engine
            .reload_from_source(&source)
            .await
            .map_err(status)?;
        self.engine
            .audit("", "reload_config", who.as_ref(), &r.reason, "grpc");
        Ok(Response::new(proto::ReloadConfigResponse {
            digest: rep.digest,
            previous_digest: rep.previous_digest,
            added: rep.added,
            removed: rep.removed,
            changed: rep.changed,
            routes_changed: rep.routes_changed,
            needs_restart: rep.needs_restart,
        }))
    }

    async fn reset_target(
        &self,
        req: Request<proto::ResetTargetRequest>,
    ) -> Result<Response<proto::TargetStatus>, Status> {
        let by = super::auth::who(&req);
        let who = super::auth::principal_of(&req);
        let t = super::tenant::of(&req);
        let r = req.into_inner();
        super::tenant::check(t.as_deref(), "target", &r.target)?;
        let v = self.engine.reset_target(&r.target).await.map_err(status)?;
        tracing::info!(principal = %by, action = "reset_target", target = %r.target, "operator action");
        self.engine
            .audit(&r.target, "reset_target", who.as_ref(), "", "grpc");
        Ok(Response::new(target_status(v)))
    }
}
