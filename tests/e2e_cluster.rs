//! End-to-end: cluster mode. Three real replicas on one real Redis (and on a
//! three-primary Redis Cluster), driven over gRPC: one shared breaker, one
//! set of probes, one budget, permits that settle anywhere, one event
//! stream, and what happens when a replica dies or Redis freezes.

mod common;

use backstop::proto;
use common::{Redis, Server};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

type Client = proto::resilience_client::ResilienceClient<Channel>;

fn can(target: &str) -> proto::CanProceedRequest {
    proto::CanProceedRequest {
        target: target.into(),
        ..Default::default()
    }
}

fn outcome(target: &str, permit: &str, status: i32) -> proto::RecordOutcomeRequest {
    proto::RecordOutcomeRequest {
        target: target.into(),
        permit: permit.into(),
        http_status: status,
        ..Default::default()
    }
}

async fn replicas(config: &str, url: &str, n: usize) -> Vec<Server> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(Server::start_replica(config, url, &[]).await);
    }
    out
}

async fn clients(servers: &[Server]) -> Vec<Client> {
    let mut out = Vec::new();
    for s in servers {
        out.push(s.resilience().await);
    }
    out
}

async fn status(server: &Server, target: &str) -> proto::TargetStatus {
    server
        .admin()
        .await
        .get_target(proto::GetTargetRequest {
            target: target.into(),
        })
        .await
        .expect("get_target")
        .into_inner()
}

/// Five failures, each admitted on one replica and reported on another,
/// open the breaker for all three at once.
async fn breaker_is_shared(servers: &[Server]) {
    let mut c = clients(servers).await;
    let n = c.len();
    for i in 0..5 {
        let p = c[i % n]
            .can_proceed(can("m"))
            .await
            .expect("ok")
            .into_inner();
        assert!(p.allowed, "call {i}: {p:?}");
        assert!(!p.degraded);
        c[(i + 1) % n]
            .record_outcome(outcome("m", &p.permit, 503))
            .await
            .expect("ok");
    }
    for (i, ci) in c.iter_mut().enumerate() {
        let r = ci.can_proceed(can("m")).await.expect("ok").into_inner();
        assert!(
            !r.allowed,
            "replica {i} admitted after the fleet's fifth failure"
        );
        assert_eq!(r.reason(), proto::Reason::CircuitOpen, "replica {i}");
    }
}

