//! End-to-end: tenants on the real binary. A principal of tenant A can
//! decide on, list, get, force, watch, defer to and claim from only A's
//! names; B's names answer NOT_FOUND exactly as names that exist nowhere;
//! B's events never reach A's Watch; server-wide pages refuse A.

mod common;

use backstop::proto;
use common::Server;
use common::sha256_hex as sha;
use std::time::Duration;
use tonic::{Code, Request};

fn config() -> String {
    let p = |name: &str, roles: &str, tenant: &str| {
        format!(
            "[[auth.principals]]\nname = \"{name}\"\nroles = [{roles}]\ntoken_sha256 = \"{}\"\n{tenant}\n",
            sha(&format!("{name}-token-0000000"))
        )
    };
    format!(
        r#"
[auth]
metrics = "token"

[tenants.a]
[tenants.b]
prefix = "team-b:"

[targets."a/m"]
[targets."team-b:m"]
[routes."a/chat"]
targets = ["a/m"]
[routes."team-b:chat"]
targets = ["team-b:m"]

{}{}{}{}
"#,
        p("a-agent", "\"agent\"", "tenant = \"a\""),
        p("a-oncall", "\"operator\"", "tenant = \"a\""),
        p("b-oncall", "\"operator\", \"agent\"", "tenant = \"b\""),
        p("root", "\"operator\"", ""),
    )
}

fn with<T>(who: &str, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {who}-token-0000000")
            .parse()
            .expect("ascii"),
    );
    r
}

fn can(target: &str) -> proto::CanProceedRequest {
    proto::CanProceedRequest {
        target: target.into(),
        ..Default::default()
    }
}

