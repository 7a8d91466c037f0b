//! The peer many teams would use instead: Redis evaluating a token-bucket Lua
//! script per decision. Same `can-proceed` load shape, same Zipf targets.

use crate::load::{RunResult, Shape, Zipf, new_histogram};
use redis::aio::MultiplexedConnection;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A standard token bucket: refill by elapsed time, take one token if there is one.
const TOKEN_BUCKET: &str = r#"
local key = KEYS[1]
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local state = redis.call('HMGET', key, 'tokens', 'ts')
local tokens = tonumber(state[1]) or capacity
local ts = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - ts) * rate / 1000)
local allowed = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
end
redis.call('HSET', key, 'tokens', tokens, 'ts', now)
redis.call('PEXPIRE', key, 120000)
return allowed
"#;

pub async fn run(url: &str, shape: &Shape) -> Result<RunResult, String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let mut conns = Vec::new();
    for _ in 0..shape.connections.max(1) {
        conns.push(
            client
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| format!("cannot connect to redis at {url}: {e}"))?,
        );
    }
    let names: Arc<Vec<String>> = Arc::new(
        (0..shape.targets.max(1))
            .map(|i| format!("bench/model-{i}"))
            .collect(),
    );
    let zipf = Arc::new(Zipf::new(names.len(), shape.zipf));
    let script = Arc::new(redis::Script::new(TOKEN_BUCKET));
    if !shape.warmup.is_zero() {
        phase(
            &conns,
            &names,
            &zipf,
            &script,
            shape.in_flight,
            shape.warmup,
        )
        .await;
    }
    Ok(phase(
        &conns,
        &names,
        &zipf,
        &script,
        shape.in_flight,
        shape.duration,
    )
    .await)
}

async fn phase(
    conns: &[MultiplexedConnection],
    names: &Arc<Vec<String>>,
    zipf: &Arc<Zipf>,
    script: &Arc<redis::Script>,
    in_flight: usize,
    duration: Duration,
) -> RunResult {
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for i in 0..in_flight.max(1) {
        let mut conn = conns[i % conns.len()].clone();
        let (names, zipf, script) = (names.clone(), zipf.clone(), script.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ ((i as u64 + 1) * 0x1000_0001);
            let mut hist = new_histogram();
            let (mut requests, mut errors) = (0u64, 0u64);
            while Instant::now() < deadline {
                let key = &names[zipf.sample(&mut rng)];
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                let t0 = Instant::now();
                let r: redis::RedisResult<i64> = script
                    .key(key)
                    .arg(1_000_000)
                    .arg(1_000_000)
                    .arg(now_ms)
                    .invoke_async(&mut conn)
                    .await;
                let _ = hist.record(
                    u64::try_from(t0.elapsed().as_nanos())
                        .unwrap_or(u64::MAX)
                        .max(1),
                );
                requests += 1;
                if r.is_err() {
                    errors += 1;
                }
            }
            (requests, errors, hist)
        }));
    }
    let mut out = RunResult::empty();
    for t in tasks {
        if let Ok((r, e, h)) = t.await {
            out.requests += r;
            out.decisions += r;
            out.errors += e;
            if e > 0 {
                *out.error_kinds.entry("redis".into()).or_default() += e;
            }
            let _ = out.latency.add(&h);
        }
    }
    out.elapsed = started.elapsed();
    out
}
