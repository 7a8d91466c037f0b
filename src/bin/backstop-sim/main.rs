//! `backstop-sim`: the same fleet three ways (issue #17).
//!
//! A fleet of simulated agents runs against a fake provider that follows a
//! scripted timeline (outage, hidden rate limit, revoked key, oversized
//! prompts, slow period) in compressed time, once per mode on the identical
//! seeded request stream:
//!
//! * `per-process`: every agent decides alone (own breaker, retries, fallbacks,
//!   in-memory retry list);
//! * `backstop`: every agent asks one real `backstop` process (Route,
//!   RecordOutcome with the provider's headers, the Deferred queue);
//! * `cluster`: three `backstop` replicas on a real redis-server.
//!
//! The report says what the provider saw (calls wasted on a down model, 429s)
//! and what users got (answered, deferred then answered, failed, lost).
//!
//! ```text
//! backstop-sim sims/outage.toml --out sim-out
//! backstop-sim sims/mixed.toml --modes per-process,backstop --agents 50 --ms-per-sec 20
//! ```

mod agents;
#[path = "../shared/backstop_bin.rs"]
mod backstop_bin;
use backstop_bin::backstop_bin;
mod plot;
mod provider;
mod report;
mod scenario;

use agents::{Fleet, Process};
use backstop::proto::deferred_client::DeferredClient;
use backstop::proto::resilience_client::ResilienceClient;
use clap::Parser;
use provider::{Clock, Provider};
use scenario::Scenario;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "backstop-sim",
    version,
    about = "The same agent fleet, per-process vs through Backstop"
)]
struct Cli {
    /// The scenario file (see sims/).
    scenario: PathBuf,
    /// Modes to run, in order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "per-process,backstop,cluster"
    )]
    modes: Vec<Mode>,
    /// Override the scenario's agent count.
    #[arg(long)]
    agents: Option<usize>,
    /// Real milliseconds per simulated second (compression).
    #[arg(long, default_value_t = 25.0)]
    ms_per_sec: f64,
    /// Output directory for report.json, report.md and the plots.
    #[arg(long, default_value = "sim-out")]
    out: PathBuf,
    /// Skip the PNG plots.
    #[arg(long)]
    no_plots: bool,
    /// The backstop binary (default: next to this one).
    #[arg(long)]
    backstop_bin: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    PerProcess,
    Backstop,
    Cluster,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::PerProcess => "per-process",
            Mode::Backstop => "backstop",
            Mode::Cluster => "cluster",
        }
    }
}

/// A child process killed on drop (with its scratch directory removed).
struct Proc {
    child: Child,
    addr: String,
    /// Backstop's HTTP listener (metrics), when it has one.
    http: Option<String>,
    dir: Option<PathBuf>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn ms(clock: &Clock, sim: f64) -> String {
    format!("{}ms", clock.real(sim).as_millis().max(1))
}

/// The config the `backstop` modes run with: the per-process knobs (threshold
/// 5, 60 s open, no open backoff, one probe, 3 retries with full jitter from
/// 1 s) scaled to real time, and each model's known provider limit as its
/// budget, so the comparison is about sharing, not about different settings.
fn config(s: &Scenario, clock: &Clock) -> String {
    let mut c = format!(
        "[server]\nmax_pause = \"1h\"\n\n[defaults.breaker]\nfailure_threshold = 5\nsuccess_threshold = 1\n\
         open_duration = \"{}\"\nhalf_open_max_probes = 1\nprobe_lease = \"{}\"\nbackoff_multiplier = 1.0\n\
         jitter = 0.0\nwindow = \"{}\"\npersistent_open_duration = \"{}\"\nmax_open_duration = \"{}\"\n\n\
         [defaults.retry]\nmax_retries = 3\nbase_delay = \"{}\"\nmax_delay = \"{}\"\nstrategy = \"full\"\n\
         retry_window = \"{}\"\n\n[queue]\ndefault_max_attempts = 50\n\n",
        ms(clock, 60.0),
        ms(clock, 30.0),
        ms(clock, 60.0),
        ms(clock, 600.0),
        ms(clock, 600.0),
        ms(clock, 1.0),
        ms(clock, 30.0),
        ms(clock, 10.0),
    );
    for (i, m) in s.models.iter().enumerate() {
        c += &format!(
            "[targets.\"{}\"]\ncontext_window = {}\ncost_per_mtok_input = {}\ncost_per_mtok_output = {}\n",
            m.name, m.context_window, m.price_in, m.price_out
        );
        if let Some((rps, burst)) = s.rate_limit(i) {
            // The provider's bucket: `burst` calls, refilled at rps.
            c += &format!(
                "requests = {}\nwindow = \"{}\"\n",
                burst.floor().max(1.0) as u64,
                ms(clock, burst / rps)
            );
        }
        c += "\n";
    }
    let names: Vec<String> = s.models.iter().map(|m| format!("\"{}\"", m.name)).collect();
    c += &format!("[routes.chat]\ntargets = [{}]\n", names.join(", "));
    c
}

fn scratch(tag: &str) -> Result<PathBuf, String> {
    static N: AtomicU64 = AtomicU64::new(0);
    let p = std::env::temp_dir().join(format!(
        "backstop-sim-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).map_err(|e| format!("cannot create {}: {e}", p.display()))?;
    Ok(p)
}

fn start_backstop(bin: &PathBuf, cfg: &str, redis: Option<&str>) -> Result<Proc, String> {
    let dir = scratch("server")?;
    let path = dir.join("backstop.toml");
    std::fs::write(&path, cfg).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(bin);
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--config",
    ])
    .arg(&path)
    .arg("--data-dir")
    .arg(dir.join("data"));
    if let Some(r) = redis {
        cmd.args(["--redis", r]);
    }
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "error");
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("listening") {
                let _ = tx.send(line);
            }
        }
    });
    let mut proc = Proc {
        child,
        addr: String::new(),
        http: None,
        dir: Some(dir),
    };
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .map_err(|_| "backstop did not start within 30 s".to_string())?;
    proc.addr = line
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("grpc="))
        .ok_or_else(|| format!("unexpected line from backstop: {line}"))?
        .to_string();
    proc.http = line
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("http="))
        .map(str::to_string);
    Ok(proc)
}