/// The message with the name replaced, to compare answers for two names.
fn shape(e: &tonic::Status, name: &str) -> (Code, String) {
    (e.code(), e.message().replace(name, "NAME"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_sees_and_affects_only_its_own_names() {
    let s = Server::start(&config(), &[]);
    let mut c = s.resilience().await;
    let mut admin = s.admin().await;
    let ch = s.channel().await;
    let mut q = proto::deferred_client::DeferredClient::new(ch.clone());

    // Decisions: own names work; B's name and a name that exists nowhere
    // outside A get the same NOT_FOUND.
    assert!(
        c.can_proceed(with("a-agent", can("a/m")))
            .await
            .expect("own target")
            .into_inner()
            .allowed
    );
    let exists = c
        .can_proceed(with("a-agent", can("team-b:m")))
        .await
        .expect_err("B's target");
    let nowhere = c
        .can_proceed(with("a-agent", can("team-b:nothing")))
        .await
        .expect_err("no such target");
    assert_eq!(exists.code(), Code::NotFound);
    assert_eq!(
        shape(&exists, "team-b:m"),
        shape(&nowhere, "team-b:nothing")
    );
    let e = c
        .record_outcome(with(
            "a-agent",
            proto::RecordOutcomeRequest {
                target: "team-b:m".into(),
                http_status: 503,
                ..Default::default()
            },
        ))
        .await
        .expect_err("outcome on B");
    assert_eq!(e.code(), Code::NotFound);
    for r in [
        proto::RouteRequest {
            route: "team-b:chat".into(),
            ..Default::default()
        },
        proto::RouteRequest {
            candidates: vec!["a/m".into(), "team-b:m".into()],
            ..Default::default()
        },
    ] {
        let e = c.route(with("a-agent", r)).await.expect_err("B's route");
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
    }
    // An unknown route of its own: the answer lists no other tenant's routes.
    let e = c
        .route(with(
            "a-agent",
            proto::RouteRequest {
                route: "a/nope".into(),
                ..Default::default()
            },
        ))
        .await
        .expect_err("unknown route");
    assert_eq!(e.code(), Code::NotFound);
    assert!(!e.message().contains("team-b"), "{}", e.message());
    // FinishRequest: a foreign route label is NOT_FOUND; request ids are per
    // tenant (A's "req-1" is not B's).
    let finish = |id: &str, route: &str| proto::FinishRequestRequest {
        request_id: id.into(),
        result: proto::RequestResult::Failed as i32,
        route: route.into(),
        ..Default::default()
    };
    assert_eq!(
        c.finish_request(with("a-agent", finish("x", "team-b:chat")))
            .await
            .expect_err("B's route")
            .code(),
        Code::NotFound
    );
    let mut b_can = can("team-b:m");
    b_can.request_id = "req-1".into();
    c.can_proceed(with("b-oncall", b_can))
        .await
        .expect("B's request");
    let a_fin = c
        .finish_request(with("a-agent", finish("req-1", "")))
        .await
        .expect("A finishes its own req-1")
        .into_inner();
    assert!(!a_fin.tracked, "A's req-1 is not B's: {a_fin:?}");
    let b_fin = c
        .finish_request(with("b-oncall", finish("req-1", "")))
        .await
        .expect("B finishes its req-1")
        .into_inner();
    assert!(b_fin.tracked && !b_fin.duplicate, "{b_fin:?}");
    let r = c
        .route(with(
            "a-agent",
            proto::RouteRequest {
                route: "a/chat".into(),
                ..Default::default()
            },
        ))
        .await
        .expect("own route")
        .into_inner();
    assert_eq!(r.target, "a/m");
    let batch = c
        .can_proceed_batch(with(
            "a-agent",
            proto::CanProceedBatchRequest {
                items: vec![can("a/m"), can("team-b:m")],
            },
        ))
        .await
        .expect("batch")
        .into_inner();
    assert!(matches!(
        batch.items[0].result,
        Some(proto::can_proceed_result::Result::Ok(_))
    ));
    match &batch.items[1].result {
        Some(proto::can_proceed_result::Result::Error(e)) => {
            assert_eq!(e.code, Code::NotFound as i32)
        }
        other => panic!("B's item: {other:?}"),
    }

    // Admin: A's operator lists, gets and forces only A's targets.
    let list = admin
        .list_targets(with("a-oncall", proto::ListTargetsRequest::default()))
        .await
        .expect("list")
        .into_inner();
    let names: Vec<_> = list.targets.iter().map(|t| t.target.as_str()).collect();
    assert_eq!(names, ["a/m"], "{names:?}");
    let other = admin
        .list_targets(with(
            "a-oncall",
            proto::ListTargetsRequest {
                prefix: "team-b:".into(),
                ..Default::default()
            },
        ))
        .await
        .expect("list")
        .into_inner();
    assert!(other.targets.is_empty());
    let g1 = admin
        .get_target(with(
            "a-oncall",
            proto::GetTargetRequest {
                target: "team-b:m".into(),
            },
        ))
        .await
        .expect_err("B's target");
    let g2 = admin
        .get_target(with(
            "a-oncall",
            proto::GetTargetRequest {
                target: "team-b:zzz".into(),
            },
        ))
        .await
        .expect_err("nothing");
    assert_eq!(shape(&g1, "team-b:m"), shape(&g2, "team-b:zzz"));
    let force = |target: &str| proto::SetBreakerStateRequest {
        target: target.into(),
        mode: proto::BreakerMode::ForceOpen as i32,
        reason: "test".into(),
    };
    assert_eq!(
        admin
            .set_breaker_state(with("a-oncall", force("team-b:m")))
            .await
            .expect_err("B's target")
            .code(),
        Code::NotFound
    );
    assert_eq!(
        admin
            .reset_target(with(
                "a-oncall",
                proto::ResetTargetRequest {
                    target: "team-b:m".into()
                }
            ))
            .await
            .expect_err("B's target")
            .code(),
        Code::NotFound
    );
    let e = admin
        .reload_config(with("a-oncall", proto::ReloadConfigRequest::default()))
        .await
        .expect_err("a tenant cannot reload everyone's config");
    assert_eq!(e.code(), Code::PermissionDenied);
    // B's breaker was not touched by any of that.
    let b = admin
        .get_target(with(
            "root",
            proto::GetTargetRequest {
                target: "team-b:m".into(),
            },
        ))
        .await
        .expect("root sees everything")
        .into_inner();
    assert_eq!(b.state, proto::BreakerState::Closed as i32);

    // Watch: A sees A's snapshot and events only.
    let mut ev = proto::events_client::EventsClient::new(ch.clone());
    let mut watch = ev
        .watch(with("a-oncall", proto::WatchRequest::default()))
        .await
        .expect("watch")
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("snapshot in time")
        .expect("stream")
        .expect("an item");
    let snap: Vec<String> = match &first.kind {
        Some(proto::event::Kind::Snapshot(s)) => {
            s.targets.iter().map(|t| t.target.clone()).collect()
        }
        other => panic!("a snapshot first: {other:?}"),
    };
    assert_eq!(snap, ["a/m"], "{first:?}");
    admin
        .set_breaker_state(with("b-oncall", force("team-b:m")))
        .await
        .expect("B forces its own");
    let forced = admin
        .set_breaker_state(with("a-oncall", force("a/m")))
        .await
        .expect("A forces its own")
        .into_inner();
    // The audit names the principal and its tenant.
    assert!(
        forced.forced_reason.ends_with("(by a-oncall of tenant a)"),
        "{forced:?}"
    );
    let next = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("event in time")
        .expect("stream")
        .expect("an item");
    assert_eq!(next.target, "a/m", "B's event never reaches A: {next:?}");
    // The audit event follows: who, of which tenant, what, why (B's audit
    // event, like B's other events, never reaches A).
    let audit = loop {
        let e = tokio::time::timeout(Duration::from_secs(5), watch.message())
            .await
            .expect("audit event in time")
            .expect("stream")
            .expect("an item");
        assert_eq!(e.target, "a/m", "{e:?}");
        if let Some(proto::event::Kind::OperatorAction(a)) = e.kind {
            break a;
        }
    };
    assert_eq!(
        (
            audit.action.as_str(),
            audit.principal.as_str(),
            audit.tenant.as_str(),
            audit.via.as_str()
        ),
        ("set_breaker_state", "a-oncall", "a", "grpc")
    );
    assert!(audit.reason.contains("ForcedOpen"), "{audit:?}");

    // Queues.
    let defer = |queue: &str| proto::DeferRequest {
        queue: queue.into(),
        payload: b"x".to_vec(),
        ..Default::default()
    };
    assert_eq!(
        q.defer(with("a-agent", defer("team-b:chat")))
            .await
            .expect_err("B's queue")
            .code(),
        Code::NotFound
    );
    q.defer(with("b-oncall", defer("team-b:chat")))
        .await
        .expect("B defers to its own queue");
    let e = q
        .claim(with(
            "a-agent",
            proto::ClaimRequest {
                queue: "team-b:chat".into(),
                max_items: 1,
                ..Default::default()
            },
        ))
        .await
        .expect_err("B's queue");
    assert_eq!(e.code(), Code::NotFound);
    // A dead letter of B: A's operator cannot requeue it (the same answer
    // as for an id that does not exist); B's can.
    let dead = q
        .defer(with(
            "b-oncall",
            proto::DeferRequest {
                max_attempts: 1,
                ..defer("team-b:chat")
            },
        ))
        .await
        .expect("defer")
        .into_inner();
    // B's target is forced open above; Claim admits through it.
    admin
        .set_breaker_state(with(
            "b-oncall",
            proto::SetBreakerStateRequest {
                target: "team-b:m".into(),
                mode: proto::BreakerMode::Automatic as i32,
                reason: "test".into(),
            },
        ))
        .await
        .expect("B releases its own");
    let mut tries = 0;
    let item = loop {
        tries += 1;
        assert!(tries < 50, "the dead-letter candidate was never claimed");
        let c = q
            .claim(with(
                "b-oncall",
                proto::ClaimRequest {
                    queue: "team-b:chat".into(),
                    max_items: 10,
                    ..Default::default()
                },
            ))
            .await
            .expect("claim")
            .into_inner();
        if let Some(i) = c.items.into_iter().find(|i| i.id == dead.id) {
            break i;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    q.nack(with(
        "b-oncall",
        proto::NackRequest {
            id: item.id.clone(),
            lease_token: item.lease_token,
            reason: "bad".into(),
            ..Default::default()
        },
    ))
    .await
    .expect("nack: dead on its only attempt");
    let foreign = q
        .requeue(with(
            "a-oncall",
            proto::RequeueRequest {
                id: dead.id.clone(),
            },
        ))
        .await
        .expect_err("B's dead letter");
    let unknown = q
        .requeue(with(
            "a-oncall",
            proto::RequeueRequest {
                id: "999999".into(),
            },
        ))
        .await
        .expect_err("no such item");
    assert_eq!(shape(&foreign, &dead.id), shape(&unknown, "999999"));
    q.requeue(with("b-oncall", proto::RequeueRequest { id: dead.id }))
        .await
        .expect("B requeues its own");
    let stats = q
        .queue_stats(with("a-oncall", proto::QueueStatsRequest::default()))
        .await
        .expect("stats")
        .into_inner();
    assert!(
        stats.queues.iter().all(|s| s.queue.starts_with("a/")),
        "{stats:?}"
    );

    // HTTP pages show a tenant's principal only its tenant; the root one sees all.
    let a = [("Authorization", "Bearer a-oncall-token-0000000")];
    let (status, body) = s.http_get("/api/snapshot", &a);
    assert!(status.contains("200"), "{status}");
    assert!(
        body.contains("\"a/m\"") && !body.contains("team-b"),
        "{body}"
    );
    let (status, body) = s.http_get("/metrics", &a);
    assert!(status.contains("200"), "{status}");
    assert!(body.contains("target=\"a/m\""), "{body}");
    assert!(!body.contains("team-b"), "no series names b: {body}");
    assert!(
        body.contains("backstop_target_tenant{target=\"a/m\",tenant=\"a\"} 1"),
        "{body}"
    );
    assert!(
        body.trim_end().ends_with("# EOF"),
        "still a valid exposition"
    );
    for page in [
        "/api/routes",
        "/api/queues",
        "/api/events",
        "/api/history?targets=a/m,team-b:m",
    ] {
        let (status, body) = s.http_get(page, &a);
        assert!(status.contains("200"), "{page}: {status}");
        assert!(
            !body.contains("team-b:chat") && !body.contains("\"team-b:m\":{"),
            "{page}: {body}"
        );
    }
    let (status, body) = s.http_get("/api/routes", &a);
    assert!(body.contains("a/chat"), "{status} {body}");
    // The live stream: a's snapshot only.
    let mut sse = s.sse("/events", &a);
    let snap = common::next_sse(&mut sse).expect("snapshot");
    assert!(
        snap.data.contains("a/m") && !snap.data.contains("team-b"),
        "{}",
        snap.data
    );
    // An operator action on another tenant's target: not found, as in gRPC.
    let (code, body) = common::http_post(
        &s,
        "/api/targets/team-b:m/reset",
        &[
            ("Authorization", "Bearer a-oncall-token-0000000"),
            ("X-Backstop-Action", "1"),
        ],
        "",
    );
    assert_eq!(code, 404, "{body}");
    // The requeue's audit event names B's queue, B's operator and tenant:
    // the root viewer sees it, A's does not.
    let (_, body) = s.http_get(
        "/api/events?limit=1000",
        &[("Authorization", "Bearer root-token-0000000")],
    );
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    let requeued = v["events"]
        .as_array()
        .expect("events")
        .iter()
        .find(|e| e["kind"] == "operator_action" && e["action"] == "requeue")
        .cloned()
        .expect("a requeue audit event");
    assert_eq!(
        (
            requeued["target"].as_str(),
            requeued["principal"].as_str(),
            requeued["tenant"].as_str()
        ),
        (Some("team-b:chat"), Some("b-oncall"), Some("b")),
        "{requeued}"
    );
    let (_, body) = s.http_get("/api/events?limit=1000", &a);
    assert!(!body.contains("b-oncall"), "{body}");
    let (status, body) = s.http_get(
        "/api/snapshot",
        &[("Authorization", "Bearer root-token-0000000")],
    );
    assert!(status.contains("200"), "{status}");
    assert!(body.contains("team-b:m") && body.contains("a/m"));
}

/// Per-tenant caps: targets created on first use, payload bytes in the
/// tenant's queues, open event streams. A tenant at a cap gets
/// RESOURCE_EXHAUSTED naming the cap; the other tenant is not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_caps_hold_one_tenant_without_starving_another() {
    let cfg = config().replace(
        "[tenants.a]\n",
        "[tenants.a]\nmax_targets = 2\nmax_queue_bytes = 3000\nmax_watchers = 1\n",
    );
    let s = Server::start(&cfg, &[]);
    let mut c = s.resilience().await;
    let ch = s.channel().await;

    // Targets: two new ones, then the cap (configured a/m does not count).
    for t in ["a/new1", "a/new2"] {
        assert!(c.can_proceed(with("a-agent", can(t))).await.is_ok(), "{t}");
    }
    let e = c
        .can_proceed(with("a-agent", can("a/new3")))
        .await
        .expect_err("a is at max_targets");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("[tenants.a] max_targets"), "{e:?}");
    // Existing targets still decide; b creates its own freely.
    assert!(c.can_proceed(with("a-agent", can("a/new1"))).await.is_ok());
    for t in ["team-b:1", "team-b:2", "team-b:3"] {
        assert!(c.can_proceed(with("b-oncall", can(t))).await.is_ok(), "{t}");
    }

    // Queue bytes: 1500 fits twice... not quite (records carry more than
    // the payload), once for sure; the second passes 3000 and is refused.
    let mut q = proto::deferred_client::DeferredClient::new(ch.clone());
    let big = |queue: &str| proto::DeferRequest {
        queue: queue.into(),
        payload: vec![7u8; 1600],
        ..Default::default()
    };
    q.defer(with("a-agent", big("a/chat")))
        .await
        .expect("first fits");
    let e = q
        .defer(with("a-agent", big("a/m")))
        .await
        .expect_err("a's queues are full");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("max_queue_bytes"), "{e:?}");
    q.defer(with("b-oncall", big("team-b:chat")))
        .await
        .expect("b has no cap");
    q.defer(with("b-oncall", big("team-b:chat")))
        .await
        .expect("b has no cap");

    // Watchers: one stream for a; b still watches.
    let mut ev = proto::events_client::EventsClient::new(ch.clone());
    let first = ev
        .watch(with("a-agent", proto::WatchRequest::default()))
        .await
        .expect("a's one stream");
    let e = ev
        .watch(with("a-agent", proto::WatchRequest::default()))
        .await
        .expect_err("a is at max_watchers");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("max_watchers"), "{e:?}");
    let _b = ev
        .watch(with("b-oncall", proto::WatchRequest::default()))
        .await
        .expect("b is not capped");
    // Closing a's stream gives the slot back.
    drop(first);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match ev
            .watch(with("a-agent", proto::WatchRequest::default()))
            .await
        {
            Ok(_) => break,
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted);
                assert!(std::time::Instant::now() < deadline, "slot never came back");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[test]
fn overlapping_prefixes_and_unknown_tenants_are_config_errors() {
    let dir = common::TempDir::new("tenants");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[tenants.a]\nprefix = \"team\"\n[tenants.b]\nprefix = \"team-b\"\n\
         [[auth.principals]]\nname = \"x\"\nroles = [\"agent\"]\ntenant = \"c\"\n\
         token_sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\n",
    )
    .expect("write");
    let out = std::process::Command::new(common::binary())
        .arg("check-config")
        .arg(&path)
        .output()
        .expect("check-config");
    let err =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("overlaps"), "{err}");
    assert!(err.contains("tenant \"c\" is not declared"), "{err}");
}

