//! End-to-end with a real Prometheus: it scrapes the real binary, and every
//! query of the shipped Grafana dashboard must parse and return series; a
//! breaker opened during the test must show as an increase of 1.
//!
//! Needs the `prometheus` binary (Debian's package; `scripts/test.sh` installs
//! it), so it is `#[ignore]`d and run explicitly:
//! `cargo test --test e2e_prometheus -- --ignored`.

mod common;

use backstop::proto;
use common::{Server, TempDir};
use std::io::{Read as _, Write as _};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CONFIG: &str = r#"
[targets.m]
breaker = { failure_threshold = 1, open_duration = "10m" }
[targets.budgeted]
requests_per_minute = 600
tokens_per_minute = 100000
[targets.fallback]
[routes.chat]
targets = ["m", "fallback"]
[queue]
default_max_attempts = 1
"#;

struct Prometheus {
    child: Child,
    addr: String,
    _dir: TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn get(addr: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("write");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (code, body)
}

fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn start_prometheus(scrape: &str) -> Prometheus {
    let dir = TempDir::new("prom");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: backstop\n    static_configs:\n      - targets: ['{scrape}']\n"
        ),
    )
    .expect("write config");
    let addr = format!("127.0.0.1:{}", free_port());
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus is installed (scripts/test.sh installs Debian's package)");
    let p = Prometheus {
        child,
        addr,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(&p.addr).is_ok() && get(&p.addr, "/-/ready").0 == 200 {
            return p;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("prometheus did not become ready");
}

fn query(p: &Prometheus, q: &str) -> serde_json::Value {
    let (code, body) = get(&p.addr, &format!("/api/v1/query?query={}", encode(q)));
    assert_eq!(code, 200, "{q}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["status"], "success", "{q}: {body}");
    v
}

/// Waits until Prometheus has scraped the target at least `n` more times.
fn scrapes(p: &Prometheus, n: u64) {
    // Samples of `up` in the last 5 minutes: one per scrape.
    let count = || {
        let s = query(p, "count_over_time(up[5m])");
        s["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|x| x.parse::<f64>().ok())
            .unwrap_or(0.0) as u64
    };
    let start = count();
    let deadline = Instant::now() + Duration::from_secs(30);
    while count() < start + n {
        assert!(Instant::now() < deadline, "no scrapes");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the prometheus binary; run by scripts/test.sh"]
async fn every_dashboard_query_answers_and_the_first_open_is_an_increase() {
    let server = Server::start(CONFIG, &[]);
    let http = server.http.clone().expect("http listener");
    let prom = tokio::task::spawn_blocking(move || start_prometheus(&http))
        .await
        .expect("join");
    let mut c = server.resilience().await;
    let channel = server.channel().await;
    let mut q = proto::deferred_client::DeferredClient::new(channel.clone());
    // Traffic for every panel: decisions, outcomes with latency, retries,
    // routes, budgets, queue activity, a watcher.
    for i in 0..20 {
        let a = c
            .can_proceed(proto::CanProceedRequest {
                target: "budgeted".into(),
                estimated_tokens: 100,
                attempt: i % 3,
                request_id: format!("req-{i}"),
                ..Default::default()
            })
            .await
            .expect("ok")
            .into_inner();
        c.record_outcome(proto::RecordOutcomeRequest {
            target: "budgeted".into(),
            permit: a.permit,
            http_status: if i % 4 == 0 { 503 } else { 200 },
            latency: Some(prost_types::Duration {
                seconds: 1,
                nanos: 200_000_000,
            }),
            request_id: format!("req-{i}"),
            finish: if i % 4 == 0 {
                proto::RequestResult::Failed
            } else {
                proto::RequestResult::Completed
            } as i32,
            ..Default::default()
        })
        .await
        .expect("ok");
    }
    let mut ev = proto::events_client::EventsClient::new(channel.clone());
    let _watch = ev
        .watch(proto::WatchRequest::default())
        .await
        .expect("watch");
    let d = q
        .defer(proto::DeferRequest {
            queue: "fallback".into(),
            payload: b"x".to_vec(),
            ..Default::default()
        })
        .await
        .expect("defer")
        .into_inner();
    let claimed = q
        .claim(proto::ClaimRequest {
            queue: "fallback".into(),
            max_items: 1,
            ..Default::default()
        })
        .await
        .expect("claim")
        .into_inner();
    assert_eq!(claimed.items[0].id, d.id);
    q.nack(proto::NackRequest {
        id: d.id,
        lease_token: claimed.items[0].lease_token.clone(),
        reason: "bad".into(),
        ..Default::default()
    })
    .await
    .expect("nack: dead-lettered on its only attempt");
    q.defer(proto::DeferRequest {
        queue: "chat".into(),
        payload: b"y".to_vec(),
        ..Default::default()
    })
    .await
    .expect("defer");
    c.route(proto::RouteRequest {
        route: "chat".into(),
        ..Default::default()
    })
    .await
    .expect("route");

    let prom = tokio::task::spawn_blocking(move || {
        scrapes(&prom, 3);
        prom
    })
    .await
    .expect("join");
    // Open m's breaker (a permit-bearing 503 with threshold 1), then route
    // past it and exhaust the route by forcing the fallback open.
    let p = c
        .can_proceed(proto::CanProceedRequest {
            target: "m".into(),
            ..Default::default()
        })
        .await
        .expect("ok")
        .into_inner();
    let r = c
        .record_outcome(proto::RecordOutcomeRequest {
            target: "m".into(),
            permit: p.permit,
            http_status: 503,
            ..Default::default()
        })
        .await
        .expect("ok")
        .into_inner();
    assert_eq!(r.state(), proto::BreakerState::Open);
    c.route(proto::RouteRequest {
        route: "chat".into(),
        ..Default::default()
    })
    .await
    .expect("route");
    server
        .admin()
        .await
        .set_breaker_state(proto::SetBreakerStateRequest {
            target: "fallback".into(),
            mode: proto::BreakerMode::ForceOpen as i32,
            reason: "test".into(),
        })
        .await
        .expect("force");
    c.route(proto::RouteRequest {
        route: "chat".into(),
        ..Default::default()
    })
    .await
    .expect("route");

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/grafana/backstop-dashboard.json"
        ))
        .expect("dashboard"),
    )
    .expect("json");
    tokio::task::spawn_blocking(move || {
        scrapes(&prom, 3);
        let mut n = 0;
        for panel in dashboard["panels"].as_array().expect("panels") {
            for t in panel["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"]
                    .as_str()
                    .expect("expr")
                    .replace("$__rate_interval", "1m");
                let v = query(&prom, &expr);
                let series = v["data"]["result"].as_array().map_or(0, Vec::len);
                assert!(series > 0, "no series for {expr}: {v}");
                n += 1;
            }
        }
        assert_eq!(n, 20, "every query of the dashboard was checked");
        let v = query(
            &prom,
            "sum(increase(backstop_breaker_transitions_total{target=\"m\",to=\"open\"}[1m]))",
        );
        let inc: f64 = v["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|x| x.parse().ok())
            .unwrap_or(0.0);
        assert!(
            (0.9..1.5).contains(&inc),
            "the first open is an increase of 1, got {inc}"
        );
    })
    .await
    .expect("queries");
}
