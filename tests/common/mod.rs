//! Helpers shared by the end-to-end tests: start the real `backstop` binary on
//! ephemeral ports with a given config, connect gRPC clients to it.

#![allow(dead_code)]

use backstop::proto::admin_client::AdminClient;
use backstop::proto::resilience_client::ResilienceClient;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "backstop-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `backstop serve`, killed on drop.
pub struct Server {
    pub child: Child,
    pub grpc: String,
    pub http: Option<String>,
    pub dir: TempDir,
    pub config_path: PathBuf,
    /// Everything the server wrote to stdout, and to stderr when started
    /// with [`Server::start_capturing`] (for tests that read its logs).
    pub output: std::sync::Arc<std::sync::Mutex<String>>,
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_backstop")
}

impl Server {
    /// Starts the binary with `config` (TOML) and extra flags; waits until it listens.
    pub fn start(config: &str, extra: &[&str]) -> Server {
        let dir = TempDir::new("srv");
        Self::start_in(dir, config, extra)
    }

    pub fn start_in(dir: TempDir, config: &str, extra: &[&str]) -> Server {
        Self::start_with(dir, config, extra, &[])
    }

    /// Starts with extra environment variables (e.g. RUST_LOG, OTEL_*).
    pub fn start_with(dir: TempDir, config: &str, extra: &[&str], env: &[(&str, &str)]) -> Server {
        Self::spawn(dir, Some(config), extra, env)
    }

    /// Starts on the built-in defaults (no --config).
    pub fn start_without_config(extra: &[&str]) -> Server {
        Self::spawn(TempDir::new("srv"), None, extra, &[])
    }

    /// Starts with its logs (stderr) captured into [`Server::output`]
    /// instead of passed through, at the `RUST_LOG` given in `env`.
    pub fn start_capturing(config: &str, extra: &[&str], env: &[(&str, &str)]) -> Server {
        Self::spawn_with(TempDir::new("srv"), Some(config), extra, env, true)
    }

    fn spawn(dir: TempDir, config: Option<&str>, extra: &[&str], env: &[(&str, &str)]) -> Server {
        Self::spawn_with(dir, config, extra, env, false)
    }

    fn spawn_with(
        dir: TempDir,
        config: Option<&str>,
        extra: &[&str],
        env: &[(&str, &str)],
        capture_stderr: bool,
    ) -> Server {
        let config_path = dir.path().join("backstop.toml");
        let mut cmd = Command::new(binary());
        cmd.arg("serve");
        if let Some(config) = config {
            std::fs::write(&config_path, config).expect("write config");
            cmd.arg("--config").arg(&config_path);
        }
        cmd.arg("--listen")
            .arg("127.0.0.1:0")
            .args(if extra.contains(&"--http") {
                &[][..]
            } else {
                &["--http", "127.0.0.1:0"][..]
            })
            .args(extra)
            .current_dir(dir.path())
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(if capture_stderr {
                Stdio::piped()
            } else {
                Stdio::inherit()
            });
        let mut child = cmd.spawn().expect("spawn backstop");
        let stdout = child.stdout.take().expect("stdout");
        let output = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let out = output.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 0 {
                if line.starts_with("backstop listening") {
                    let _ = tx.send(line.clone());
                }
                out.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push_str(&line);
                line.clear();
            }
        });
        if let Some(stderr) = child.stderr.take() {
            let out = output.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stderr);
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap_or(0) > 0 {
                    out.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push_str(&line);
                    line.clear();
                }
            });
        }
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("backstop did not report its listening address within 30 s");
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                .map(str::to_string)
        };
        Server {
            child,
            grpc: field("grpc").expect("grpc address"),
            http: field("http"),
            dir,
            config_path,
            output,
        }
    }

    /// Sends an HTTP/1.0 GET to the HTTP listener and returns (status line, body).
    pub fn http_get(&self, path: &str, headers: &[(&str, &str)]) -> (String, String) {
        use std::io::{Read, Write};
        let addr = self.http.as_deref().expect("the HTTP listener is on");
        let mut s = std::net::TcpStream::connect(addr).expect("connect http");
        let mut req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        (
            head.lines().next().unwrap_or_default().to_string(),
            body.to_string(),
        )
    }

    /// Opens an SSE stream (HTTP/1.0, so the body is not chunked) and returns a line reader.
    pub fn sse(&self, path: &str, headers: &[(&str, &str)]) -> BufReader<std::net::TcpStream> {
        use std::io::Write;
        let addr = self.http.as_deref().expect("the HTTP listener is on");
        let mut s = std::net::TcpStream::connect(addr).expect("connect http");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut req =
            format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: text/event-stream\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).expect("write");
        let mut r = BufReader::new(s);
        let mut line = String::new();
        // Skip the response head.
        while r.read_line(&mut line).unwrap_or(0) > 0 {
            if line == "\r\n" || line == "\n" {
                break;
            }
            line.clear();
        }
        r
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    pub async fn channel(&self) -> Channel {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Channel::from_shared(self.url())
                .expect("url")
                .connect()
                .await
            {
                Ok(c) => return c,
                Err(e) if Instant::now() > deadline => panic!("cannot connect: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    pub async fn resilience(&self) -> ResilienceClient<Channel> {
        ResilienceClient::new(self.channel().await)
    }

    pub async fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel().await)
    }

    /// Sends SIGTERM and returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        self.wait_exit(Duration::from_secs(20))
    }

    /// SIGKILL: a crash.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("backstop did not exit within {within:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Takes the scratch dir (e.g. to restart on the same data dir).
    pub fn into_dir(mut self) -> TempDir {
        self.kill9();
        TempDir(std::mem::take(&mut self.dir.0))
    }
}

