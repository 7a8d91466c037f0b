//! `backstop-bench`: Backstop's load generator.
//!
//! It starts (or is pointed at) a Backstop server and a bare baseline server
//! (tonic + the same messages, no decisions) as separate processes, drives
//! them alternately with the same load shape (A B A B ...), and reports
//! requests/s, latency quantiles and Backstop / baseline ratios. Numbers from
//! a shared, noisy machine only mean something next to a baseline taken in
//! the same run, so that is all it prints.
//!
//! ```text
//! backstop-bench --workload can-proceed --in-flight 16,64
//! backstop-bench --workload batch --batch-size 100
//! backstop-bench --workload can-proceed --targets 10000 --peer redis-lua
//! backstop-bench --fill 1000000            # memory per resident target
//! backstop-bench --cluster 1 --in-flight 64 # + one replica on a Redis, same run
//! backstop-bench soak --duration 10m --kill-every 15s   # chaos soak (see soak.rs)
//! ```

#[path = "../shared/backstop_bin.rs"]
mod backstop_bin;
mod baseline;
use backstop_bin::backstop_bin;
mod load;
mod redis_peer;
mod soak;
mod soak_check;
mod stream;

use clap::Parser;
use load::{RunResult, Shape, Workload};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "backstop-bench",
    version,
    about = "Load generator for Backstop, with a same-run baseline"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Subcommand)]
enum Sub {
    /// Serve the bare baseline (used internally; runs until killed).
    BaselineServer {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
    },
    /// The chaos soak: workload + kill -9 schedule + invariant checker (exit 1 on any violation).
    Soak(soak::SoakArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    #[arg(long, value_enum, default_value = "can-proceed")]
    workload: Workload,
    /// Distinct targets (1 = one hot target; more are drawn Zipf-like).
    #[arg(long, default_value_t = 1)]
    targets: usize,
    /// Zipf exponent for target popularity.
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
    /// gRPC connections (HTTP/2 channels).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Requests in flight; a comma list runs each load shape in turn.
    #[arg(long, default_value = "16,64", value_delimiter = ',')]
    in_flight: Vec<usize>,
    /// Measured time per round and system.
    #[arg(long, default_value = "5s", value_parser = parse_dur)]
    duration: Duration,
    #[arg(long, default_value = "1s", value_parser = parse_dur)]
    warmup: Duration,
    /// A B rounds per load shape.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Items per CanProceedBatch (workload batch).
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// Drive an already running Backstop at this address instead of starting one.
    #[arg(long)]
    server: Option<String>,
    /// The backstop binary to start (default: next to this one).
    #[arg(long)]
    backstop_bin: Option<PathBuf>,
    /// Skip the baseline (absolute numbers only: not a result on its own).
    #[arg(long)]
    no_baseline: bool,
    /// Also run the can-proceed workload against a peer (redis-lua: redis-server + a token-bucket script).
    #[arg(long)]
    peer: Option<Peer>,
    /// Also start a redis-server and this many replicas in cluster mode on
    /// it, drive them (connections spread over the replicas) in the same
    /// rounds, and count Redis commands per decision from INFO commandstats.
    #[arg(long)]
    cluster: Option<usize>,
    /// Instead of a load run: create this many distinct targets and report resident memory per target.
    #[arg(long)]
    fill: Option<usize>,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Peer {
    RedisLua,
}

fn parse_dur(s: &str) -> Result<Duration, String> {
    backstop::domain::duration::parse_duration(s).map_err(|e| e.to_string())
}

/// A child process killed on drop.
struct Proc {
    child: Child,
    addr: String,
    _dir: Option<TempDir>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(tag: &str) -> Result<TempDir, String> {
    let p = std::env::temp_dir().join(format!("backstop-bench-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).map_err(|e| format!("cannot create {}: {e}", p.display()))?;
    Ok(TempDir(p))
}

/// Spawns `cmd` and waits for its `... listening grpc=ADDR` line.
fn spawn_listening(mut cmd: Command, what: &str, dir: Option<TempDir>) -> Result<Proc, String> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start the {what}: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("listening") {
                let _ = tx.send(line);
            }
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .map_err(|_| format!("the {what} did not start within 30 s"))?;
    let addr = line
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("grpc="))
        .ok_or_else(|| format!("unexpected line from the {what}: {line}"))?
        .to_string();
    Ok(Proc {
        child,
        addr,
        _dir: dir,
    })
}

fn start_backstop(args: &RunArgs, max_targets: usize) -> Result<Proc, String> {
    start_backstop_with(args, max_targets, "server", &[])
}

fn start_backstop_with(
    args: &RunArgs,
    max_targets: usize,
    tag: &str,
    extra: &[&str],
) -> Result<Proc, String> {
    let dir = temp_dir(tag)?;
    let config = dir.0.join("bench.toml");
    std::fs::write(&config, format!("[server]\nmax_targets = {max_targets}\n"))
        .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
    let mut cmd = Command::new(backstop_bin(args.backstop_bin.as_ref())?);
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--http",
        "off",
        "--config",
    ])
    .arg(&config)
    .arg("--data-dir")
    .arg(dir.0.join("data"))
    .args(extra);
    if std::env::var_os("RUST_LOG").is_none() {
        // Quiet startup logs, but keep per-RPC spans on as in production (info).
        cmd.env("RUST_LOG", "warn,backstop::grpc=info");
    }
    spawn_listening(cmd, "backstop server", Some(dir))
}

fn start_baseline() -> Result<Proc, String> {
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(me);
    cmd.args(["baseline-server", "--listen", "127.0.0.1:0"]);
    spawn_listening(cmd, "baseline server", None)
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

fn start_redis() -> Result<Proc, String> {
    let port = free_port()?;
    let mut child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| {
            format!("cannot start redis-server ({e}); install it (apt-get install redis-server) or run scripts/bench.sh, which does")
        })?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            return Err("redis-server did not start listening within 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Proc {
        child,
        addr: format!("redis://127.0.0.1:{port}/"),
        _dir: None,
    })
}

