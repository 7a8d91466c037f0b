//! The deferred queue and restart behaviour, with a manual clock.

use super::clock::ManualClock;
use super::queue::DeferArgs;
use super::store::{self, Op, RedbStore, Store, StoreError};
use super::*;
use crate::domain::breaker::BreakerState;
use std::collections::HashMap;

const T0: Time = Time::from_secs(1_800_000_000);

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn dir(tag: &str) -> std::path::PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let p = std::env::temp_dir().join(format!(
        "backstop-engine-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&p);
    p
}

fn open(toml: &str, data: &std::path::Path, clock: &Arc<ManualClock>) -> (Engine, LoadReport) {
    let config = Arc::new(Config::parse(toml, "t").expect("config"));
    let store: Box<dyn Store> = Box::new(RedbStore::open(data, false).expect("store"));
    Engine::open(config, clock.clone(), store).expect("open")
}

fn ephemeral(toml: &str) -> (Engine, Arc<ManualClock>) {
    let config = Arc::new(Config::parse(toml, "t").expect("config"));
    let clock = Arc::new(ManualClock::new(T0));
    (Engine::new(config, clock.clone()), clock)
}

fn item(queue: &str, n: u8) -> DeferArgs {
    DeferArgs {
        queue: queue.into(),
        payload: vec![n; 10],
        ..Default::default()
    }
}

const FAST: &str = "[defaults.breaker]\nfailure_threshold = 1\nopen_duration = \"10s\"\nsuccess_threshold = 1\n[routes.chat]\ntargets = [\"a\", \"b\"]\n";

#[tokio::test]
async fn claim_waits_for_the_target_and_hands_out_admitted_items() {
    let (e, clock) = ephemeral(FAST);
    e.record_outcome(
        "t",
        OutcomeReport {
            http_status: 503,
            ..Default::default()
        },
    )
    .await
    .expect("ok");
    let id = e.defer(item("t", 1)).await.expect("defer").id;
    // The target is open: nothing is handed out, and the worker is told when to come back.
    let r = e.claim("t", 10, None, None, "w").await.expect("claim");
    assert!(r.items.is_empty());
    assert_eq!(r.blocked, Some((Reason::CircuitOpen, Some(secs(10)))));
    assert_eq!(
        e.queue_stats("t").await.expect("stats")[0].depth,
        1,
        "the item stays queued"
    );
    clock.advance(secs(10));
    let r = e.claim("t", 10, None, None, "w").await.expect("claim");
    assert_eq!(r.items.len(), 1);
    let c = &r.items[0];
    assert_eq!((c.item.id, c.item.attempt, c.target.as_ref()), (id, 1, "t"));
    assert!(
        !c.permit.is_empty(),
        "the item comes admitted (a half-open probe here)"
    );
    // The worker reports the call's success with the permit: the breaker closes.
    e.record_outcome(
        "t",
        OutcomeReport {
            permit: &c.permit,
            http_status: 200,
            ..Default::default()
        },
    )
    .await
    .expect("ok");
    assert_eq!(
        e.get_target("t").await.expect("t").state,
        BreakerState::Closed
    );
    e.ack(&id.to_string(), &c.lease_token).await.expect("ack");
    let s = &e.queue_stats("t").await.expect("stats")[0];
    assert_eq!((s.depth, s.in_flight), (0, 0));
}

#[tokio::test]
async fn route_queues_claim_through_the_route() {
    let (e, _) = ephemeral(FAST);
    e.set_breaker_mode("a", Mode::ForcedOpen, "")
        .await
        .expect("force");
    e.defer(item("chat", 1)).await.expect("defer");
    let r = e.claim("chat", 1, None, None, "w").await.expect("claim");
    assert_eq!(r.items[0].target.as_ref(), "b", "admitted to the fallback");
}

#[tokio::test]
async fn lease_expiry_redelivers_nack_delays_and_max_attempts_dead_letters() {
    let (e, clock) = ephemeral("");
    let id = e
        .defer(DeferArgs {
            max_attempts: 3,
            ..item("q", 1)
        })
        .await
        .expect("defer")
        .id
        .to_string();
    let first = e
        .claim("q", 1, Some(secs(5)), None, "w1")
        .await
        .expect("claim")
        .items
        .remove(0);
    assert!(
        e.claim("q", 1, None, None, "w2")
            .await
            .expect("claim")
            .items
            .is_empty(),
        "leased"
    );
    clock.advance(secs(5));
    // The lease ran out: redelivered, and the old token is stale.
    let second = e
        .claim("q", 1, Some(secs(5)), None, "w2")
        .await
        .expect("claim")
        .items
        .remove(0);
    assert_eq!(second.item.attempt, 2);
    assert_eq!(second.item.last_error, "lease expired without Ack or Nack");
    let stale = e.ack(&id, &first.lease_token).await;
    assert!(
        matches!(stale, Err(EngineError::FailedPrecondition(_))),
        "{stale:?}"
    );
    // Nack with a delay: not claimable until it passes.
    let (dead, attempt) = e
        .nack(&id, &second.lease_token, secs(30), "provider 500")
        .await
        .expect("nack");
    assert_eq!((dead, attempt), (false, 2));
    assert!(
        e.claim("q", 1, None, None, "w")
            .await
            .expect("claim")
            .items
            .is_empty()
    );
    clock.advance(secs(30));
    let third = e
        .claim("q", 1, None, None, "w")
        .await
        .expect("claim")
        .items
        .remove(0);
    assert_eq!(
        (third.item.attempt, third.item.last_error.as_str()),
        (3, "provider 500")
    );
    let (dead, _) = e
        .nack(&id, &third.lease_token, Duration::ZERO, "still broken")
        .await
        .expect("nack");
    assert!(dead, "third of three attempts: dead-lettered");
    let (dl, _) = e.list_dead_letters("q", 10, "").await.expect("list");
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0].last_error, "still broken");
    assert_eq!(e.queue_stats("q").await.expect("stats")[0].dead_letters, 1);
    // Requeue brings it back with fresh attempts.
    e.requeue(&id).await.expect("requeue");
    let again = e
        .claim("q", 1, None, None, "w")
        .await
        .expect("claim")
        .items
        .remove(0);
    assert_eq!(again.item.attempt, 1);
    assert!(matches!(
        e.requeue(&id).await,
        Err(EngineError::NotFound(_))
    ));
}

