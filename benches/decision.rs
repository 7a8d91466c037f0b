//! Micro-benchmarks of the pure decision path, in ns per decision.
//!
//! `cargo bench --bench decision`
//!
//! * domain: the breaker's admit + record, and a GCRA budget check + commit;
//! * engine: a whole CanProceed decision (target lookup, lock, breaker,
//!   budgets, permit, metrics) without the network, on one hot target and on
//!   10,000 targets, single-threaded and contended across threads.

use backstop::config::Config;
use backstop::domain::Time;
use backstop::domain::breaker::{Breaker, BreakerConfig, Effect};
use backstop::domain::budget::{BudgetConfig, BudgetState, Cost, Kind, Lease, Rate};
use backstop::engine::clock::SystemClock;
use backstop::engine::{AdmitArgs, Engine};
use criterion::{Criterion, criterion_group, criterion_main};
use std::future::Future;
use std::hint::black_box;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// The decision path never awaits in ephemeral mode: one poll completes it.
fn now_or_never<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the decision path awaited"),
    }
}

fn engine(toml: &str) -> Arc<Engine> {
    let config = Config::parse(toml, "bench").expect("config");
    Arc::new(Engine::new(Arc::new(config), Arc::new(SystemClock::new())))
}

fn domain(c: &mut Criterion) {
    let cfg = BreakerConfig::default();
    let mut b = Breaker::new(1);
    let mut ev = Vec::new();
    let mut now = Time::from_secs(1_000_000);
    c.bench_function("domain/breaker_admit_record", |bench| {
        bench.iter(|| {
            now = now + Duration::from_nanos(100);
            let p = b.admit(now, &cfg, &mut ev).expect("closed");
            b.record(now, &cfg, Some(p), Effect::Success, &mut ev);
            black_box(&b);
        })
    });
    let mut bc = BudgetConfig::default();
    bc.rates[Kind::Requests.index()] = Some(Rate::per_minute(u64::MAX / 4));
    let mut st = BudgetState::default();
    c.bench_function("domain/gcra_check_commit", |bench| {
        bench.iter(|| {
            now = now + Duration::from_nanos(100);
            let plan = st
                .check(
                    now,
                    &bc,
                    Cost {
                        tokens: 0,
                        ..Cost::default()
                    },
                )
                .expect("room");
            st.commit(&plan, Lease { key: 0, until: now });
            black_box(&st);
        })
    });
}

/// Signing a permit (HMAC-SHA256 over the target and the fields) and
/// verifying one: paid once per admission and once per outcome report.
fn permits(c: &mut Criterion) {
    use backstop::engine::permit::{Permit, PermitKey};
    let key = PermitKey::new(b"0123456789abcdef0123456789abcdef");
    let p = Permit {
        id: 1 << 40,
        generation: 3,
        leased: true,
        reserved_tokens: 2000,
        issued_ms: 1_764_000_000_000,
        expires_ms: 1_764_000_120_000,
        tag: 0xbeef,
        ..Permit::default()
    };
    c.bench_function("permit/sign", |b| {
        b.iter(|| black_box(key.sign(black_box("anthropic/claude-sonnet"), black_box(&p))))
    });
    let s = key.sign("anthropic/claude-sonnet", &p);
    c.bench_function("permit/verify", |b| {
        b.iter(|| black_box(key.verify("anthropic/claude-sonnet", 0xbeef, black_box(&s))))
    });
}

fn engine_single(c: &mut Criterion) {
    let e = engine("");
    c.bench_function("engine/can_proceed_hot_target", |bench| {
        bench.iter(|| {
            black_box(now_or_never(e.can_proceed("bench/hot", AdmitArgs::default())).expect("ok"))
        })
    });
    let budgeted = engine(
        "[targets.\"bench/hot\"]\nrequests_per_minute = 1000000000\ntokens_per_minute = 1000000000000\n",
    );
    c.bench_function("engine/can_proceed_hot_target_with_budgets", |bench| {
        let args = AdmitArgs {
            estimated_tokens: 1000,
            ..Default::default()
        };
        bench.iter(|| black_box(now_or_never(budgeted.can_proceed("bench/hot", args)).expect("ok")))
    });
    let names: Vec<String> = (0..10_000).map(|i| format!("bench/model-{i}")).collect();
    let mut i = 0usize;
    c.bench_function("engine/can_proceed_10k_targets", |bench| {
        bench.iter(|| {
            i = (i + 7919) % names.len();
            black_box(now_or_never(e.can_proceed(&names[i], AdmitArgs::default())).expect("ok"))
        })
    });
}

/// `threads` threads decide on one hot target at once; reports the time per
/// decision per thread (wall time / decisions each thread made).
fn engine_contended(c: &mut Criterion) {
    for threads in [2usize, 4] {
        let e = engine("");
        c.bench_function(
            &format!("engine/can_proceed_hot_target_{threads}_threads"),
            |bench| {
                bench.iter_custom(|iters| {
                    let start = Instant::now();
                    std::thread::scope(|s| {
                        for _ in 0..threads {
                            let e = e.clone();
                            s.spawn(move || {
                                for _ in 0..iters {
                                    black_box(
                                        now_or_never(
                                            e.can_proceed("bench/hot", AdmitArgs::default()),
                                        )
                                        .expect("ok"),
                                    );
                                }
                            });
                        }
                    });
                    start.elapsed()
                })
            },
        );
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = domain, permits, engine_single, engine_contended
}
criterion_main!(benches);