/// Commands Redis executed, by name, from `INFO commandstats`.
async fn command_calls(url: &str) -> Result<std::collections::HashMap<String, (u64, u64)>, String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut c)
        .await
        .map_err(|e| e.to_string())?;
    Ok(info
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls: u64 = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            let usec: u64 = rest
                .split(',')
                .find_map(|kv| kv.strip_prefix("usec="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            Some((name.to_string(), (calls, usec)))
        })
        .collect())
}

/// Commands a replica sends that are not decisions: heartbeats and the
/// replica list (SET, GET, SADD, SREM, SMEMBERS, TIME), the stream reader
/// (XREAD, XREVRANGE), probes (PING, ROLE), flushing refusal counts
/// (HINCRBY), connection setup and this tool's own INFO.
const NOT_DECISIONS: &[&str] = &[
    "set",
    "get",
    "sadd",
    "srem",
    "smembers",
    "time",
    "xread",
    "xrevrange",
    "ping",
    "role",
    "hincrby",
    "info",
    "client|setinfo",
    "client|setname",
    "hello",
    "command",
    "select",
];

/// (decision commands, script calls, Redis CPU µs in scripts) between two
/// INFO snapshots.
fn command_delta(
    before: &std::collections::HashMap<String, (u64, u64)>,
    after: &std::collections::HashMap<String, (u64, u64)>,
) -> (u64, u64, u64, String) {
    let mut total = 0;
    let mut scripts = 0;
    let mut usec = 0;
    let mut by: Vec<(String, u64)> = Vec::new();
    for (name, &(n, us)) in after {
        let (n0, us0) = before.get(name).copied().unwrap_or((0, 0));
        let d = n.saturating_sub(n0);
        if d == 0 || NOT_DECISIONS.contains(&name.as_str()) {
            continue;
        }
        total += d;
        if name == "evalsha" || name == "eval" {
            scripts += d;
            usec += us.saturating_sub(us0);
        }
        by.push((name.clone(), d));
    }
    by.sort_by_key(|b| std::cmp::Reverse(b.1));
    let detail = by
        .iter()
        .map(|(n, d)| format!("{n}={d}"))
        .collect::<Vec<_>>()
        .join(" ");
    (total, scripts, usec, detail)
}

fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// One line of the report.
struct Row {
    shape: String,
    system: &'static str,
    result: RunResult,
}

fn print_row(r: &Row) {
    let rate = if r.result.decisions != r.result.requests {
        format!(
            "{:>10.0} req/s {:>11.0} decisions/s",
            r.result.rps(),
            r.result.dps()
        )
    } else {
        format!("{:>10.0} req/s", r.result.rps())
    };
    println!(
        "{:<34} {:<9} {rate}  p50 {:>7.1}µs  p90 {:>7.1}µs  p99 {:>7.1}µs  p999 {:>8.1}µs  errors {}{}",
        r.shape,
        r.system,
        r.result.q_us(0.5),
        r.result.q_us(0.9),
        r.result.q_us(0.99),
        r.result.q_us(0.999),
        r.result.errors,
        if r.result.error_kinds.is_empty() {
            String::new()
        } else {
            format!(" {:?}", r.result.error_kinds)
        },
    );
}

fn row_json(r: &Row) -> serde_json::Value {
    serde_json::json!({
        "shape": r.shape,
        "system": r.system,
        "requests": r.result.requests,
        "decisions": r.result.decisions,
        "errors": r.result.errors,
        "seconds": r.result.elapsed.as_secs_f64(),
        "rps": r.result.rps(),
        "decisions_per_s": r.result.dps(),
        "p50_us": r.result.q_us(0.5),
        "p90_us": r.result.q_us(0.9),
        "p99_us": r.result.q_us(0.99),
        "p999_us": r.result.q_us(0.999),
    })
}

async fn fill(args: &RunArgs, n: usize) -> Result<serde_json::Value, String> {
    let server = start_backstop(args, n + 16)?;
    let pid = server.child.id();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_bytes(pid).ok_or("cannot read the server's RSS (/proc)")?;
    let channels = load::connect(&server.addr, 4).await?;
    let started = std::time::Instant::now();
    let per_batch = 1000;
    let batches = n.div_ceil(per_batch);
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (i, ch) in channels.into_iter().enumerate() {
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = backstop::proto::resilience_client::ResilienceClient::new(ch);
            let mut errors = 0u64;
            loop {
                let b = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if b >= batches {
                    break;
                }
                let items = (b * per_batch..((b + 1) * per_batch).min(n))
                    .map(|t| backstop::proto::CanProceedRequest {
                        target: format!("fill/provider-{}/model-{t}", t % 97),
                        ..Default::default()
                    })
                    .collect();
                match c
                    .can_proceed_batch(backstop::proto::CanProceedBatchRequest { items })
                    .await
                {
                    Ok(r) => {
                        errors += r
                            .into_inner()
                            .items
                            .iter()
                            .filter(|i| {
                                matches!(
                                    i.result,
                                    Some(backstop::proto::can_proceed_result::Result::Error(_))
                                )
                            })
                            .count() as u64
                    }
                    Err(_) => errors += per_batch as u64,
                }
            }
            let _ = i;
            errors
        }));
    }
    let mut errors = 0;
    for t in tasks {
        errors += t.await.map_err(|e| e.to_string())?;
    }
    let took = started.elapsed();
    // Let the write-behind flushes of the new targets finish before measuring.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = rss_bytes(pid).ok_or("cannot read the server's RSS (/proc)")?;
    let per = (after.saturating_sub(before)) as f64 / n as f64;
    println!(
        "fill: {n} targets created in {:.1}s ({errors} errors); server RSS {:.1} MiB before, {:.1} MiB after: {per:.0} bytes per target",
        took.as_secs_f64(),
        before as f64 / 1048576.0,
        after as f64 / 1048576.0
    );
    Ok(serde_json::json!({
        "fill_targets": n, "errors": errors, "rss_before": before, "rss_after": after,
        "bytes_per_target": per, "seconds": took.as_secs_f64(),
    }))
}