#[tokio::test]
async fn depth_size_and_input_limits() {
    let (e, _) = ephemeral("[queue]\nmax_depth = 2\nmax_payload_bytes = 100\n");
    e.defer(item("q", 1)).await.expect("1");
    e.defer(item("q", 2)).await.expect("2");
    let full = e.defer(item("q", 3)).await;
    assert!(matches!(full, Err(EngineError::ResourceExhausted(m)) if m.contains("max_depth = 2")));
    e.defer(item("other", 1))
        .await
        .expect("other queues are separate");
    let big = e
        .defer(DeferArgs {
            payload: vec![0; 101],
            ..item("x", 0)
        })
        .await;
    assert!(matches!(big, Err(EngineError::InvalidArgument(m)) if m.contains("max_payload_bytes")));
    assert!(matches!(
        e.defer(item("", 0)).await,
        Err(EngineError::InvalidArgument(_))
    ));
    assert!(matches!(
        e.ack("nope", "1").await,
        Err(EngineError::InvalidArgument(_))
    ));
    assert!(matches!(
        e.ack("999", "1").await,
        Err(EngineError::NotFound(_))
    ));
    assert!(matches!(
        e.claim("q", 1000, None, None, "").await,
        Err(EngineError::InvalidArgument(_))
    ));
}