/// A free TCP port on loopback (bound then released).
/// Hex SHA-256 of a secret: what `[[auth.principals]] token_sha256` holds.
pub fn sha256_hex(s: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A real `redis-server` on a free port, in its own directory, killed on drop.
pub struct Redis {
    pub child: Child,
    pub port: u16,
    pub dir: TempDir,
    args: Vec<String>,
}

impl Redis {
    /// No persistence: a scratch Redis for a test.
    pub fn start() -> Redis {
        Self::start_with(&["--save", "", "--appendonly", "no"])
    }

    /// With extra `redis-server` arguments (e.g. AOF settings).
    pub fn start_with(args: &[&str]) -> Redis {
        let dir = TempDir::new("redis");
        let port = free_port();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let child = Self::spawn(port, &dir, &args);
        let r = Redis {
            child,
            port,
            dir,
            args,
        };
        r.wait_ready();
        r
    }

    fn spawn(port: u16, dir: &TempDir, args: &[String]) -> Child {
        Command::new("redis-server")
            .arg("--port")
            .arg(port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(dir.path())
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test.sh installs Debian's redis-server)")
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::{Read, Write};
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                if s.write_all(b"PING\r\n").is_ok() {
                    let mut b = [0u8; 7];
                    if s.read(&mut b).is_ok_and(|n| n > 0) && b.starts_with(b"+PONG") {
                        return;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Sends a signal (e.g. "STOP", "CONT") to freeze or thaw Redis.
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status();
    }

    /// Kills Redis (SIGKILL) and starts it again on the same port and directory.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(self.port, &self.dir, &self.args);
        self.wait_ready();
    }

    /// One command through redis-cli, for assertions.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .arg("-p")
            .arg(self.port.to_string())
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// A replica in cluster mode on `redis`; waits until it reaches Redis.
    pub async fn start_replica(config: &str, redis: &str, extra: &[&str]) -> Server {
        let mut args = vec!["--redis", redis];
        args.extend_from_slice(extra);
        let s = Server::start(config, &args);
        s.wait_cluster_ready().await;
        s
    }

    /// Waits until GetCluster says Redis is reachable (decisions not degraded).
    pub async fn wait_cluster_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut admin = self.admin().await;
        loop {
            let c = admin
                .get_cluster(backstop::proto::GetClusterRequest {})
                .await
                .expect("get_cluster")
                .into_inner();
            if c.redis_reachable && !c.degraded {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "replica never reached Redis: {c:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A signed permit of `target` (on key slot `slot` when given), from
/// CanProceed: outcomes that impose anything on the fleet (a pause, a disabled
/// key, an immediate open) count only with the permit of an admitted call.
pub async fn permit(c: &mut ResilienceClient<Channel>, target: &str, slot: Option<&str>) -> String {
    for _ in 0..64 {
        let a = c
            .can_proceed(backstop::proto::CanProceedRequest {
                target: target.into(),
                ..Default::default()
            })
            .await
            .expect("can_proceed")
            .into_inner();
        if a.allowed && slot.is_none_or(|s| a.key_slot == s) {
            return a.permit;
        }
    }
    panic!("no admission of {target} on key slot {slot:?}");
}

/// A codec that sends and receives raw bytes: for malformed requests.
pub mod raw {
    use bytes::{Buf, BufMut};
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

    #[derive(Default, Clone)]
    pub struct RawCodec;

    pub struct RawEncoder;
    pub struct RawDecoder;

    impl Encoder for RawEncoder {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
            dst.put_slice(&item);
            Ok(())
        }
    }

    impl Decoder for RawDecoder {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
            let mut v = vec![0; src.remaining()];
            src.copy_to_slice(&mut v);
            Ok(Some(v))
        }
    }

    impl Codec for RawCodec {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = RawEncoder;
        type Decoder = RawDecoder;
        fn encoder(&mut self) -> RawEncoder {
            RawEncoder
        }
        fn decoder(&mut self) -> RawDecoder {
            RawDecoder
        }
    }
}

/// One Server-Sent Event.
#[derive(Debug, Default, Clone)]
pub struct Sse {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
}

/// Reads the next SSE frame (skipping keep-alive comments).
pub fn next_sse(r: &mut BufReader<std::net::TcpStream>) -> Option<Sse> {
    let mut ev = Sse::default();
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let l = line.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            if ev.event.is_empty() && ev.data.is_empty() {
                continue;
            }
            return Some(ev);
        }
        if let Some(v) = l.strip_prefix("id:") {
            ev.id = Some(v.trim().to_string());
        } else if let Some(v) = l.strip_prefix("event:") {
            ev.event = v.trim().to_string();
        } else if let Some(v) = l.strip_prefix("data:") {
            ev.data.push_str(v.trim_start());
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends an HTTP/1.0 POST and returns (status code, body).
pub fn http_post(
    server: &Server,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    use std::io::{Read, Write};
    let addr = server.http.as_deref().expect("the HTTP listener is on");
    let mut s = std::net::TcpStream::connect(addr).expect("connect http");
    let mut req = format!(
        "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, body.to_string())
}

/// A throwaway certificate authority (rcgen) for TLS tests.
pub struct Ca {
    pub pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

pub fn new_ca(name: &str) -> Ca {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    let cert = p.self_signed(&key).expect("self-signed");
    Ca {
        pem: cert.pem(),
        issuer: rcgen::Issuer::new(p, key),
    }
}

/// (certificate PEM, key PEM) for `cn` with these subject alternative names.
pub fn leaf(ca: &Ca, cn: &str, sans: &[&str]) -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut p =
        rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("params");
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    let cert = p.signed_by(&key, &ca.issuer).expect("signed");
    (cert.pem(), key.serialize_pem())
}