fn start_redis() -> Result<Proc, String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let mut child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("redis-server is not available ({e}); install it (apt-get install redis-server) to run cluster mode"))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            return Err("redis-server did not listen within 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Proc {
        child,
        addr: format!("redis://127.0.0.1:{port}/"),
        http: None,
        dir: None,
    })
}

/// Waits until a cluster replica reaches Redis (its decisions are shared).
async fn wait_cluster_ready(addr: &str) -> Result<(), String> {
    let mut admin = backstop::proto::admin_client::AdminClient::connect(format!("http://{addr}"))
        .await
        .map_err(|e| e.to_string())?;
    for _ in 0..300 {
        if let Ok(c) = admin
            .get_cluster(backstop::proto::GetClusterRequest {})
            .await
        {
            let c = c.into_inner();
            if c.redis_reachable && !c.degraded {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("replica {addr} never reached Redis"))
}

async fn run_mode(mode: Mode, s: &Scenario, cli: &Cli) -> Result<report::ModeReport, String> {
    // Backstop processes start before the clock does: startup is not simulated time.
    let mut procs = Vec::new();
    let mut clients = Vec::new();
    if mode != Mode::PerProcess {
        let bin = backstop_bin(cli.backstop_bin.as_ref())?;
        let scale = Clock {
            start: std::time::Instant::now(),
            ms_per_sec: cli.ms_per_sec,
        };
        let cfg = config(s, &scale);
        if mode == Mode::Cluster {
            let redis = start_redis()?;
            let url = redis.addr.clone();
            procs.push(redis);
            for _ in 0..3 {
                let p = start_backstop(&bin, &cfg, Some(&url))?;
                wait_cluster_ready(&p.addr).await?;
                procs.push(p);
            }
        } else {
            procs.push(start_backstop(&bin, &cfg, None)?);
        }
        for p in procs.iter().filter(|p| p.dir.is_some()) {
            let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", p.addr))
                .map_err(|e| e.to_string())?
                .connect()
                .await
                .map_err(|e| format!("cannot connect to backstop at {}: {e}", p.addr))?;
            clients.push((ResilienceClient::new(ch.clone()), DeferredClient::new(ch)));
        }
    }
    let clock = Clock {
        start: std::time::Instant::now(),
        ms_per_sec: cli.ms_per_sec,
    };
    let provider = Provider::start(s.clone(), clock).await?;
    let fleet = Arc::new(Fleet {
        scenario: s.clone(),
        clock,
        provider: provider.addr,
        results: Default::default(),
        calls: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        e2e: Default::default(),
    });
    let reqs = scenario::requests(s);
    let mut tasks = Vec::new();
    for (i, (bs, dq)) in clients.iter().enumerate() {
        for w in 0..2 {
            tasks.push(tokio::spawn(agents::drain(
                fleet.clone(),
                bs.clone(),
                dq.clone(),
                format!("drain-{i}-{w}"),
            )));
        }
    }
    let processes: Vec<Arc<Process>> = (0..s.agents)
        .map(|a| Arc::new(Process::new(s.models.len(), s.seed ^ (a as u64 + 1))))
        .collect();
    for r in reqs {
        let wait = r.at - clock.now();
        if wait > 0.0 {
            clock.sleep(wait).await;
        }
        let f = fleet.clone();
        tasks.push(match mode {
            Mode::PerProcess => tokio::spawn(agents::per_process(f, processes[r.agent].clone(), r)),
            _ => {
                let (bs, dq) = clients[r.agent % clients.len()].clone();
                tokio::spawn(agents::via_backstop(f, bs, dq, r))
            }
        });
    }
    let rest = s.duration - clock.now();
    if rest > 0.0 {
        clock.sleep(rest).await;
    }
    fleet.stop.store(true, Ordering::Relaxed);
    // Tasks notice the end at their next step; give in-flight calls a moment.
    let grace = tokio::time::sleep(Duration::from_secs(15));
    tokio::pin!(grace);
    for t in tasks {
        tokio::select! {
            _ = t => {}
            _ = &mut grace => break,
        }
    }
    let results: Vec<_> = fleet
        .results
        .lock()
        .map(|m| m.values().cloned().collect())
        .unwrap_or_default();
    let log: Vec<_> = provider
        .log()
        .into_iter()
        .filter(|c| c.t <= s.duration)
        .collect();
    // What the servers report: backstop_requests_total{route="chat"} summed
    // over the replicas, by result.
    let mut reported: std::collections::BTreeMap<String, f64> = Default::default();
    for p in &procs {
        if let Some(http) = &p.http {
            for (result, n) in requests_total(http, "chat")? {
                *reported.entry(result).or_default() += n;
            }
        }
    }
    drop(procs);
    let e2e: Vec<_> = fleet.e2e.lock().map(|v| v.clone()).unwrap_or_default();
    let mut out = report::build(mode.name(), s, &log, &results);
    if mode != Mode::PerProcess {
        out.end_to_end = Some(report::end_to_end(&e2e, &reported));
    }
    Ok(out)
}

/// `backstop_requests_total{route=<route>,result=...}` from a server's
/// `/metrics`, by result.
fn requests_total(http: &str, route: &str) -> Result<Vec<(String, f64)>, String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(http).map_err(|e| format!("metrics: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {http}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut body = String::new();
    s.read_to_string(&mut body)
        .map_err(|e| format!("metrics: {e}"))?;
    let prefix = format!("backstop_requests_total{{route=\"{route}\",result=\"");
    Ok(body
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (result, value) = rest.split_once("\"} ")?;
            Some((result.to_string(), value.trim().parse().ok()?))
        })
        .collect())
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("backstop-sim: {e}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    let mut s = Scenario::load(&cli.scenario)?;
    if let Some(n) = cli.agents {
        s.agents = n.max(1);
    }
    if !(1.0..=1000.0).contains(&cli.ms_per_sec) {
        return Err("--ms-per-sec must be between 1 and 1000".into());
    }
    std::fs::create_dir_all(&cli.out)
        .map_err(|e| format!("cannot create {}: {e}", cli.out.display()))?;
    let mut reports = Vec::new();
    for &mode in &cli.modes {
        eprintln!(
            "backstop-sim: running {} ({:.0} s real)",
            mode.name(),
            s.duration * cli.ms_per_sec / 1000.0
        );
        let r = match run_mode(mode, &s, &cli).await {
            Ok(r) => r,
            Err(e) if mode == Mode::Cluster => {
                eprintln!("backstop-sim: skipping cluster mode: {e}");
                report::skipped(mode.name(), e)
            }
            Err(e) => return Err(e),
        };
        reports.push(r);
    }
    let md = format!("{}\n{}\n", report::markdown(&s, &reports), plot::LEGEND);
    println!("{md}");
    let json = serde_json::json!({
        "scenario": s.name,
        "agents": s.agents,
        "duration_s": s.duration,
        "ms_per_sec": cli.ms_per_sec,
        "modes": reports,
    });
    let write = |name: &str, body: String| {
        let p = cli.out.join(name);
        std::fs::write(&p, body).map_err(|e| format!("cannot write {}: {e}", p.display()))
    };
    write(
        "report.json",
        serde_json::to_string_pretty(&json).map_err(|e| e.to_string())?,
    )?;
    write("report.md", md)?;
    if !cli.no_plots {
        let ran: Vec<_> = reports.iter().filter(|r| r.skipped.is_none()).collect();
        plot::draw(&cli.out, &s, &ran).map_err(|e| format!("plots: {e}"))?;
    }
    Ok(())
}