#[tokio::test]
async fn idempotency_keys_dedupe_even_after_ack() {
    let (e, _) = ephemeral("");
    let a = DeferArgs {
        idempotency_key: "k1".into(),
        ..item("q", 1)
    };
    let first = e.defer(a.clone()).await.expect("defer");
    let again = e.defer(a.clone()).await.expect("defer");
    assert_eq!((again.id, again.duplicate), (first.id, true));
    let c = e
        .claim("q", 1, None, None, "w")
        .await
        .expect("claim")
        .items
        .remove(0);
    e.ack(&first.id.to_string(), &c.lease_token)
        .await
        .expect("ack");
    let after = e.defer(a).await.expect("defer");
    assert_eq!(
        (after.id, after.duplicate),
        (first.id, true),
        "a retried Defer after processing is still a duplicate"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_wakes_when_work_arrives() {
    let (e, _) = ephemeral("");
    let e = Arc::new(e);
    let waiter = {
        let e = e.clone();
        tokio::spawn(async move { e.claim("q", 1, None, Some(secs(10)), "w").await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = std::time::Instant::now();
    e.defer(item("q", 1)).await.expect("defer");
    let got = waiter.await.expect("join").expect("claim");
    assert_eq!(got.items.len(), 1);
    assert!(started.elapsed() < secs(2), "woken, not timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_breakers_pauses_disabled_keys_and_queued_work() {
    let d = dir("restart");
    let clock = Arc::new(ManualClock::new(T0));
    let cfg = "[defaults.breaker]\nfailure_threshold = 1\nopen_duration = \"60s\"\n[targets.keyed]\nkeys = [\"k1\", \"k2\"]\n[targets.removed]\n";
    let (dead_id, idem_id);
    {
        let (e, _) = open(cfg, &d, &clock);
        e.record_outcome(
            "open",
            OutcomeReport {
                http_status: 503,
                ..Default::default()
            },
        )
        .await
        .expect("ok");
        let k1 = super::tests::permit_for(&e, "keyed", Some("k1")).await;
        e.record_outcome(
            "keyed",
            OutcomeReport {
                permit: &k1,
                http_status: 401,
                key_slot: "k1",
                ..Default::default()
            },
        )
        .await
        .expect("ok");
        let paused = super::tests::permit_for(&e, "paused", None).await;
        e.record_outcome(
            "paused",
            OutcomeReport {
                permit: &paused,
                http_status: 429,
                headers: vec![("retry-after", "120")],
                ..Default::default()
            },
        )
        .await
        .expect("ok");
        e.set_breaker_mode("forced", Mode::ForcedOpen, "incident 42")
            .await
            .expect("force");
        e.record_outcome(
            "removed",
            OutcomeReport {
                http_status: 503,
                ..Default::default()
            },
        )
        .await
        .expect("ok");
        idem_id = e
            .defer(DeferArgs {
                idempotency_key: "k".into(),
                ..item("q", 1)
            })
            .await
            .expect("defer")
            .id;
        let dl = e
            .defer(DeferArgs {
                max_attempts: 1,
                ..item("q", 2)
            })
            .await
            .expect("defer")
            .id;
        let c = e.claim("q", 2, None, None, "w").await.expect("claim");
        let tok = c
            .items
            .iter()
            .find(|i| i.item.id == dl)
            .expect("claimed")
            .lease_token
            .clone();
        e.nack(&dl.to_string(), &tok, Duration::ZERO, "bad")
            .await
            .expect("nack");
        dead_id = dl;
        // Simulate a crash: no graceful flush beyond what was acknowledged.
    }
    clock.advance(secs(30));
    let cfg2 = "[defaults.breaker]\nfailure_threshold = 1\nopen_duration = \"60s\"\n[targets.keyed]\nkeys = [\"k1\", \"k2\"]\n";
    let (e, report) = open(cfg2, &d, &clock);
    assert_eq!(
        report.dropped, 1,
        "a target removed from the config is dropped"
    );
    assert!(matches!(
        e.get_target("removed").await,
        Err(EngineError::NotFound(_))
    ));
    let a = e
        .can_proceed("open", AdmitArgs::default())
        .await
        .expect("ok");
    assert_eq!(
        (a.reason, a.retry_after),
        (Reason::CircuitOpen, Some(secs(30))),
        "same open-until"
    );
    let k = e
        .can_proceed("keyed", AdmitArgs::default())
        .await
        .expect("ok");
    assert_eq!(k.key_slot.as_deref(), Some("k2"), "k1 is still disabled");
    let p = e
        .can_proceed("paused", AdmitArgs::default())
        .await
        .expect("ok");
    assert_eq!(
        (p.reason, p.retry_after),
        (Reason::RateLimited, Some(secs(90)))
    );
    let f = e.get_target("forced").await.expect("forced");
    assert_eq!(
        (f.state, f.forced_reason.as_deref()),
        (BreakerState::ForcedOpen, Some("incident 42"))
    );
    // Queued work: the claimed-but-unacked item is waiting again; the dead letter is still dead.
    let stats = &e.queue_stats("q").await.expect("stats")[0];
    assert_eq!(
        (stats.depth, stats.in_flight, stats.dead_letters),
        (1, 0, 1)
    );
    assert_eq!(
        e.list_dead_letters("q", 10, "").await.expect("dl").0[0].id,
        dead_id
    );
    let dup = e
        .defer(DeferArgs {
            idempotency_key: "k".into(),
            ..item("q", 9)
        })
        .await
        .expect("defer");
    assert_eq!(
        (dup.id, dup.duplicate),
        (idem_id, true),
        "idempotency survives a restart"
    );
    let c = e.claim("q", 5, None, None, "w").await.expect("claim");
    assert_eq!(c.items.len(), 1);
    assert_eq!(c.items[0].item.attempt, 2, "the pre-crash delivery counted");
    // An open period that ran out while down comes back half-open.
    clock.advance(secs(31));
    drop(e);
    let (e, _) = open(cfg2, &d, &clock);
    assert_eq!(
        e.get_target("open").await.expect("open").state,
        BreakerState::HalfOpen
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test]
async fn write_behind_flushes_counters() {
    let d = dir("behind");
    let clock = Arc::new(ManualClock::new(T0));
    {
        let (e, _) = open("", &d, &clock);
        for _ in 0..3 {
            e.can_proceed("t", AdmitArgs::default()).await.expect("ok");
        }
        e.flush_all(true).await.expect("flush");
    }
    let (e, _) = open("", &d, &clock);
    assert_eq!(e.get_target("t").await.expect("t").counters.admitted, 3);
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test]
async fn deliveries_respect_token_estimates_context_windows_and_the_retry_budget() {
    let (e, _) = ephemeral(
        "[targets.small]\ncontext_window = 1000\n[targets.big]\ncontext_window = 200000\ntokens_per_minute = 10000\n[routes.chat]\ntargets = [\"small\", \"big\"]\n[defaults.retry]\nretry_ratio = 0.0\nmin_retries_per_second = 0.1\nretry_window = \"10s\"\n",
    );
    // A target queue that can never fit the request is refused up front.
    let never = e
        .defer(DeferArgs {
            required_context_tokens: 5000,
            ..item("small", 1)
        })
        .await;
    assert!(matches!(never, Err(EngineError::InvalidArgument(m)) if m.contains("context window")));
    // A route queue delivers to the candidate that fits, reserving the tokens.
    let id = e
        .defer(DeferArgs {
            required_context_tokens: 5000,
            estimated_tokens: 6000,
            ..item("chat", 1)
        })
        .await
        .expect("defer")
        .id;
    let c = e
        .claim("chat", 1, None, None, "w")
        .await
        .expect("claim")
        .items
        .remove(0);
    assert_eq!(c.target.as_ref(), "big");
    let v = e.get_target("big").await.expect("big");
    assert_eq!(
        v.slots[0].budgets[0].available, 4000.0,
        "the estimate was reserved"
    );
    // Redeliveries are retries: with a floor of one retry per window, the
    // second redelivery is held back by the fleet retry budget.
    let (dead, _) = e
        .nack(&id.to_string(), &c.lease_token, Duration::ZERO, "500")
        .await
        .expect("nack");
    assert!(!dead);
    e.record_outcome(
        "big",
        OutcomeReport {
            permit: &c.permit,
            http_status: 200,
            input_tokens: 1,
            ..Default::default()
        },
    )
    .await
    .expect("settle");
    let second = e
        .claim("chat", 1, None, None, "w")
        .await
        .expect("claim")
        .items
        .remove(0);
    assert_eq!(second.item.attempt, 2);
    e.nack(&id.to_string(), &second.lease_token, Duration::ZERO, "500")
        .await
        .expect("nack");
    let third = e.claim("chat", 1, None, None, "w").await.expect("claim");
    assert!(third.items.is_empty());
    assert_eq!(
        third.blocked.map(|b| b.0),
        Some(Reason::RetryBudgetExhausted)
    );
}

#[tokio::test]
async fn route_members_exist_before_their_first_call() {
    let (e, _) = ephemeral("[routes.chat]\ntargets = [\"x\", \"y\"]\n");
    assert_eq!(
        e.get_target("y").await.expect("listed in a route").state,
        BreakerState::Closed
    );
}

/// A store whose commits wait for a gate: lets a test hold a write "in flight".
#[derive(Clone, Default)]
struct GatedStore(Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>);

/// An engine over a [`GatedStore`] (closed: writes hang until `open()`).
fn gated(toml: &str) -> (Arc<Engine>, GatedStore, Arc<ManualClock>) {
    let gate = GatedStore::default();
    let config = Arc::new(Config::parse(toml, "t").expect("config"));
    let clock = Arc::new(ManualClock::new(T0));
    // Startup writes (the generated permit key) go through; then the gate closes.
    gate.open();
    let (e, _) = Engine::open(config, clock.clone(), Box::new(gate.clone())).expect("open");
    gate.close();
    (Arc::new(e), gate, clock)
}

impl GatedStore {
    fn close(&self) {
        *self.0.0.lock().expect("lock") = false;
    }

    fn open(&self) {
        let (m, c) = &*self.0;
        *m.lock().expect("lock") = true;
        c.notify_all();
    }
}

impl Store for GatedStore {
    fn load(&self) -> std::result::Result<store::Loaded, StoreError> {
        Ok(Default::default())
    }
    fn commit(&self, ops: &[Op]) -> std::result::Result<(), StoreError> {
        if ops.is_empty() {
            return Ok(());
        }
        let (m, c) = &*self.0;
        let mut open = m.lock().expect("lock");
        while !*open {
            open = c.wait(open).expect("wait");
        }
        Ok(())
    }
    fn describe(&self) -> String {
        "gated".into()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_sees_a_transition_before_it_is_durable() {
    let (e, gate, _) = gated("[defaults.breaker]\nfailure_threshold = 1\n");
    // Agent A's failure opens the breaker; its answer waits for the disk.
    let a = {
        let e = e.clone();
        tokio::spawn(async move {
            e.record_outcome(
                "t",
                OutcomeReport {
                    http_status: 503,
                    ..Default::default()
                },
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Agent B asks meanwhile: it must not be told OPEN before the write is durable.
    let b = {
        let e = e.clone();
        tokio::spawn(async move { e.can_proceed("t", AdmitArgs::default()).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !a.is_finished() && !b.is_finished(),
        "answers wait for the commit"
    );
    assert_eq!(
        e.events().subscribe_since(0).backlog.map(|b| b.len()),
        Some(0),
        "no event yet"
    );
    gate.open();
    let ra = a.await.expect("join").expect("ok");
    let rb = b.await.expect("join").expect("ok");
    assert_eq!(ra.state, BreakerState::Open);
    assert_eq!((rb.allowed, rb.reason), (false, Reason::CircuitOpen));
    let events = e.events().subscribe_since(0).backlog.expect("retained");
    assert!(
        events
            .iter()
            .any(|ev| ev.kind.name() == "breaker_transition"),
        "published after the commit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_abandoned_mid_way_loses_nothing() {
    let (e, gate, _) = gated("");
    gate.open();
    let item_id = e.defer(item("t", 1)).await.expect("defer").id;
    // An operator's override of "t" is being written and the disk hangs:
    // the claim's admission waits for that write (nobody may see "t"'s state
    // before it is durable), the worker's deadline passes, the claim is dropped.
    gate.close();
    let forcing = {
        let e = e.clone();
        tokio::spawn(async move { e.set_breaker_mode("t", Mode::ForcedClosed, "").await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let abandoned =
        tokio::time::timeout(Duration::from_millis(100), e.claim("t", 1, None, None, "w")).await;
    assert!(
        abandoned.is_err(),
        "the claim was stuck behind the write and its caller gave up"
    );
    gate.open();
    forcing.await.expect("join").expect("forced");
    let stats = &e.queue_stats("t").await.expect("stats")[0];
    assert_eq!(
        (stats.depth, stats.in_flight),
        (1, 0),
        "the item is back in the queue"
    );
    let again = e.claim("t", 1, None, None, "w").await.expect("claim");
    assert_eq!(again.items[0].item.id, item_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_item_that_can_never_be_admitted_is_dead_lettered_not_blocking() {
    let d = dir("never");
    let clock = Arc::new(ManualClock::new(T0));
    let big = "[targets.m]\ncontext_window = 200000\n[routes.chat]\ntargets = [\"m\"]\n";
    {
        let (e, _) = open(big, &d, &clock);
        e.defer(DeferArgs {
            required_context_tokens: 100_000,
            ..item("chat", 1)
        })
        .await
        .expect("fits today");
        e.defer(item("chat", 2)).await.expect("small");
    }
    // The operator shrinks the model's window: the first item can never be delivered.
    let small = "[targets.m]\ncontext_window = 8000\n[routes.chat]\ntargets = [\"m\"]\n";
    let (e, _) = open(small, &d, &clock);
    let r = e.claim("chat", 2, None, None, "w").await.expect("claim");
    assert_eq!(
        r.items.len(),
        1,
        "the second item is not blocked behind the first"
    );
    assert_eq!(r.items[0].item.payload, vec![2; 10]);
    let (dead, _) = e.list_dead_letters("chat", 10, "").await.expect("list");
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].last_error.contains("context_too_small"),
        "{}",
        dead[0].last_error
    );
    // And Defer refuses such a request up front.
    let refused = e
        .defer(DeferArgs {
            required_context_tokens: 100_000,
            ..item("chat", 3)
        })
        .await;
    assert!(matches!(refused, Err(EngineError::InvalidArgument(m)) if m.contains("can ever take")));
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test]
async fn queue_bounds_cover_items_queues_and_metadata() {
    let (e, _) = ephemeral("[queue]\nmax_items = 3\nmax_queues = 2\nmax_total_bytes = 3000\n");
    let meta = |n: usize| {
        (0..n)
            .map(|i| (format!("k{i}"), "v".repeat(200)))
            .collect::<HashMap<_, _>>()
    };
    e.defer(item("a", 1)).await.expect("a");
    e.defer(item("b", 1)).await.expect("b");
    let third_queue = e.defer(item("c", 1)).await;
    assert!(
        matches!(third_queue, Err(EngineError::ResourceExhausted(m)) if m.contains("max_queues"))
    );
    // 20 × 200 bytes of metadata and a 10-byte payload: the metadata counts.
    let heavy = e
        .defer(DeferArgs {
            metadata: meta(20),
            ..item("a", 2)
        })
        .await;
    assert!(
        matches!(&heavy, Err(EngineError::ResourceExhausted(m)) if m.contains("max_total_bytes")),
        "{heavy:?}"
    );
    e.defer(item("a", 3)).await.expect("third item");
    let fourth = e.defer(item("a", 4)).await;
    assert!(matches!(fourth, Err(EngineError::ResourceExhausted(m)) if m.contains("max_items")));
}

#[tokio::test]
async fn idempotency_tombstones_expire_and_ids_are_never_reused() {
    let d = dir("tomb");
    let clock = Arc::new(ManualClock::new(T0));
    let cfg = "[queue]\nidempotency_ttl = \"1h\"\n";
    let first_id;
    {
        let (e, _) = open(cfg, &d, &clock);
        first_id = e
            .defer(DeferArgs {
                idempotency_key: "k".into(),
                ..item("q", 1)
            })
            .await
            .expect("defer")
            .id;
        let c = e
            .claim("q", 1, None, None, "w")
            .await
            .expect("claim")
            .items
            .remove(0);
        e.ack(&first_id.to_string(), &c.lease_token)
            .await
            .expect("ack");
        let dup = e
            .defer(DeferArgs {
                idempotency_key: "k".into(),
                ..item("q", 1)
            })
            .await
            .expect("dup");
        assert!(dup.duplicate);
    }
    let (e, _) = open(cfg, &d, &clock);
    let plain = e.defer(item("q", 2)).await.expect("defer").id;
    assert!(
        plain > first_id,
        "ids of acked items are not handed out again"
    );
    clock.advance(Duration::from_secs(3601));
    let fresh = e
        .defer(DeferArgs {
            idempotency_key: "k".into(),
            ..item("q", 1)
        })
        .await
        .expect("defer");
    assert!(
        !fresh.duplicate,
        "the key is forgotten after idempotency_ttl"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_defer_is_answered_only_once_the_first_is_durable() {
    let (e, gate, _) = gated("");
    let args = DeferArgs {
        idempotency_key: "same".into(),
        ..item("q", 1)
    };
    let first = {
        let (e, a) = (e.clone(), args.clone());
        tokio::spawn(async move { e.defer(a).await })
    };
    tokio::time::sleep(Duration::from_millis(30)).await;
    let second = {
        let (e, a) = (e.clone(), args.clone());
        tokio::spawn(async move { e.defer(a).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !second.is_finished(),
        "not told 'saved' before the first write is durable"
    );
    gate.open();
    let a = first.await.expect("join").expect("first");
    let b = second.await.expect("join").expect("second");
    assert_eq!((b.id, b.duplicate), (a.id, true));
}

#[tokio::test]
async fn a_permit_from_before_a_restart_cannot_free_a_new_lease() {
    let d = dir("epoch");
    let clock = Arc::new(ManualClock::new(T0));
    let cfg = "[targets.c]\nmax_concurrency = 1\n";
    let old = {
        let (e, _) = open(cfg, &d, &clock);
        e.can_proceed("c", AdmitArgs::default()).await.expect("ok")
    };
    // The restart takes a moment (permits issued before it are late).
    clock.advance(Duration::from_secs(1));
    let (e, _) = open(cfg, &d, &clock);
    let new = e.can_proceed("c", AdmitArgs::default()).await.expect("ok");
    assert!(new.allowed, "leases do not survive a restart");
    assert_ne!(
        new.permit.expect("permit").id,
        old.permit.expect("permit").id,
        "permit ids are never reused across a restart"
    );
    e.record_outcome(
        "c",
        OutcomeReport {
            permit: &old.token,
            http_status: 200,
            ..Default::default()
        },
    )
    .await
    .expect("the old outcome is still counted");
    let third = e.can_proceed("c", AdmitArgs::default()).await.expect("ok");
    assert_eq!(
        third.reason,
        Reason::ConcurrencyLimit,
        "the new call's slot was not freed by the old permit"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_period_ending_is_not_waited_for() {
    // open -> half-open follows from the durable open-until, so a restart
    // derives it again: the first probe must not wait for the disk.
    let (e, gate, clock) =
        gated("[defaults.breaker]\nfailure_threshold = 1\nopen_duration = \"10s\"\n");
    gate.open();
    e.record_outcome(
        "t",
        OutcomeReport {
            http_status: 503,
            ..Default::default()
        },
    )
    .await
    .expect("opens");
    gate.close();
    clock.advance(secs(10));
    let probe = tokio::time::timeout(
        Duration::from_secs(2),
        e.can_proceed("t", AdmitArgs::default()),
    )
    .await
    .expect("answered without waiting for the store")
    .expect("ok");
    assert_eq!((probe.allowed, probe.state), (true, BreakerState::HalfOpen));
    gate.open();
}

/// A store that fails on demand (a full disk, an I/O error), keeping what
/// was committed while it worked so a restart can be simulated.
#[derive(Clone, Default)]
struct FailingStore {
    failing: Arc<std::sync::atomic::AtomicBool>,
    saved: Arc<std::sync::Mutex<HashMap<String, store::TargetRecord>>>,
}

impl Store for FailingStore {
    fn load(&self) -> std::result::Result<store::Loaded, StoreError> {
        Ok(store::Loaded {
            targets: self
                .saved
                .lock()
                .expect("lock")
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            ..Default::default()
        })
    }
    fn commit(&self, ops: &[Op]) -> std::result::Result<(), StoreError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(StoreError(
                "writing the state store failing.redb: No space left on device (os error 28)"
                    .into(),
            ));
        }
        let mut saved = self.saved.lock().expect("lock");
        for op in ops {
            if let Op::Target(name, Some(rec)) = op {
                saved.insert(name.to_string(), rec.clone());
            }
        }
        Ok(())
    }
    fn describe(&self) -> String {
        "failing.redb".into()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_store_is_never_lied_about_and_recovers() {
    let store = FailingStore::default();
    let config = Arc::new(
        Config::parse(
            "[targets.t]\nbreaker = { failure_threshold = 1, open_duration = \"10m\" }\n[targets.steady]\n",
            "t",
        )
        .expect("config"),
    );
    let clock = Arc::new(ManualClock::new(T0));
    let (e, _) =
        Engine::open(config.clone(), clock.clone(), Box::new(store.clone())).expect("open");
    let mut health = e.store_health().expect("a persisted engine has a store");
    store.failing.store(true, Ordering::SeqCst);

    // A Defer is not acknowledged, names the store and the OS error, and is
    // not left in the queue.
    let err = e.defer(item("q", 1)).await.expect_err("not durable");
    match &err {
        EngineError::Unavailable(m) => {
            assert!(
                m.contains("failing.redb") && m.contains("No space left"),
                "{m}"
            )
        }
        other => panic!("{other:?}"),
    }
    let stats = e.queue_stats("q").await.expect("stats");
    assert!(stats.iter().all(|q| q.depth == 0), "{stats:?}");
    assert!(
        health.borrow_and_update().failing().is_some(),
        "health shows the failure"
    );

    // Decisions that change nothing durable keep flowing.
    let a = e
        .can_proceed("steady", AdmitArgs::default())
        .await
        .expect("admission needs no durability");
    assert!(a.allowed);

    // The failure that opens the breaker is not acknowledged...
    let r = e
        .record_outcome(
            "t",
            OutcomeReport {
                http_status: 503,
                ..Default::default()
            },
        )
        .await;
    assert!(matches!(r, Err(EngineError::Unavailable(_))), "{r:?}");

    // ...and once the store works, the next flush writes it (the target was
    // marked dirty), health recovers, and a restart finds the breaker open.
    store.failing.store(false, Ordering::SeqCst);
    // Until then, nobody reads the breaker that is not on disk.
    let r = e.can_proceed("t", AdmitArgs::default()).await;
    assert!(matches!(r, Err(EngineError::Unavailable(_))), "{r:?}");
    e.flush_dirty()
        .0
        .wait()
        .await
        .expect("flush after recovery");
    tokio::time::timeout(
        Duration::from_secs(5),
        health.wait_for(|m| m.failing().is_none()),
    )
    .await
    .expect("health recovers once the recovery mark commits")
    .expect("writer running");
    let open = e
        .can_proceed("t", AdmitArgs::default())
        .await
        .expect("readable again");
    assert_eq!(open.reason, Reason::CircuitOpen);
    e.defer(item("q", 2)).await.expect("a Defer after recovery");
    drop(e);
    let (again, _) = Engine::open(config, clock, Box::new(store.clone())).expect("reopen");
    assert_eq!(
        again.get_target("t").await.expect("t").state,
        BreakerState::Open,
        "the transition refused on the failing store was written once it recovered"
    );
}

fn requests_left(v: &TargetView) -> f64 {
    v.slots[0]
        .budgets
        .iter()
        .find(|b| b.kind == "requests")
        .map(|b| b.available)
        .expect("requests budget")
}

/// Budget levels are written behind: after a crash the last second of
/// spending is unknown, so budgets restart empty (and refill at their rate),
/// which keeps admissions within burst + rate·t across any number of
/// kill -9s. A graceful stop writes everything and says so: its levels are
/// trusted as they are.
#[tokio::test]
async fn after_a_crash_budgets_restart_empty_after_a_clean_stop_they_carry_over() {
    let cfg = "[targets.b]\nrequests_per_minute = 60\n";
    let data = dir("crash-budget");
    let clock = Arc::new(ManualClock::new(T0));
    {
        let (e, report) = open(cfg, &data, &clock);
        assert!(!report.unclean, "a fresh store");
        for _ in 0..10 {
            assert!(
                e.can_proceed("b", AdmitArgs::default())
                    .await
                    .expect("ok")
                    .allowed
            );
        }
        e.flush_dirty().0.wait().await.expect("written behind");
        // Dropped without flush_all: a crash.
    }
    let (e, report) = open(cfg, &data, &clock);
    assert!(report.unclean);
    let v = e.get_target("b").await.expect("b");
    assert!(
        requests_left(&v) < 1e-9,
        "empty after a crash: {}",
        requests_left(&v)
    );
    assert!(
        !e.can_proceed("b", AdmitArgs::default())
            .await
            .expect("ok")
            .allowed
    );
    clock.advance(secs(5));
    let v = e.get_target("b").await.expect("b");
    assert!(
        (requests_left(&v) - 5.0).abs() < 1e-6,
        "refills at its rate"
    );
    for _ in 0..2 {
        assert!(
            e.can_proceed("b", AdmitArgs::default())
                .await
                .expect("ok")
                .allowed
        );
    }
    e.flush_all(true).await.expect("graceful stop");
    drop(e);
    let (e, report) = open(cfg, &data, &clock);
    assert!(!report.unclean);
    let v = e.get_target("b").await.expect("b");
    assert!(
        (requests_left(&v) - 3.0).abs() < 1e-6,
        "carried over: {}",
        requests_left(&v)
    );
    let _ = std::fs::remove_dir_all(&data);
}

/// After a crash, even a target whose spending never reached the store
/// (no write-behind before the kill) restarts with an empty budget.
#[tokio::test]
async fn after_a_crash_even_unflushed_budgets_restart_empty() {
    let cfg = "[targets.b]\nrequests_per_minute = 60\n";
    let data = dir("crash-unflushed");
    let clock = Arc::new(ManualClock::new(T0));
    {
        let (e, _) = open(cfg, &data, &clock);
        for _ in 0..60 {
            assert!(
                e.can_proceed("b", AdmitArgs::default())
                    .await
                    .expect("ok")
                    .allowed
            );
        }
        // Killed before any write-behind.
    }
    let (e, report) = open(cfg, &data, &clock);
    assert!(report.unclean);
    assert!(
        !e.can_proceed("b", AdmitArgs::default())
            .await
            .expect("ok")
            .allowed
    );
    let _ = std::fs::remove_dir_all(&data);
}

/// A tenant listing every queue's dead letters reads through pages of
/// other tenants' items: its first page holds its item although five of
/// another tenant's come before it (pages of two).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_dead_letters_are_found_through_other_tenants_pages() {
    let d = dir("tenant-dead");
    let clock = Arc::new(ManualClock::new(T0));
    let cfg = |window: u32| {
        format!(
            "[tenants.a]\n[tenants.b]\n[targets.\"a/m\"]\ncontext_window = {window}\n\
             [targets.\"b/m\"]\ncontext_window = {window}\n[routes.\"a/chat\"]\ntargets = [\"a/m\"]\n\
             [routes.\"b/chat\"]\ntargets = [\"b/m\"]\n"
        )
    };
    {
        let (e, _) = open(&cfg(200_000), &d, &clock);
        for (q, n) in [("b/chat", 5), ("a/chat", 1)] {
            for i in 0..n {
                e.defer(DeferArgs {
                    required_context_tokens: 100_000,
                    ..item(q, i)
                })
                .await
                .expect("fits today");
            }
        }
    }
    // Windows shrink: every item can never be delivered and is dead-lettered.
    let (e, _) = open(&cfg(8000), &d, &clock);
    for q in ["b/chat", "a/chat"] {
        let r = e.claim(q, 10, None, None, "w").await.expect("claim");
        assert!(r.items.is_empty());
    }
    let (all, _) = e.list_dead_letters("", 10, "").await.expect("list");
    assert_eq!(all.len(), 6);
    let (mine, next) = e
        .list_dead_letters_within(2, "", &|q| q.starts_with("a/"))
        .await
        .expect("list");
    assert_eq!(mine.len(), 1, "{mine:?}");
    assert_eq!(mine[0].queue, "a/chat");
    let (rest, _) = e
        .list_dead_letters_within(2, &next, &|q| q.starts_with("a/"))
        .await
        .expect("list");
    assert!(rest.is_empty() || next.is_empty());
    let _ = std::fs::remove_dir_all(&d);
}
