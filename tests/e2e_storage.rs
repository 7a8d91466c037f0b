//! End-to-end: a state store on a disk that fills up. Backstop must never lie
//! about durability: an answer that needs the disk (a Defer, a breaker
//! transition) is UNAVAILABLE naming the store and the OS error while the
//! disk is full; decisions that change nothing durable keep flowing; health
//! says which services cannot write; and when space returns, everything
//! recovers without a restart, and every acknowledged write survives a
//! `kill -9`.
//!
//! Uses a real 4 MiB tmpfs (needs `mount`, i.e. root, as in CI's container);
//! where mounting is not allowed the test says so on stderr and returns.

mod common;

use backstop::proto;
use common::{Server, TempDir};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const CONFIG: &str = r#"
[targets.flaky]
breaker = { failure_threshold = 2, open_duration = "10m" }
[targets.steady]
"#;

/// A small tmpfs, unmounted on drop.
struct SmallDisk {
    mount: PathBuf,
    _dir: TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Option<SmallDisk> {
        let dir = TempDir::new("smalldisk");
        let mount = dir.path().join("mnt");
        std::fs::create_dir_all(&mount).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&mount)
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallDisk { mount, _dir: dir })
    }

    fn data_dir(&self) -> PathBuf {
        self.mount.join("data")
    }

    /// Writes a filler file until the disk is full; returns its path.
    fn fill(&self) -> PathBuf {
        use std::io::Write as _;
        let path = self.mount.join("filler");
        let mut f = std::fs::File::create(&path).expect("filler");
        let chunk = vec![0xa5u8; 64 * 1024];
        loop {
            match f.write(&chunk) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let _ = f.sync_all();
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

fn defer(i: usize) -> proto::DeferRequest {
    proto::DeferRequest {
        queue: "q".into(),
        // Large enough that a few fill the store file's free pages quickly.
        payload: vec![u8::try_from(i % 251).unwrap_or(0); 96 * 1024],
        idempotency_key: format!("k{i}"),
        ..Default::default()
    }
}

async fn health(s: &Server, service: &str) -> ServingStatus {
    HealthClient::new(s.channel().await)
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health")
        .into_inner()
        .status()
}

fn start(data: &Path) -> Server {
    Server::start_in(
        TempDir::new("storage"),
        CONFIG,
        &["--data-dir", data.to_str().expect("utf-8 path")],
    )
}

type Resilience = proto::resilience_client::ResilienceClient<tonic::transport::Channel>;

/// CanProceed on `target`.
async fn ask(r: &mut Resilience, target: &str) -> proto::CanProceedResponse {
    r.can_proceed(proto::CanProceedRequest {
        target: target.into(),
        ..Default::default()
    })
    .await
    .expect("CanProceed")
    .into_inner()
}

/// An admission on `target`, then a 503 reported with its permit.
async fn fail_once(
    r: &mut Resilience,
    target: &str,
) -> Result<tonic::Response<proto::RecordOutcomeResponse>, tonic::Status> {
    let p = ask(r, target).await;
    r.record_outcome(proto::RecordOutcomeRequest {
        target: target.into(),
        permit: p.permit,
        http_status: 503,
        ..Default::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_never_makes_backstop_lie_and_it_recovers_without_a_restart() {
    let Some(disk) = SmallDisk::mount("4m") else {
        eprintln!(
            "SKIPPED a_full_disk_never_makes_backstop_lie: cannot mount a tmpfs here (needs root)"
        );
        return;
    };
    let mut server = start(&disk.data_dir());
    let mut d = proto::deferred_client::DeferredClient::new(server.channel().await);
    let mut r = server.resilience().await;
    d.defer(defer(0))
        .await
        .expect("a defer while there is space");
    let filler = disk.fill();

    // Defers until the store's own free space is gone too: every one is either
    // acknowledged (then it must survive) or UNAVAILABLE naming the store and
    // the OS error.
    let mut acked = vec![0usize];
    let mut refusal = None;
    for i in 1..40 {
        match d.defer(defer(i)).await {
            Ok(_) => acked.push(i),
            Err(s) => {
                refusal = Some(s);
                break;
            }
        }
    }
    let refusal = refusal.expect("a Defer on a full disk was acknowledged 39 times");
    assert_eq!(refusal.code(), tonic::Code::Unavailable, "{refusal:?}");
    assert!(
        refusal.message().contains("backstop.redb")
            && refusal.message().to_lowercase().contains("space"),
        "names the store and the OS error: {}",
        refusal.message()
    );

    // Decisions that change nothing durable keep flowing.
    let ok = ask(&mut r, "steady").await;
    assert!(ok.allowed);
    // Health: writes are not served, decisions are.
    let deadline = Instant::now() + Duration::from_secs(5);
    while health(&server, "backstop.v1.Deferred").await != ServingStatus::NotServing {
        assert!(Instant::now() < deadline, "Deferred still SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        health(&server, "backstop.v1.Resilience").await,
        ServingStatus::Serving
    );
    let (_, metrics) = server.http_get("/metrics", &[]);
    assert!(
        metrics.lines().any(|l| l == "backstop_store_failing 1"),
        "gauge: {}",
        metrics
            .lines()
            .filter(|l| l.contains("store_failing"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // A transition on a full disk: the breaker opens in memory (the safe
    // side) but the answer that would reveal it is UNAVAILABLE.
    let mut transition_refused = false;
    for _ in 0..2 {
        match fail_once(&mut r, "flaky").await {
            Ok(_) => {}
            Err(s) => {
                assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
                assert!(s.message().contains("durable"), "{}", s.message());
                transition_refused = true;
            }
        }
    }
    assert!(
        transition_refused,
        "the outcome that opened the breaker was acknowledged on a full disk"
    );

    // Space returns: the store reopens by itself, health and Defer recover.
    std::fs::remove_file(&filler).expect("remove filler");
    let deadline = Instant::now() + Duration::from_secs(10);
    while health(&server, "backstop.v1.Deferred").await != ServingStatus::Serving {
        assert!(Instant::now() < deadline, "Deferred did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = 100;
    d.defer(defer(after)).await.expect("a defer after recovery");
    acked.push(after);
    let open = ask(&mut r, "flaky").await;
    assert_eq!(open.reason(), proto::Reason::CircuitOpen);
    // Health returned only once every target was written again (the
    // recovery mark committed), so the breaker that opened while the disk
    // was full is on disk already: kill -9 at once.
    server.kill9();
    drop(d);
    drop(r);

    let server = start(&disk.data_dir());
    let mut d = proto::deferred_client::DeferredClient::new(server.channel().await);
    let stats = d
        .queue_stats(proto::QueueStatsRequest { queue: "q".into() })
        .await
        .expect("stats")
        .into_inner();
    let depth = stats.queues.first().map_or(0, |q| q.depth);
    assert_eq!(
        depth,
        acked.len() as u64,
        "every acknowledged Defer survived (acked {acked:?})"
    );
    let open = server
        .resilience()
        .await
        .can_proceed(proto::CanProceedRequest {
            target: "flaky".into(),
            ..Default::default()
        })
        .await
        .expect("CanProceed after restart")
        .into_inner();
    assert_eq!(
        open.reason(),
        proto::Reason::CircuitOpen,
        "the breaker opened on a full disk is still open after kill -9"
    );
}

/// The store file deleted while the server runs (an operator's `rm`, a
/// cleanup job): writes would go to a file nobody will read again. The server
/// notices within about a second even when idle, says so (health, gauge),
/// writes everything it holds to a new file, and after `kill -9` nothing
/// acknowledged is missing: deferrals, the open breaker, and permits issued
/// before the deletion still verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_file_removed_underneath_is_noticed_and_written_again() {
    let data = TempDir::new("removed");
    let mut server = start(data.path());
    let mut d = proto::deferred_client::DeferredClient::new(server.channel().await);
    let mut r = server.resilience().await;
    for i in 0..3 {
        d.defer(defer(i)).await.expect("defer");
    }
    // Open the breaker (two failures), and keep a permit of another target.
    for _ in 0..2 {
        fail_once(&mut r, "flaky").await.expect("recorded");
    }
    let kept = ask(&mut r, "steady").await.permit;

    std::fs::remove_file(data.path().join("backstop.redb")).expect("rm the store");
    // Noticed without any traffic, then recovered on a new file.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut saw_failing = false;
    loop {
        let (_, m) = server.http_get("/metrics", &[]);
        let gauge = |v: &str| {
            m.lines()
                .any(|l| l == format!("backstop_store_failing {v}"))
        };
        saw_failing |= gauge("1");
        if saw_failing && gauge("0") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "store failing seen: {saw_failing}; never recovered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        data.path().join("backstop.redb").exists(),
        "a new store file was written"
    );
    server.kill9();
    drop(d);
    drop(r);

    let server = start(data.path());
    let mut d = proto::deferred_client::DeferredClient::new(server.channel().await);
    let stats = d
        .queue_stats(proto::QueueStatsRequest { queue: "q".into() })
        .await
        .expect("stats")
        .into_inner();
    assert_eq!(stats.queues.first().map_or(0, |q| q.depth), 3);
    let mut r = server.resilience().await;
    let open = ask(&mut r, "flaky").await;
    assert_eq!(open.reason(), proto::Reason::CircuitOpen);
    // The permit key was written again too: an old permit still verifies
    // (it is late, so it counts without a lease, but it is not "forged").
    r.record_outcome(proto::RecordOutcomeRequest {
        target: "steady".into(),
        permit: kept,
        http_status: 200,
        ..Default::default()
    })
    .await
    .expect("a permit from before the deletion still verifies");
}

/// The store file deleted just before a graceful shutdown: the final flush
/// notices and writes everything to a new file, so a restart loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_file_removed_just_before_shutdown_loses_nothing() {
    let data = TempDir::new("removed-stop");
    let mut server = start(data.path());
    let mut d = proto::deferred_client::DeferredClient::new(server.channel().await);
    for i in 0..3 {
        d.defer(defer(i)).await.expect("defer");
    }
    drop(d);
    std::fs::remove_file(data.path().join("backstop.redb")).expect("rm the store");
    assert!(server.terminate().success(), "clean exit");

    let server = start(data.path());
    let stats = proto::deferred_client::DeferredClient::new(server.channel().await)
        .queue_stats(proto::QueueStatsRequest { queue: "q".into() })
        .await
        .expect("stats")
        .into_inner();
    assert_eq!(stats.queues.first().map_or(0, |q| q.depth), 3);
}