/// 60 concurrent callers over every replica while half-open: exactly
/// `half_open_max_probes` are admitted, fleet-wide.
async fn probes_are_limited_fleet_wide(servers: &[Server]) {
    let mut c = clients(servers).await;
    let n = c.len();
    for i in 0..2 {
        let p = c[i % n]
            .can_proceed(can("h"))
            .await
            .expect("ok")
            .into_inner();
        c[(i + 1) % n]
            .record_outcome(outcome("h", &p.permit, 503))
            .await
            .expect("ok");
    }
    assert_eq!(
        status(&servers[0], "h").await.state(),
        proto::BreakerState::Open
    );
    // Wait out the open period (1 s), then everyone asks at once.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let admitted = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..60 {
        let mut ci = c[i % n].clone();
        let admitted = admitted.clone();
        tasks.push(tokio::spawn(async move {
            let r = ci.can_proceed(can("h")).await.expect("ok").into_inner();
            if r.allowed {
                admitted.fetch_add(1, Ordering::Relaxed);
            } else {
                assert!(
                    matches!(
                        r.reason(),
                        proto::Reason::ProbeLimit | proto::Reason::CircuitOpen
                    ),
                    "{r:?}"
                );
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    assert_eq!(
        admitted.load(Ordering::Relaxed),
        2,
        "half_open_max_probes = 2"
    );
}

/// 48 clients over every replica for 3 s against requests_per_minute = 600:
/// never more than burst + rate·t, and not starved either.
async fn budget_is_shared(servers: &[Server]) {
    let c = clients(servers).await;
    let admitted = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let run_for = Duration::from_secs(3);
    let mut tasks = Vec::new();
    for i in 0..48 {
        let mut ci = c[i % c.len()].clone();
        let admitted = admitted.clone();
        tasks.push(tokio::spawn(async move {
            let mut last = start;
            // 3 s, or longer (up to 10 s) until the burst is used: on a
            // loaded machine 48 debug-build clients may be slower than the
            // budget, and "not starved" must not depend on their speed.
            while start.elapsed() < run_for
                || (admitted.load(Ordering::Relaxed) < 600
                    && start.elapsed() < Duration::from_secs(10))
            {
                let r = ci.can_proceed(can("b")).await.expect("ok").into_inner();
                if r.allowed {
                    admitted.fetch_add(1, Ordering::Relaxed);
                    last = Instant::now();
                } else {
                    assert_eq!(r.reason(), proto::Reason::RateLimited, "{r:?}");
                    let wait = r
                        .retry_after
                        .map_or(0.01, |d| d.nanos as f64 / 1e9 + d.seconds as f64);
                    tokio::time::sleep(Duration::from_secs_f64(wait.clamp(0.001, 0.05))).await;
                }
            }
            last
        }));
    }
    let mut last = start;
    for t in tasks {
        last = last.max(t.await.expect("task"));
    }
    let t = last.duration_since(start).as_secs_f64();
    let got = admitted.load(Ordering::Relaxed) as f64;
    let bound = 600.0 + 600.0 * t / 60.0 + 1.0;
    assert!(got <= bound, "admitted {got} > burst + rate·t = {bound}");
    assert!(got >= 600.0, "starved: only {got} admitted of a 600 burst");
}

const SHARED: &str = r#"
[targets.m]
breaker = { failure_threshold = 5, open_duration = "60s" }
[targets.h]
breaker = { failure_threshold = 2, open_duration = "1s", half_open_max_probes = 2, probe_lease = "30s", jitter = 0.0 }
[targets.b]
requests_per_minute = 600
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_share_breakers_probes_and_budgets() {
    let redis = Redis::start();
    let servers = replicas(SHARED, &redis.url(), 3).await;
    breaker_is_shared(&servers).await;
    probes_are_limited_fleet_wide(&servers).await;
    budget_is_shared(&servers).await;
    // Every replica sees the others.
    let c = servers[0]
        .admin()
        .await
        .get_cluster(proto::GetClusterRequest {})
        .await
        .expect("cluster")
        .into_inner();
    assert_eq!(c.mode, "cluster");
    assert_eq!(c.replicas.len(), 3, "{c:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_permit_settles_on_any_replica_once() {
    let redis = Redis::start();
    let config = "[targets.c]\nmax_concurrency = 1\ntokens_per_minute = 1000\n";
    let servers = replicas(config, &redis.url(), 3).await;
    let mut c = clients(&servers).await;
    let p = c[0]
        .can_proceed(proto::CanProceedRequest {
            estimated_tokens: 900,
            ..can("c")
        })
        .await
        .expect("ok")
        .into_inner();
    assert!(p.allowed);
    let blocked = c[2].can_proceed(can("c")).await.expect("ok").into_inner();
    assert_eq!(blocked.reason(), proto::Reason::ConcurrencyLimit);
    // Reported on B: the slot is freed and 800 of the 900 reserved tokens come back.
    let mut report = outcome("c", &p.permit, 200);
    report.input_tokens = 100;
    let r = c[1]
        .record_outcome(report.clone())
        .await
        .expect("ok")
        .into_inner();
    assert!(!r.duplicate);
    let s = status(&servers[2], "c").await;
    let tokens = s.key_slots[0]
        .budgets
        .iter()
        .find(|b| b.kind == "tokens")
        .expect("tokens budget");
    assert!(tokens.available >= 899.0, "refunded: {}", tokens.available);
    assert_eq!(s.key_slots[0].in_flight, 0);
    let q = c[2]
        .can_proceed(proto::CanProceedRequest {
            estimated_tokens: 10,
            ..can("c")
        })
        .await
        .expect("ok")
        .into_inner();
    assert!(
        q.allowed,
        "the slot was freed by the report on another replica: {q:?}"
    );
    // Reported again (on C): a duplicate that frees nothing more.
    let again = c[2].record_outcome(report).await.expect("ok").into_inner();
    assert!(again.duplicate);
    let blocked = c[0].can_proceed(can("c")).await.expect("ok").into_inner();
    assert_eq!(
        blocked.reason(),
        proto::Reason::ConcurrencyLimit,
        "q still holds the only slot"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_on_one_replica_sees_a_transition_caused_on_another() {
    let redis = Redis::start();
    let config = "[targets.w]\nbreaker = { failure_threshold = 1 }\n";
    let servers = replicas(config, &redis.url(), 3).await;
    let mut ev = proto::events_client::EventsClient::new(servers[2].channel().await);
    let mut stream = ev
        .watch(proto::WatchRequest {
            targets: vec!["w".into()],
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    // The snapshot first.
    let first = stream.message().await.expect("ok").expect("snapshot");
    assert!(matches!(first.kind, Some(proto::event::Kind::Snapshot(_))));
    let mut a = servers[0].resilience().await;
    let p = a.can_proceed(can("w")).await.expect("ok").into_inner();
    let opened_at = Instant::now();
    a.record_outcome(outcome("w", &p.permit, 503))
        .await
        .expect("ok");
    let e = tokio::time::timeout(Duration::from_secs(1), stream.message())
        .await
        .expect("within a second")
        .expect("ok")
        .expect("an event");
    let Some(proto::event::Kind::BreakerTransition(t)) = e.kind else {
        panic!("expected a transition, got {e:?}");
    };
    assert_eq!(t.to(), proto::BreakerState::Open);
    assert_eq!(e.target, "w");
    assert!(e.seq > first.seq, "ordered after the snapshot");
    assert!(opened_at.elapsed() < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_killed_holding_a_probe_lease_does_not_wedge_half_open() {
    let redis = Redis::start();
    let config = "[targets.k]\nbreaker = { failure_threshold = 1, open_duration = \"500ms\", probe_lease = \"1500ms\", jitter = 0.0 }\n";
    let mut servers = replicas(config, &redis.url(), 2).await;
    let mut c = clients(&servers).await;
    let p = c[0].can_proceed(can("k")).await.expect("ok").into_inner();
    c[0].record_outcome(outcome("k", &p.permit, 503))
        .await
        .expect("ok");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let probe = c[0].can_proceed(can("k")).await.expect("ok").into_inner();
    assert!(probe.allowed, "A holds the probe");
    servers[0].kill9();
    let refused = c[1].can_proceed(can("k")).await.expect("ok").into_inner();
    assert_eq!(refused.reason(), proto::Reason::ProbeLimit);
    // The lease runs out: B gets a probe of its own.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = c[1].can_proceed(can("k")).await.expect("ok").into_inner();
        if r.allowed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never re-admitted a probe: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_redis_degrades_fast_and_state_merges_back() {
    let redis = Redis::start();
    let config = "[cluster]\nredis_url = \"redis://unused\"\nredis_timeout = \"50ms\"\n[targets.f]\nbreaker = { failure_threshold = 2, open_duration = \"60s\" }\n";
    // --redis overrides the URL above with the test's Redis.
    let servers = replicas(config, &redis.url(), 3).await;
    let mut c = clients(&servers).await;
    redis.signal("STOP");
    // Every replica keeps answering, quickly, flagged degraded.
    for (i, ci) in c.iter_mut().enumerate() {
        for _ in 0..5 {
            let t = Instant::now();
            let r = ci
                .can_proceed(can("f"))
                .await
                .expect("answered")
                .into_inner();
            assert!(
                t.elapsed() < Duration::from_millis(300),
                "replica {i} took {:?}",
                t.elapsed()
            );
            assert!(r.degraded, "replica {i} answered without Redis: degraded");
        }
    }
    // While frozen, replica A sees the provider fail and opens its breaker alone.
    for _ in 0..2 {
        let p = c[0].can_proceed(can("f")).await.expect("ok").into_inner();
        let o = c[0]
            .record_outcome(outcome("f", &p.permit, 503))
            .await
            .expect("ok")
            .into_inner();
        assert!(o.degraded);
    }
    let r = c[0].can_proceed(can("f")).await.expect("ok").into_inner();
    assert_eq!(r.reason(), proto::Reason::CircuitOpen);
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.signal("CONT");
    for s in &servers {
        s.wait_cluster_ready().await;
    }
    // A's outage was merged back: B, which never saw it, refuses too.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = c[1].can_proceed(can("f")).await.expect("ok").into_inner();
        if !r.allowed && !r.degraded {
            assert_eq!(r.reason(), proto::Reason::CircuitOpen);
            break;
        }
        assert!(Instant::now() < deadline, "never merged back: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Replica A opens a breaker through Redis; replica B never decided on that
/// target, so it has nothing of it cached. Redis then stops answering: B,
/// deciding alone, still refuses, because it heard A's transition on the
/// shared event stream (the chaos soak found B admitting here).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_degraded_replica_honours_an_open_breaker_it_only_heard_of() {
    let redis = Redis::start();
    let config = "[cluster]\nredis_url = \"redis://unused\"\nredis_timeout = \"50ms\"\n[targets.h]\nbreaker = { failure_threshold = 2, open_duration = \"60s\" }\n";
    let servers = replicas(config, &redis.url(), 2).await;
    let mut c = clients(&servers).await;
    for _ in 0..2 {
        let p = c[0].can_proceed(can("h")).await.expect("ok").into_inner();
        assert!(!p.degraded);
        c[0].record_outcome(outcome("h", &p.permit, 503))
            .await
            .expect("ok");
    }
    let r = c[0].can_proceed(can("h")).await.expect("ok").into_inner();
    assert_eq!(r.reason(), proto::Reason::CircuitOpen);
    // A replica (re)started now answers its very first call from Redis, not
    // degraded from an empty fallback: it waits for Redis before serving.
    let fresh = Server::start(config, &["--redis", &redis.url()]);
    let r = fresh
        .resilience()
        .await
        .can_proceed(can("h"))
        .await
        .expect("ok")
        .into_inner();
    assert!(
        !r.degraded && !r.allowed,
        "first call of a new replica: {r:?}"
    );
    // The event reaches B's stream reader within its 500 ms block.
    tokio::time::sleep(Duration::from_millis(700)).await;
    redis.signal("STOP");
    let r = c[1].can_proceed(can("h")).await.expect("ok").into_inner();
    redis.signal("CONT");
    assert!(r.degraded, "decided without Redis: {r:?}");
    assert!(!r.allowed, "B forgot the open breaker A announced: {r:?}");
    assert_eq!(r.reason(), proto::Reason::CircuitOpen);
    let wait = r.retry_after.expect("says how long");
    assert!(
        wait.seconds >= 55,
        "until A's open-until (60 s), not a fresh short period: {wait:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_restart_with_aof_keeps_outages_pauses_and_disabled_keys() {
    let mut redis = Redis::start_with(&[
        "--save",
        "",
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
    ]);
    let config = "[targets.o]\nbreaker = { failure_threshold = 1, open_duration = \"10m\" }\n[targets.p]\n[targets.k]\nkeys = [\"k1\", \"k2\"]\n";
    let servers = replicas(config, &redis.url(), 2).await;
    let mut c = clients(&servers).await;
    let p = c[0].can_proceed(can("o")).await.expect("ok").into_inner();
    c[0].record_outcome(outcome("o", &p.permit, 503))
        .await
        .expect("ok");
    let p = c[0].can_proceed(can("p")).await.expect("ok").into_inner();
    let mut pause = outcome("p", &p.permit, 429);
    pause.headers.insert("retry-after".into(), "600".into());
    c[0].record_outcome(pause).await.expect("ok");
    let k1 = common::permit(&mut c[0], "k", Some("k1")).await;
    c[0].record_outcome(outcome("k", &k1, 401))
        .await
        .expect("ok");
    let mut d = deferred(&servers[0]).await;
    for i in 0..2 {
        d.defer(defer_req("p", format!("saved {i}").as_bytes(), ""))
            .await
            .expect("defer");
    }
    redis.restart();
    for s in &servers {
        s.wait_cluster_ready().await;
    }
    let o = status(&servers[1], "o").await;
    assert_eq!(o.state(), proto::BreakerState::Open, "the outage survived");
    let p = status(&servers[1], "p").await;
    assert!(p.key_slots[0].paused_until.is_some(), "the pause survived");
    let k = status(&servers[1], "k").await;
    assert!(
        k.key_slots.iter().any(|s| s.name == "k1" && s.disabled),
        "k1 is still disabled"
    );
    let mut d = deferred(&servers[1]).await;
    assert_eq!(
        depth(&mut d, "p").await,
        (2, 0, 0),
        "acknowledged deferrals survived"
    );
}

/// A local three-primary Redis Cluster.
struct RedisCluster {
    nodes: Vec<Redis>,
}

impl RedisCluster {
    fn start() -> RedisCluster {
        let nodes: Vec<Redis> = (0..3)
            .map(|_| {
                Redis::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = std::process::Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        // Wait until every node agrees the cluster is up.
        let deadline = Instant::now() + Duration::from_secs(15);
        while !nodes
            .iter()
            .all(|n| n.cli(&["cluster", "info"]).contains("cluster_state:ok"))
        {
            assert!(Instant::now() < deadline, "the Redis Cluster never came up");
            std::thread::sleep(Duration::from_millis(100));
        }
        RedisCluster { nodes }
    }

    fn config(&self) -> String {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("\"127.0.0.1:{}\"", n.port))
            .collect();
        format!("[cluster]\nredis_cluster_nodes = [{}]\n", nodes.join(", "))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_on_a_redis_cluster() {
    let rc = RedisCluster::start();
    let config = format!("{}{SHARED}", rc.config());
    let mut servers = Vec::new();
    for _ in 0..3 {
        let s = Server::start(&config, &[]);
        s.wait_cluster_ready().await;
        servers.push(s);
    }
    breaker_is_shared(&servers).await;
    probes_are_limited_fleet_wide(&servers).await;
    budget_is_shared(&servers).await;
    // The deferred queue's scripts run there too (one hash tag).
    let mut a = deferred(&servers[0]).await;
    let mut b = deferred(&servers[1]).await;
    let id = a
        .defer(defer_req("m", b"on a cluster", "rk"))
        .await
        .expect("defer")
        .into_inner()
        .id;
    assert!(
        b.defer(defer_req("m", b"on a cluster", "rk"))
            .await
            .expect("defer")
            .into_inner()
            .duplicate
    );
    let it = b
        .claim(claim_req("m", 1, 30_000, 0))
        .await
        .expect("claim")
        .into_inner()
        .items;
    // m's breaker is open (breaker_is_shared): blocked, nothing handed out.
    assert!(it.is_empty());
    let mut admin = servers[2].admin().await;
    admin
        .reset_target(proto::ResetTargetRequest { target: "m".into() })
        .await
        .expect("reset");
    let it = b
        .claim(claim_req("m", 1, 30_000, 0))
        .await
        .expect("claim")
        .into_inner()
        .items
        .remove(0);
    assert_eq!(it.id, id);
    a.ack(proto::AckRequest {
        id,
        lease_token: it.lease_token,
    })
    .await
    .expect("ack");
}

type Deferred = proto::deferred_client::DeferredClient<Channel>;

async fn deferred(s: &Server) -> Deferred {
    proto::deferred_client::DeferredClient::new(s.channel().await)
}

fn defer_req(queue: &str, payload: &[u8], key: &str) -> proto::DeferRequest {
    proto::DeferRequest {
        queue: queue.into(),
        payload: payload.to_vec(),
        idempotency_key: key.into(),
        ..Default::default()
    }
}

fn claim_req(queue: &str, max: u32, lease_ms: u64, wait_ms: u64) -> proto::ClaimRequest {
    proto::ClaimRequest {
        queue: queue.into(),
        max_items: max,
        lease: Some(prost_types::Duration {
            seconds: (lease_ms / 1000) as i64,
            nanos: ((lease_ms % 1000) * 1_000_000) as i32,
        }),
        wait: Some(prost_types::Duration {
            seconds: (wait_ms / 1000) as i64,
            nanos: ((wait_ms % 1000) * 1_000_000) as i32,
        }),
        worker: "w".into(),
        ..Default::default()
    }
}

async fn depth(d: &mut Deferred, queue: &str) -> (u64, u64, u64) {
    let s = d
        .queue_stats(proto::QueueStatsRequest {
            queue: queue.into(),
        })
        .await
        .expect("stats")
        .into_inner();
    s.queues
        .first()
        .map_or((0, 0, 0), |q| (q.depth, q.in_flight, q.dead_letters))
}

/// The queue is shared: Defer on A, Claim on B (admitted, with a permit
/// that settles on C), Ack on C; a retried Defer with the same key on B is
/// a duplicate of A's; a Claim long-polling on B wakes for a Defer on A.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_deferred_queue_is_shared_by_every_replica() {
    let redis = Redis::start();
    let config = "[targets.q]\nrequests_per_minute = 600\n";
    let servers = replicas(config, &redis.url(), 3).await;
    let mut a = deferred(&servers[0]).await;
    let mut b = deferred(&servers[1]).await;
    let mut c = deferred(&servers[2]).await;
    let first = a
        .defer(defer_req("q", b"one", "k1"))
        .await
        .expect("defer")
        .into_inner();
    assert!(!first.duplicate);
    let again = b
        .defer(defer_req("q", b"one", "k1"))
        .await
        .expect("defer")
        .into_inner();
    assert!(again.duplicate, "the same key on another replica");
    assert_eq!(again.id, first.id);
    assert_eq!(depth(&mut c, "q").await, (1, 0, 0));

    let got = b
        .claim(claim_req("q", 10, 30_000, 0))
        .await
        .expect("claim")
        .into_inner();
    assert_eq!(got.items.len(), 1);
    let it = &got.items[0];
    assert_eq!(
        (it.id.as_str(), it.payload.as_slice(), it.attempt),
        (first.id.as_str(), &b"one"[..], 1)
    );
    assert_eq!(it.target, "q");
    // Its permit settles on a third replica.
    let mut r = servers[2].resilience().await;
    let o = r
        .record_outcome(outcome("q", &it.permit, 200))
        .await
        .expect("outcome")
        .into_inner();
    assert!(!o.duplicate);
    assert_eq!(depth(&mut a, "q").await, (0, 1, 0));
    c.ack(proto::AckRequest {
        id: it.id.clone(),
        lease_token: it.lease_token.clone(),
    })
    .await
    .expect("ack on another replica");
    assert_eq!(depth(&mut a, "q").await, (0, 0, 0));
    // Acked: the key is still remembered (idempotency_ttl).
    let late = a
        .defer(defer_req("q", b"one", "k1"))
        .await
        .expect("defer")
        .into_inner();
    assert!(late.duplicate);
    // Acking twice: NOT_FOUND, with a message.
    let e = b
        .ack(proto::AckRequest {
            id: it.id.clone(),
            lease_token: it.lease_token.clone(),
        })
        .await
        .expect_err("acked already");
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");

    // A long poll on B wakes when A defers.
    let mut b2 = b.clone();
    let poll = tokio::spawn(async move {
        let t = Instant::now();
        let r = b2
            .claim(claim_req("q", 1, 30_000, 10_000))
            .await
            .expect("claim")
            .into_inner();
        (r, t.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.defer(defer_req("q", b"two", "")).await.expect("defer");
    let (r, took) = poll.await.expect("task");
    assert_eq!(r.items.len(), 1);
    assert_eq!(r.items[0].payload, b"two");
    assert!(took < Duration::from_secs(2), "woke after {took:?}");
}

/// A replica killed (SIGKILL) while it holds leases: its items come back
/// when the leases run out and another replica hands them out; each is
/// acked once, none lost, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn items_claimed_by_a_killed_replica_are_redelivered() {
    let redis = Redis::start();
    let config = "[targets.q]\n";
    let mut servers = replicas(config, &redis.url(), 2).await;
    let mut a = deferred(&servers[0]).await;
    let mut b = deferred(&servers[1]).await;
    let mut ids = std::collections::BTreeSet::new();
    for i in 0..5 {
        let r = a
            .defer(defer_req("q", format!("p{i}").as_bytes(), &format!("k{i}")))
            .await
            .expect("defer")
            .into_inner();
        ids.insert(r.id);
    }
    let held = b
        .claim(claim_req("q", 3, 1500, 0))
        .await
        .expect("claim")
        .into_inner();
    assert_eq!(held.items.len(), 3);
    servers[1].kill9();
    // A drains everything: two at once, the killed replica's three after their lease.
    let mut acked = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while acked.len() < 5 {
        assert!(Instant::now() < deadline, "only {acked:?} came back");
        let got = a
            .claim(claim_req("q", 10, 30_000, 1000))
            .await
            .expect("claim")
            .into_inner();
        for it in got.items {
            assert!(
                acked.insert(it.id.clone()),
                "{} delivered twice after ack",
                it.id
            );
            if held.items.iter().any(|h| h.id == it.id) {
                assert_eq!(it.attempt, 2, "a redelivery counts as an attempt");
                assert_eq!(it.last_error, "lease expired without Ack or Nack");
            }
            a.ack(proto::AckRequest {
                id: it.id,
                lease_token: it.lease_token,
            })
            .await
            .expect("ack");
        }
    }
    assert_eq!(acked, ids);
    assert_eq!(depth(&mut a, "q").await, (0, 0, 0));
    // The killed replica's old lease tokens are stale now.
    let e = a
        .ack(proto::AckRequest {
            id: held.items[0].id.clone(),
            lease_token: held.items[0].lease_token.clone(),
        })
        .await
        .expect_err("gone");
    assert_eq!(e.code(), tonic::Code::NotFound);
}

/// Nack with a delay, the last attempt to the dead letters, Requeue: on
/// different replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nack_dead_letters_and_requeue_across_replicas() {
    let redis = Redis::start();
    let config = "[targets.q]\n";
    let servers = replicas(config, &redis.url(), 2).await;
    let mut a = deferred(&servers[0]).await;
    let mut b = deferred(&servers[1]).await;
    let mut req = defer_req("q", b"x", "");
    req.max_attempts = 2;
    let id = a.defer(req).await.expect("defer").into_inner().id;
    let it = b
        .claim(claim_req("q", 1, 30_000, 0))
        .await
        .expect("claim")
        .into_inner()
        .items
        .remove(0);
    let n = a
        .nack(proto::NackRequest {
            id: id.clone(),
            lease_token: it.lease_token,
            delay: Some(prost_types::Duration {
                seconds: 0,
                nanos: 300_000_000,
            }),
            reason: "provider said no".into(),
        })
        .await
        .expect("nack")
        .into_inner();
    assert!(!n.dead_lettered);
    let none = b
        .claim(claim_req("q", 1, 30_000, 0))
        .await
        .expect("claim")
        .into_inner();
    assert!(none.items.is_empty(), "not before the Nack's delay");
    let it = b
        .claim(claim_req("q", 1, 30_000, 2000))
        .await
        .expect("claim")
        .into_inner()
        .items
        .remove(0);
    assert_eq!(
        (it.attempt, it.last_error.as_str()),
        (2, "provider said no")
    );
    let n = a
        .nack(proto::NackRequest {
            id: id.clone(),
            lease_token: it.lease_token,
            delay: None,
            reason: "still no".into(),
        })
        .await
        .expect("nack")
        .into_inner();
    assert!(n.dead_lettered);
    assert_eq!(depth(&mut b, "q").await, (0, 0, 1));
    let dl = b
        .list_dead_letters(proto::ListDeadLettersRequest {
            queue: "q".into(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(dl.items.len(), 1);
    assert_eq!(
        (dl.items[0].id.as_str(), dl.items[0].last_error.as_str()),
        (id.as_str(), "still no")
    );
    assert!(dl.items[0].dead_lettered_at.is_some());
    a.requeue(proto::RequeueRequest { id: id.clone() })
        .await
        .expect("requeue");
    let it = b
        .claim(claim_req("q", 1, 30_000, 0))
        .await
        .expect("claim")
        .into_inner()
        .items
        .remove(0);
    assert_eq!((it.id.as_str(), it.attempt), (id.as_str(), 1));
}

/// Redis frozen: a Defer is still acknowledged, spooled durably on the
/// replica that took it (which survives a kill -9 with it), and replayed into
/// Redis when Redis is back, where another replica hands it out; a retried
/// Defer with the same idempotency key is a duplicate, not a second item.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deferrals_while_redis_is_down_are_spooled_and_replayed() {
    let redis = Redis::start();
    let config = "[targets.q]\n[cluster]\nredis_timeout = \"50ms\"\n";
    let mut a = Server::start_replica(config, &redis.url(), &[]).await;
    let b = Server::start_replica(config, &redis.url(), &[]).await;
    redis.signal("STOP");
    let mut d = deferred(&a).await;
    let mut spooled = Vec::new();
    for (payload, key) in [(&b"keyed"[..], "s1"), (&b"unkeyed"[..], "")] {
        let started = Instant::now();
        let r = d
            .defer(defer_req("q", payload, key))
            .await
            .expect("acknowledged while Redis is frozen")
            .into_inner();
        assert!(started.elapsed() < Duration::from_secs(2));
        spooled.push(r.id);
    }
    // The replica dies before Redis is back; its spool is on disk.
    a.kill9();
    let dir = a.into_dir();
    redis.signal("CONT");
    let a = Server::start_in(dir, config, &["--redis", &redis.url()]);
    a.wait_cluster_ready().await;
    let mut db = deferred(&b).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while depth(&mut db, "q").await.0 < 2 {
        assert!(
            Instant::now() < deadline,
            "spooled deferrals never reached Redis"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let again = db
        .defer(defer_req("q", b"keyed", "s1"))
        .await
        .expect("defer")
        .into_inner();
    assert!(again.duplicate, "the key came along with the spooled item");
    let got = db
        .claim(claim_req("q", 10, 30_000, 0))
        .await
        .expect("claim")
        .into_inner();
    let mut payloads: Vec<Vec<u8>> = got.items.iter().map(|i| i.payload.clone()).collect();
    payloads.sort();
    assert_eq!(payloads, vec![b"keyed".to_vec(), b"unkeyed".to_vec()]);
    // Nothing is replayed twice.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(depth(&mut db, "q").await, (0, 2, 0));
    drop(a);
}

/// `[cluster]` without a Redis address is completed by `--redis`; with
/// neither, serve refuses to start and says what is missing.
#[test]
fn cluster_mode_needs_a_redis_address_from_the_config_or_the_flag() {
    let dir = common::TempDir::new("noredis");
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "[cluster]\nkey_prefix = \"x\"\n").expect("write");
    let out = std::process::Command::new(common::binary())
        .args(["serve", "--config"])
        .arg(&path)
        .args(["--listen", "127.0.0.1:0", "--ephemeral"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("needs redis_url") && err.contains("--redis"),
        "{err}"
    );
}

async fn cluster_view(s: &Server) -> proto::ClusterStatus {
    s.admin()
        .await
        .get_cluster(proto::GetClusterRequest {})
        .await
        .expect("get_cluster")
        .into_inner()
}

async fn reload(s: &Server) -> Result<proto::ReloadConfigResponse, tonic::Status> {
    s.admin()
        .await
        .reload_config(proto::ReloadConfigRequest {
            reason: "test".into(),
        })
        .await
        .map(|r| r.into_inner())
}

/// Waits until `s` sees every live replica with one digest (`same`) or not.
async fn wait_digests(s: &Server, same: bool) -> proto::ClusterStatus {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let c = cluster_view(s).await;
        let distinct: std::collections::HashSet<_> =
            c.replicas.iter().map(|r| r.config_digest.clone()).collect();
        if c.replicas.len() == 2 && (distinct.len() == 1) == same {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "digests never became same={same}: {c:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_replica_reloads_on_its_own_and_the_digest_check_shows_who_differs() {
    let redis = Redis::start();
    let config = "[budgets.org]\nrequests_per_minute = 600\n[targets.h]\nbreaker = { failure_threshold = 2, open_duration = \"10m\", jitter = 0.0 }\n[targets.g]\nbudgets = [\"org\"]\n";
    let servers = replicas(config, &redis.url(), 2).await;
    let mut cs = clients(&servers).await;
    for _ in 0..2 {
        let p = common::permit(&mut cs[0], "h", None).await;
        cs[0]
            .record_outcome(outcome("h", &p, 503))
            .await
            .expect("ok");
    }
    assert_eq!(
        status(&servers[1], "h").await.state(),
        proto::BreakerState::Open
    );
    wait_digests(&servers[1], true).await;

    // Replica 0 gets a new file: its settings change, the shared state stays.
    let edited = config
        .replace("failure_threshold = 2", "failure_threshold = 4")
        .replace("requests_per_minute = 600", "requests_per_minute = 300");
    std::fs::write(&servers[0].config_path, &edited).expect("write");
    let r = reload(&servers[0]).await.expect("reload");
    assert_eq!(r.changed, vec!["g", "h"]);
    let h = status(&servers[0], "h").await;
    assert_eq!(h.state(), proto::BreakerState::Open, "still open in Redis");
    assert_eq!(
        h.settings
            .and_then(|s| s.breaker)
            .map(|b| b.failure_threshold),
        Some(4)
    );
    let c = wait_digests(&servers[1], false).await;
    assert!(
        c.replicas.iter().any(|x| x.config_digest == r.digest),
        "{c:?}"
    );
    // The other replica reloads the same file: one digest again.
    std::fs::write(&servers[1].config_path, &edited).expect("write");
    reload(&servers[1]).await.expect("reload");
    wait_digests(&servers[0], true).await;

    // Moving a target into a budget group would move its state between
    // Redis keys: refused, nothing changes.
    std::fs::write(
        &servers[0].config_path,
        edited.replace("[targets.h]\n", "[targets.h]\nbudgets = [\"org\"]\n"),
    )
    .expect("write");
    let err = reload(&servers[0]).await.expect_err("refused");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("restarted"), "{}", err.message());
    assert_eq!(cluster_view(&servers[0]).await.config_digest, r.digest);
}

/// TLS to Redis (`rediss://`, for managed Redis that only speaks TLS): Redis
/// serves TLS with a certificate from a private CA and demands client
/// certificates (`tls-auth-clients yes`). Replicas given the CA
/// (`redis_ca`) and a client certificate share one breaker over TLS; a
/// replica without a client certificate is turned away by Redis, and one
/// that does not trust the private CA refuses Redis's certificate: both
/// still serve, degraded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_state_over_tls_to_redis() {
    let ca = common::new_ca("redis test ca");
    let certs = common::TempDir::new("redis-tls");
    let d = certs.path().display().to_string();
    let (cert, key) = common::leaf(&ca, "redis", &["127.0.0.1"]);
    let (client_cert, client_key) = common::leaf(&ca, "backstop-replica", &["backstop-replica"]);
    for (name, pem) in [
        ("ca.pem", &ca.pem),
        ("redis.pem", &cert),
        ("redis.key", &key),
        ("client.pem", &client_cert),
        ("client.key", &client_key),
    ] {
        std::fs::write(certs.path().join(name), pem).expect("write");
    }
    let tls_port = common::free_port().to_string();
    let (rc, rk, rca) = (
        format!("{d}/redis.pem"),
        format!("{d}/redis.key"),
        format!("{d}/ca.pem"),
    );
    let _redis = Redis::start_with(&[
        "--save",
        "",
        "--appendonly",
        "no",
        "--tls-port",
        &tls_port,
        "--tls-cert-file",
        &rc,
        "--tls-key-file",
        &rk,
        "--tls-ca-cert-file",
        &rca,
        "--tls-auth-clients",
        "yes",
    ]);
    let url = format!("rediss://127.0.0.1:{tls_port}/0");
    let config = format!(
        "[cluster]\nredis_ca = \"{d}/ca.pem\"\nredis_client_cert = \"{d}/client.pem\"\nredis_client_key = \"{d}/client.key\"\n"
    );
    let servers = replicas(&config, &url, 2).await;
    breaker_is_shared(&servers).await;
    assert!(cluster_view(&servers[0]).await.redis_reachable);

    let anonymous = Server::start(
        &format!("[cluster]\nredis_ca = \"{d}/ca.pem\"\n"),
        &["--redis", &url],
    );
    let untrusting = Server::start("[cluster]\n", &["--redis", &url]);
    // Give both time to try (a starting replica waits up to 2 s for Redis).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for (who, s) in [
        ("no client certificate", &anonymous),
        ("no CA", &untrusting),
    ] {
        let c = cluster_view(s).await;
        assert!(!c.redis_reachable && c.degraded, "{who}: {c:?}");
        let r = s
            .resilience()
            .await
            .can_proceed(can("m"))
            .await
            .expect("serves without Redis")
            .into_inner();
        assert!(r.degraded, "{who}: {r:?}");
    }
}
