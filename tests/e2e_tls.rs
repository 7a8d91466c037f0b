//! End-to-end: TLS and mTLS on the real binary (throwaway certificates made
//! by rcgen): gRPC and HTTPS, a client certificate standing for a principal,
//! require_client_cert, and a certificate rotated without a restart.

mod common;

use backstop::proto;
use common::{Ca, Server, TempDir, leaf, new_ca};
use std::io::{Read as _, Write as _};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_rustls::rustls;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use common::sha256_hex as sha;

/// A server over TLS with client certificates verified against `ca`.
fn start(ca: &Ca, require: bool) -> (Server, std::path::PathBuf) {
    let dir = TempDir::new("tls");
    let (cert, key) = leaf(ca, "backstop", &["localhost", "127.0.0.1"]);
    std::fs::write(dir.path().join("server.pem"), cert).expect("write");
    std::fs::write(dir.path().join("server.key"), key).expect("write");
    std::fs::write(dir.path().join("ca.pem"), &ca.pem).expect("write");
    let d = dir.path().to_path_buf();
    let config = format!(
        r#"
[server.tls]
cert = "{0}/server.pem"
key = "{0}/server.key"
client_ca = "{0}/ca.pem"
require_client_cert = {require}

[[auth.principals]]
name = "oncall"
roles = ["operator"]
cert_identity = "oncall.example"

[[auth.principals]]
name = "fleet"
roles = ["agent"]
token_sha256 = "{1}"
"#,
        d.display(),
        sha("fleet-token-000000")
    );
    (Server::start_in(dir, &config, &[]), d)
}

async fn channel(
    server: &Server,
    ca: &Ca,
    identity: Option<(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let port = server.grpc.rsplit(':').next().expect("port");
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca.pem))
        .domain_name("localhost");
    if let Some((c, k)) = identity {
        tls = tls.identity(Identity::from_pem(c, k));
    }
    Channel::from_shared(format!("https://127.0.0.1:{port}"))
        .expect("uri")
        .tls_config(tls)?
        .connect()
        .await
}

fn with_token<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        "Bearer fleet-token-000000".parse().expect("ascii"),
    );
    r
}

fn can() -> proto::CanProceedRequest {
    proto::CanProceedRequest {
        target: "p/m".into(),
        ..Default::default()
    }
}

/// The certificate an HTTPS connection is served with, and the response
/// to `GET path`.
fn https_get(addr: &str, ca_pem: &str, path: &str) -> (Vec<u8>, String) {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.expect("ca")).expect("add");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("conn");
    let mut sock = std::net::TcpStream::connect(addr).expect("connect");
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    tls.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .expect("write");
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out);
    let served = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec())
        .unwrap_or_default();
    (served, String::from_utf8_lossy(&out).into_owned())
}

use rustls::pki_types::pem::PemObject as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_and_https_over_tls_with_a_client_certificate_as_a_principal() {
    let ca = new_ca("test ca");
    let (server, dir) = start(&ca, false);

    // A client that trusts the CA, with a token: served.
    let ch = channel(&server, &ca, None).await.expect("TLS connect");
    let mut r = proto::resilience_client::ResilienceClient::new(ch.clone());
    assert!(
        r.can_proceed(with_token(can()))
            .await
            .expect("ok")
            .into_inner()
            .allowed
    );
    // No token and no certificate: who is this?
    let e = r.can_proceed(can()).await.expect_err("anonymous");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);

    // A client certificate named oncall.example stands for "oncall".
    let (c, k) = leaf(&ca, "oncall", &["oncall.example"]);
    let ch = channel(&server, &ca, Some((c, k)))
        .await
        .expect("mTLS connect");
    let t = proto::admin_client::AdminClient::new(ch)
        .set_breaker_state(proto::SetBreakerStateRequest {
            target: "p/m".into(),
            mode: proto::BreakerMode::ForceOpen as i32,
            reason: "drill".into(),
        })
        .await
        .expect("the certificate's principal is an operator")
        .into_inner();
    assert_eq!(t.forced_reason, "drill (by oncall)");

    // A certificate from another CA is refused at the handshake.
    let other = new_ca("other ca");
    let (c, k) = leaf(&other, "oncall", &["oncall.example"]);
    let refused = match channel(&server, &ca, Some((c, k))).await {
        Err(_) => true,
        Ok(ch) => proto::resilience_client::ResilienceClient::new(ch)
            .can_proceed(with_token(can()))
            .await
            .is_err(),
    };
    assert!(
        refused,
        "a certificate from another CA must not get through"
    );

    // Plaintext to the TLS port gets nowhere, and the server keeps serving.
    let plain = Channel::from_shared(format!("http://{}", server.grpc))
        .expect("uri")
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(2))
        .connect()
        .await;
    if let Ok(ch) = plain {
        assert!(
            proto::resilience_client::ResilienceClient::new(ch)
                .can_proceed(with_token(can()))
                .await
                .is_err()
        );
    }
    assert!(r.can_proceed(with_token(can())).await.is_ok());

    // HTTPS: the same certificate; probes answer.
    let http = server.http.clone().expect("http");
    let (served, body) = tokio::task::spawn_blocking({
        let (http, pem) = (http.clone(), ca.pem.clone());
        move || https_get(&http, &pem, "/healthz")
    })
    .await
    .expect("https");
    assert!(
        body.starts_with("HTTP/1.") && body.contains(" 200 "),
        "{body}"
    );
    assert!(body.ends_with("ok\n"), "{body}");

    // Rotation: new files in place are served within a few seconds, no restart.
    let (c, k) = leaf(&ca, "backstop-rotated", &["localhost", "127.0.0.1"]);
    let want = rustls::pki_types::CertificateDer::from_pem_slice(c.as_bytes())
        .expect("der")
        .as_ref()
        .to_vec();
    assert_ne!(served, want);
    std::fs::write(dir.join("server.key"), k).expect("write");
    std::fs::write(dir.join("server.pem"), c).expect("write");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (served, _) = tokio::task::spawn_blocking({
            let (http, pem) = (http.clone(), ca.pem.clone());
            move || https_get(&http, &pem, "/healthz")
        })
        .await
        .expect("https");
        if served == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rotated certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ch = channel(&server, &ca, None)
        .await
        .expect("TLS after rotation");
    assert!(
        proto::resilience_client::ResilienceClient::new(ch)
            .can_proceed(with_token(can()))
            .await
            .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_client_cert_refuses_peers_without_one() {
    let ca = new_ca("test ca");
    let (server, _) = start(&ca, true);
    let refused = match channel(&server, &ca, None).await {
        Err(_) => true,
        Ok(ch) => proto::resilience_client::ResilienceClient::new(ch)
            .can_proceed(with_token(can()))
            .await
            .is_err(),
    };
    assert!(refused, "no client certificate must be refused");
    let (c, k) = leaf(&ca, "oncall", &["oncall.example"]);
    let ch = channel(&server, &ca, Some((c, k))).await.expect("mTLS");
    proto::admin_client::AdminClient::new(ch)
        .get_target(proto::GetTargetRequest {
            target: "p/m".into(),
        })
        .await
        .map(|_| ())
        .or_else(|e| {
            if e.code() == tonic::Code::NotFound {
                Ok(())
            } else {
                Err(e)
            }
        })
        .expect("an operator's certificate is enough");
}