async fn run(args: RunArgs) -> Result<(), String> {
    if let Some(n) = args.fill {
        let j = fill(&args, n).await?;
        if let Some(path) = &args.json {
            std::fs::write(path, serde_json::to_string_pretty(&j).unwrap_or_default())
                .map_err(|e| e.to_string())?;
        }
        return Ok(());
    }
    let max_targets = (args.targets * 2).max(100_000);
    let owned = match &args.server {
        Some(_) => None,
        None => Some(start_backstop(&args, max_targets)?),
    };
    let backstop_addr = args
        .server
        .clone()
        .or(owned.as_ref().map(|p| p.addr.clone()))
        .unwrap_or_default();
    let baseline = if args.no_baseline {
        None
    } else {
        Some(start_baseline()?)
    };
    let redis = match args.peer {
        Some(Peer::RedisLua) => Some(start_redis()?),
        None => None,
    };
    // Cluster mode: its own redis-server and N replicas on it.
    let (cluster_redis, replicas) = match args.cluster {
        Some(n) if n > 0 => {
            let r = start_redis()?;
            let mut reps = Vec::new();
            for i in 0..n {
                reps.push(start_backstop_with(
                    &args,
                    max_targets,
                    &format!("replica{i}"),
                    &["--redis", &r.addr],
                )?);
            }
            // Let every replica connect and see the others' heartbeats.
            tokio::time::sleep(Duration::from_secs(2)).await;
            (Some(r), reps)
        }
        _ => (None, Vec::new()),
    };
    let cluster_addr = replicas
        .iter()
        .map(|p| p.addr.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let cluster_name: &'static str =
        Box::leak(format!("cluster-{}", replicas.len()).into_boxed_str());
    println!(
        "backstop-bench: workload {}, {} target(s), {} connection(s), {} round(s) of {:?} (+{:?} warm-up) per system",
        args.workload.name(),
        args.targets,
        args.connections,
        args.rounds,
        args.duration,
        args.warmup
    );
    let mut rows: Vec<Row> = Vec::new();
    let mut summary = Vec::new();
    for &in_flight in &args.in_flight {
        let shape = Shape {
            workload: args.workload,
            targets: args.targets,
            zipf: args.zipf,
            connections: args.connections,
            in_flight,
            duration: args.duration,
            warmup: args.warmup,
            batch_size: args.batch_size,
        };
        let label = format!(
            "{} targets={} in_flight={}",
            args.workload.name(),
            args.targets,
            in_flight
        );
        let mut totals: Vec<(&'static str, Option<RunResult>)> = vec![
            ("baseline", None),
            ("backstop", None),
            ("redis-lua", None),
            (cluster_name, None),
        ];
        let (mut cmds, mut script_calls, mut warm_total) = (0u64, 0u64, 0u64);
        let mut cmd_detail = String::new();
        for round in 0..args.rounds.max(1) {
            let mut round_rows = Vec::new();
            if let Some(b) = &baseline {
                round_rows.push(("baseline", load::run(&b.addr, &shape).await?));
            }
            round_rows.push(("backstop", load::run(&backstop_addr, &shape).await?));
            if let Some(r) = &redis {
                round_rows.push(("redis-lua", redis_peer::run(&r.addr, &shape).await?));
            }
            if let Some(r) = &cluster_redis {
                // Commands counted over the whole run (warm-up included,
                // so the decisions are counted over the same span).
                let before = command_calls(&r.addr).await?;
                let (result, warm) = load::run_counting(&cluster_addr, &shape).await?;
                let after = command_calls(&r.addr).await?;
                let (total, scripts, usec, detail) = command_delta(&before, &after);
                let decisions = result.decisions + warm;
                println!(
                    "     redis CPU in scripts per decision: {:.1} µs",
                    usec as f64 / decisions.max(1) as f64
                );
                println!(
                    "     redis round trips (scripts) per decision: {}; commands Redis executed per decision (inside scripts included): {:.3} ({detail})",
                    format_args!("{:.3}", scripts as f64 / decisions.max(1) as f64),
                    total as f64 / decisions.max(1) as f64,
                );
                cmds += total;
                script_calls += scripts;
                cmd_detail = detail;
                round_rows.push((cluster_name, result));
                warm_total += warm;
            }
            for (system, result) in round_rows {
                let row = Row {
                    shape: format!("{label} #{}", round + 1),
                    system,
                    result,
                };
                print_row(&row);
                let slot = totals
                    .iter_mut()
                    .find(|(s, _)| *s == system)
                    .map(|(_, t)| t);
                if let Some(t) = slot {
                    match t {
                        Some(acc) => acc.merge(&row.result),
                        None => *t = Some(row.result.clone()),
                    }
                }
                rows.push(row);
            }
        }
        let get = |name: &str| {
            totals
                .iter()
                .find(|(s, _)| *s == name)
                .and_then(|(_, t)| t.clone())
        };
        let (base, ours, peer) = (get("baseline"), get("backstop"), get("redis-lua"));
        let clus = get(cluster_name);
        println!("---- {label}: all rounds");
        for (name, r) in [
            ("baseline", &base),
            ("backstop", &ours),
            ("redis-lua", &peer),
            (cluster_name, &clus),
        ] {
            if let Some(r) = r {
                print_row(&Row {
                    shape: label.clone(),
                    system: name,
                    result: r.clone(),
                });
            }
        }
        let mut s = serde_json::json!({ "shape": label });
        if let (Some(b), Some(o)) = (&base, &ours) {
            let tput = o.dps() / b.dps();
            let p99 = o.q_us(0.99) / b.q_us(0.99);
            println!(
                "     backstop / baseline: throughput {tput:.3}×, p50 {:.2}×, p99 {p99:.2}×",
                o.q_us(0.5) / b.q_us(0.5)
            );
            s["backstop_over_baseline_throughput"] = serde_json::json!(tput);
            s["backstop_over_baseline_p99"] = serde_json::json!(p99);
        }
        if let (Some(p), Some(o)) = (&peer, &ours) {
            let tput = o.dps() / p.dps();
            println!(
                "     backstop / redis-lua: throughput {tput:.2}×, p99 {:.2}×",
                o.q_us(0.99) / p.q_us(0.99)
            );
            s["backstop_over_redis_throughput"] = serde_json::json!(tput);
        }
        if let (Some(c), Some(o)) = (&clus, &ours) {
            let tput = c.dps() / o.dps();
            let all = c.decisions + warm_total;
            let per = cmds as f64 / all.max(1) as f64;
            println!(
                "     {cluster_name} / embedded: throughput {tput:.2}×, p50 {:.2}×, p99 {:.2}×; redis round trips per decision {:.3}, commands executed per decision {per:.3} ({cmd_detail})",
                c.q_us(0.5) / o.q_us(0.5),
                c.q_us(0.99) / o.q_us(0.99),
                script_calls as f64 / all.max(1) as f64,
            );
            s["cluster_over_embedded_throughput"] = serde_json::json!(tput);
            s["redis_commands_per_decision"] = serde_json::json!(per);
            s["redis_round_trips_per_decision"] =
                serde_json::json!(script_calls as f64 / all.max(1) as f64);
            s["cluster"] = row_json(&Row {
                shape: label.clone(),
                system: cluster_name,
                result: c.clone(),
            });
        }
        if let Some(o) = &ours {
            s["backstop"] = row_json(&Row {
                shape: label.clone(),
                system: "backstop",
                result: o.clone(),
            });
        }
        if let Some(b) = &base {
            s["baseline"] = row_json(&Row {
                shape: label.clone(),
                system: "baseline",
                result: b.clone(),
            });
        }
        if let Some(p) = &peer {
            s["redis_lua"] = row_json(&Row {
                shape: label.clone(),
                system: "redis-lua",
                result: p.clone(),
            });
        }
        summary.push(s);
    }
    if let Some(path) = &args.json {
        let j = serde_json::json!({
            "rounds": rows.iter().map(row_json).collect::<Vec<_>>(),
            "summary": summary,
        });
        std::fs::write(path, serde_json::to_string_pretty(&j).unwrap_or_default())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Some(Sub::BaselineServer { listen }) => baseline::serve(listen).await,
            Some(Sub::Soak(args)) => soak::run(args).await,
            None => run(cli.run).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("backstop-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