/// A tenant's route may list only its own targets, and a budget group may
/// not be shared across tenants: either would let one tenant reach into
/// another's targets or budget. Checked when the config loads.
#[test]
fn routes_and_budget_groups_stay_within_one_tenant() {
    let bad_route = "[tenants.a]\n[tenants.b]\n[targets.\"a/m\"]\n[targets.\"b/m\"]\n\
                     [routes.\"a/chat\"]\ntargets = [\"a/m\", \"b/m\"]\n";
    let e = backstop::config::Config::parse(bad_route, "t.toml").expect_err("route crosses");
    assert!(
        e.to_string()
            .contains("belongs to tenant \"a\" but lists \"b/m\""),
        "{e}"
    );
    let bad_group = "[tenants.a]\n[budgets.shared]\nrequests_per_minute = 10\n\
                     [targets.\"a/m\"]\nbudgets = [\"shared\"]\n[targets.free]\nbudgets = [\"shared\"]\n";
    let e = backstop::config::Config::parse(bad_group, "t.toml").expect_err("group crosses");
    assert!(
        e.to_string().contains("may not be shared across tenants"),
        "{e}"
    );
    // Tenantless routes may list anyone's targets (only tenantless
    // principals can use them); a group within one tenant is fine.
    let ok = "[tenants.a]\n[budgets.g]\nrequests_per_minute = 10\n\
              [targets.\"a/m\"]\nbudgets = [\"g\"]\n[targets.\"a/n\"]\nbudgets = [\"g\"]\n\
              [routes.everything]\ntargets = [\"a/m\", \"a/n\"]\n";
    backstop::config::Config::parse(ok, "t.toml").expect("valid");
}
