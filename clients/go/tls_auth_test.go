package backstop_test

// TLS, mutual TLS and bearer tokens against the real binary. The
// certificates are throwaway ones made by clients/scripts/test-certs.sh (the
// openssl CLI): a test CA, a server certificate for localhost / 127.0.0.1 and
// a client certificate, all signed by it.

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	backstop "github.com/backstop-dev/backstop/clients/go"
	"github.com/backstop-dev/backstop/clients/go/backstoptest"
)

const fleetToken = "fleet-token-0123456789"

// testCerts makes the certificates into a temporary directory.
func testCerts(t *testing.T) string {
	t.Helper()
	if _, err := exec.LookPath("openssl"); err != nil {
		t.Skip("needs the openssl CLI")
	}
	root, err := backstoptest.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if out, err := exec.Command(filepath.Join(root, "clients", "scripts", "test-certs.sh"), dir).CombinedOutput(); err != nil {
		t.Fatalf("test-certs.sh: %v\n%s", err, out)
	}
	return dir
}

func pool(t *testing.T, path string) *x509.CertPool {
	t.Helper()
	pem, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	p := x509.NewCertPool()
	if !p.AppendCertsFromPEM(pem) {
		t.Fatalf("no certificate in %s", path)
	}
	return p
}

func clientCert(t *testing.T, dir string) tls.Certificate {
	t.Helper()
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "client.pem"), filepath.Join(dir, "client.key"))
	if err != nil {
		t.Fatal(err)
	}
	return cert
}

func tlsServer(t *testing.T, dir, extra string) *backstoptest.Server {
	return startServer(t, `
[server.tls]
cert = "`+dir+`/server.pem"
key = "`+dir+`/server.key"
`+extra+`
[targets.a]
`)
}

// quick: short deadlines for the clients that cannot connect.
func quick() []backstop.Option {
	return []backstop.Option{backstop.WithQueueTimeout(time.Second), backstop.WithConnectTimeout(300 * time.Millisecond)}
}

func TestMutualTLS(t *testing.T) {
	dir := testCerts(t)
	srv := tlsServer(t, dir, `client_ca = "`+dir+`/ca.pem"
require_client_cert = true`)
	ctx := ctxT(t)

	good := newClient(t, srv.Addr, backstop.WithTLS(&tls.Config{
		RootCAs: pool(t, filepath.Join(dir, "ca.pem")), Certificates: []tls.Certificate{clientCert(t, dir)}}))
	adm, err := good.CanProceed(ctx, "a")
	if err != nil || !adm.Allowed || adm.Local {
		t.Fatalf("CanProceed over mTLS: %+v %v", adm, err)
	}
	if _, err := good.QueueStats(ctx, ""); err != nil {
		t.Fatalf("QueueStats over mTLS: %v", err)
	}

	noCert := newClient(t, srv.Addr, append(quick(), backstop.WithTLS(&tls.Config{RootCAs: pool(t, filepath.Join(dir, "ca.pem"))}))...)
	if _, err := noCert.QueueStats(ctx, ""); !errors.Is(err, backstop.ErrUnavailable) {
		t.Fatalf("without a client certificate: %v", err)
	} else {
		t.Logf("without a client certificate: %v", err)
	}

	foreign := newClient(t, srv.Addr, append(quick(), backstop.WithTLS(&tls.Config{
		RootCAs: pool(t, filepath.Join(dir, "other-ca.pem")), Certificates: []tls.Certificate{clientCert(t, dir)}}))...)
	if _, err := foreign.QueueStats(ctx, ""); !errors.Is(err, backstop.ErrUnavailable) {
		t.Fatalf("a server certificate from another CA: %v", err)
	}

	plain := newClient(t, srv.Addr, quick()...)
	if _, err := plain.QueueStats(ctx, ""); !errors.Is(err, backstop.ErrUnavailable) {
		t.Fatalf("plaintext to a TLS server: %v", err)
	}
}

func authConfig() string {
	sum := sha256.Sum256([]byte(fleetToken))
	return `
[[auth.principals]]
name = "fleet"
roles = ["agent"]
token_sha256 = "` + hex.EncodeToString(sum[:]) + `"

[routes.chat]
targets = ["a"]
`
}

func TestToken(t *testing.T) {
	srv := startServer(t, authConfig()+"[targets.a]\n")
	ctx := ctxT(t)
	for _, stream := range []bool{true, false} {
		opts := func(o ...backstop.Option) []backstop.Option {
			if !stream {
				o = append(o, backstop.WithoutStream())
			}
			return o
		}
		good := newClient(t, srv.Addr, opts(backstop.WithToken(fleetToken))...)
		if adm, err := good.CanProceed(ctx, "a"); err != nil || !adm.Allowed || adm.Local {
			t.Fatalf("stream=%v: CanProceed with the token: %+v %v", stream, adm, err)
		}
		if res, err := good.Call(ctx, "chat", failing(new([]string))); err != nil || res.Target != "a" {
			t.Fatalf("stream=%v: Call with the token: %+v %v", stream, res, err)
		}
		if _, err := good.Defer(ctx, "chat", []byte("later")); err != nil {
			t.Fatalf("stream=%v: Defer with the token: %v", stream, err)
		}
		for _, bad := range []*backstop.Client{
			newClient(t, srv.Addr, opts(backstop.WithToken("wrong-token-0000000000"))...),
			newClient(t, srv.Addr, opts()...),
		} {
			_, err := bad.CanProceed(ctx, "a")
			var cpe *backstop.ControlPlaneError
			if !errors.Is(err, backstop.ErrUnauthenticated) || !errors.As(err, &cpe) || errors.Is(err, backstop.ErrUnavailable) {
				t.Fatalf("stream=%v: CanProceed with a bad token: %v", stream, err)
			}
			if _, err := bad.Call(ctx, "chat", failing(new([]string))); !errors.Is(err, backstop.ErrUnauthenticated) {
				t.Fatalf("stream=%v: Call with a bad token: %v", stream, err)
			}
			if _, err := bad.Defer(ctx, "chat", []byte("later")); !errors.Is(err, backstop.ErrUnauthenticated) {
				t.Fatalf("stream=%v: Defer with a bad token: %v", stream, err)
			}
			if bad.Mode() != backstop.ModeRemote {
				t.Fatalf("stream=%v: a refused token is not an outage", stream)
			}
		}
	}
}

func TestTokenOverTLS(t *testing.T) {
	dir := testCerts(t)
	srv := tlsServer(t, dir, authConfig())
	ctx := ctxT(t)
	cfg := &tls.Config{RootCAs: pool(t, filepath.Join(dir, "ca.pem")), ServerName: "localhost"}
	if adm, err := newClient(t, srv.Addr, backstop.WithTLS(cfg), backstop.WithToken(fleetToken)).CanProceed(ctx, "a"); err != nil || !adm.Allowed {
		t.Fatalf("token over TLS: %+v %v", adm, err)
	}
	_, err := newClient(t, srv.Addr, backstop.WithTLS(cfg), backstop.WithToken("wrong-token-0000000000")).CanProceed(ctx, "a")
	if !errors.Is(err, backstop.ErrUnauthenticated) {
		t.Fatalf("wrong token over TLS: %v", err)
	}
}
