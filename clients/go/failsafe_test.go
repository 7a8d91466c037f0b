package backstop_test

import (
	"context"
	"errors"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	backstop "github.com/backstop-dev/backstop/clients/go"
	"github.com/backstop-dev/backstop/clients/go/backstoptest"
)

var routes = map[string][]string{"chat": {sonnet, gpt, haiku}}

// agentLoop calls the chat route continuously, recording every result.
type agentLoop struct {
	bs      *backstop.Client
	prov    *backstoptest.FakeProvider
	mu      sync.Mutex
	results []loopResult
	stop    chan struct{}
	done    chan struct{}
}

type loopResult struct {
	target string
	mode   backstop.Mode
	err    error
}

func startLoop(bs *backstop.Client, prov *backstoptest.FakeProvider) *agentLoop {
	l := &agentLoop{bs: bs, prov: prov, stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(l.done)
		for {
			select {
			case <-l.stop:
				return
			default:
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			res, err := bs.Call(ctx, "chat", func(ctx context.Context, p backstop.Permit) (backstop.Result, error) {
				_, err := prov.Complete(ctx, nil, p.Target, "hi")
				return backstop.Result{}, err
			})
			cancel()
			l.mu.Lock()
			l.results = append(l.results, loopResult{res.Target, bs.Mode(), err})
			l.mu.Unlock()
			time.Sleep(5 * time.Millisecond)
		}
	}()
	return l
}

func (l *agentLoop) count() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.results)
}

func (l *agentLoop) since(n int) []loopResult {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]loopResult(nil), l.results[n:]...)
}

func (l *agentLoop) close() {
	close(l.stop)
	<-l.done
}

func TestKillMidRunThenRestart(t *testing.T) {
	srv := startServer(t, fast+chat)
	prov := newProvider(t)
	logs := &logRecorder{}
	bs := newClient(t, srv.Addr, backstop.WithTimeout(250*time.Millisecond), backstop.WithLocalPolicy(localFast),
		backstop.WithLocalRoutes(routes), backstop.WithReconnectInterval(100*time.Millisecond), backstop.WithLogger(logs))
	loop := startLoop(bs, prov)
	defer loop.close()

	waitFor(t, 10*time.Second, "calls through the live server", func() bool { return loop.count() >= 5 })
	for _, r := range loop.since(0) {
		if r.err != nil || r.target != sonnet || r.mode != backstop.ModeRemote {
			t.Fatalf("before the kill: %+v", r)
		}
	}

	srv.Kill() // kill -9, mid-run
	n := loop.count()
	waitFor(t, 5*time.Second, "the switch to local decisions", func() bool { return bs.Mode() == backstop.ModeLocal })
	waitFor(t, 10*time.Second, "calls while Backstop is down", func() bool { return loop.count() >= n+10 })

	// The primary fails while the control plane is down: the local breaker
	// opens after 2 failures and the local route falls back.
	prov.SetDefault(sonnet, ptr(backstoptest.Overloaded()))
	sonnetBefore := prov.Calls(sonnet)
	n = loop.count()
	waitFor(t, 10*time.Second, "local fallback calls", func() bool { return loop.count() >= n+15 })
	recent := loop.since(n)
	for _, r := range recent[len(recent)-5:] {
		if r.target != gpt || r.mode != backstop.ModeLocal {
			t.Fatalf("after the local breaker opened: %+v", r)
		}
	}
	// Backoff and the local breaker bound the calls to the failing model
	// (2 failures open it; each 500 ms half-open admits one probe).
	if calls := prov.Calls(sonnet) - sonnetBefore; calls > 8 {
		t.Fatalf("%d calls to the failing model while local", calls)
	}
	prov.SetDefault(sonnet, nil)
	if bs.PendingReports() == 0 {
		t.Fatal("outcomes decided locally are kept for reconciliation")
	}

	if err := srv.Restart(); err != nil { // same port
		t.Fatal(err)
	}
	took := waitFor(t, 10*time.Second, "reconnecting to the restarted server", func() bool { return bs.Mode() == backstop.ModeRemote })
	if took > 5*time.Second {
		t.Fatalf("reconnecting took %s", took)
	}
	n = loop.count()
	before := admitted(t, bs, sonnet) + admitted(t, bs, gpt)
	waitFor(t, 10*time.Second, "calls after the restart", func() bool { return loop.count() >= n+7 })
	if after := admitted(t, bs, sonnet) + admitted(t, bs, gpt); after < before+5 {
		t.Fatalf("decisions are the server's again: admitted %d -> %d", before, after)
	}
	for _, r := range loop.since(n + 2) {
		if r.mode != backstop.ModeRemote {
			t.Fatalf("after the restart: %+v", r)
		}
	}
	for _, r := range loop.since(0) {
		if r.err != nil {
			t.Fatalf("no call failed across the outage: %v", r.err)
		}
	}
	if logs.count("is unreachable") != 1 || logs.count("reachable again") != 1 {
		t.Fatalf("one log line per outage and recovery:\n%s", logs)
	}
}

func TestLocalOutcomesAreReportedOnceBackstopIsBack(t *testing.T) {
	srv := startServer(t, fast)
	bs := newClient(t, srv.Addr, backstop.WithTimeout(250*time.Millisecond), backstop.WithReconnectInterval(50*time.Millisecond))
	ctx := ctxT(t)
	if _, err := bs.Guard(ctx, "x/warmup", okFn); err != nil {
		t.Fatal(err)
	}
	srv.Kill()
	// A target the server has never seen: whatever it counts later came from reconciliation.
	for i := 0; i < 3; i++ {
		out, err := bs.Guard(ctx, "x/recon", okFn)
		if err != nil || !out.Local {
			t.Fatalf("local guard: %+v %v", out, err)
		}
	}
	_, _ = bs.Guard(ctx, "x/recon", func(context.Context, backstop.Permit) (backstop.Result, error) {
		return backstop.Result{}, &backstop.HTTPError{StatusCode: 529}
	})
	if bs.PendingReports() != 4 {
		t.Fatalf("pending reports = %d, want 4", bs.PendingReports())
	}
	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "reconnect", func() bool { return bs.Mode() == backstop.ModeRemote })
	waitFor(t, 5*time.Second, "the reconciled outcomes", func() bool {
		st, err := bs.GetTarget(ctx, "x/recon")
		return err == nil && st.GetCounters().GetSuccess() == 3 && st.GetCounters().GetTransient() == 1
	})
	if bs.PendingReports() != 0 {
		t.Fatalf("pending after reconciliation: %d", bs.PendingReports())
	}
	st, _ := bs.GetTarget(ctx, "x/recon")
	if st.GetCounters().GetAdmitted() != 0 {
		t.Fatalf("reconciled reports carry no permit: admitted = %d", st.GetCounters().GetAdmitted())
	}
}

func okFn(context.Context, backstop.Permit) (backstop.Result, error) { return backstop.Result{}, nil }

func TestDeadlineOnAHungServer(t *testing.T) {
	srv := startServer(t, fast)
	bs := newClient(t, srv.Addr, backstop.WithTimeout(50*time.Millisecond), backstop.WithReconnectInterval(100*time.Millisecond))
	ctx := ctxT(t)
	if a, err := bs.CanProceed(ctx, "hung/model"); err != nil || a.Local {
		t.Fatalf("%+v %v", a, err)
	}
	if err := srv.Pause(); err != nil {
		t.Fatal(err)
	}
	defer srv.Resume()
	start := time.Now()
	a, err := bs.CanProceed(ctx, "hung/model")
	if err != nil || !a.Allowed || !a.Local {
		t.Fatalf("%+v %v", a, err)
	}
	if first := time.Since(start); first > 500*time.Millisecond {
		t.Fatalf("a hung server cost %s, want about one 50 ms deadline", first)
	}
	start = time.Now()
	for i := 0; i < 20; i++ { // local mode: no more waiting on the network
		if a, _ := bs.CanProceed(ctx, "hung/model"); !a.Local {
			t.Fatal("still local")
		}
	}
	if d := time.Since(start); d > 200*time.Millisecond {
		t.Fatalf("20 local decisions took %s", d)
	}
	_ = srv.Resume()
	waitFor(t, 10*time.Second, "recovery after SIGCONT", func() bool { return bs.Mode() == backstop.ModeRemote })
	if a, _ := bs.CanProceed(ctx, "hung/model"); a.Local {
		t.Fatal("remote again")
	}
}

func TestFailClosed(t *testing.T) {
	srv := startServer(t, fast+chat)
	prov := newProvider(t)
	bs := newClient(t, srv.Addr, backstop.WithTimeout(250*time.Millisecond), backstop.WithPolicy(backstop.FailClosed),
		backstop.WithLocalRoutes(routes), backstop.WithReconnectInterval(100*time.Millisecond))
	ctx := ctxT(t)
	if _, err := bs.Guard(ctx, sonnet, okFn); err != nil {
		t.Fatal(err)
	}
	srv.Kill()
	_, err := bs.Guard(ctx, sonnet, func(context.Context, backstop.Permit) (backstop.Result, error) {
		t.Fatal("fail-closed must not admit while Backstop is unreachable")
		return backstop.Result{}, nil
	})
	var un *backstop.UnreachableError
	if !errors.As(err, &un) || !un.Local || un.Reason != backstop.ReasonControlPlaneUnavailable {
		t.Fatalf("want *UnreachableError, got %v", err)
	}
	r := &recorder{prov: prov}
	_, err = bs.Call(ctx, "chat", r.fn)
	var all *backstop.AllTargetsFailedError
	if !errors.As(err, &all) || len(all.Errors) != 3 || len(r.targets) != 0 {
		t.Fatalf("%v %v", err, r.targets)
	}
	for _, e := range all.Errors {
		if e.Reason != backstop.ReasonControlPlaneUnavailable {
			t.Fatalf("%v", all.Errors)
		}
	}
	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "reconnect", func() bool { return bs.Mode() == backstop.ModeRemote })
	if out, err := bs.Guard(ctx, sonnet, okFn); err != nil || out.Local {
		t.Fatalf("%+v %v", out, err)
	}
}

func TestUnknownRouteWhileDownExplainsItself(t *testing.T) {
	srv := startServer(t, fast+chat)
	bs := newClient(t, srv.Addr, backstop.WithTimeout(250*time.Millisecond), backstop.WithConnectTimeout(200*time.Millisecond))
	srv.Kill()
	_, err := bs.Call(ctxT(t), "chat", okFn)
	if err == nil || !strings.Contains(err.Error(), "WithLocalRoutes") {
		t.Fatalf("%v", err)
	}
}

func TestAgentStartsBeforeItsControlPlane(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close() // a port nobody listens on
	bs := newClient(t, addr, backstop.WithTimeout(50*time.Millisecond), backstop.WithConnectTimeout(300*time.Millisecond), backstop.WithQueueTimeout(300*time.Millisecond),
		backstop.WithReconnectInterval(100*time.Millisecond))
	start := time.Now()
	a, err := bs.CanProceed(ctxT(t), sonnet)
	if err != nil || !a.Allowed || !a.Local || time.Since(start) > time.Second {
		t.Fatalf("%+v %v after %s", a, err, time.Since(start))
	}
	// Queue and admin calls have no local fallback: they say the server is unavailable.
	_, err = bs.QueueStats(ctxT(t), "")
	var cpe *backstop.ControlPlaneError
	if !errors.Is(err, backstop.ErrUnavailable) || !errors.As(err, &cpe) || !cpe.Unavailable() {
		t.Fatalf("want ErrUnavailable, got %v", err)
	}
	// The server comes up on that port: the client switches to it by itself.
	srv, err := backstoptest.StartAt(fast, addr)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	waitFor(t, 10*time.Second, "connecting once the server is up", func() bool { return bs.Mode() == backstop.ModeRemote })
	if a, _ := bs.CanProceed(ctxT(t), sonnet); a.Local {
		t.Fatal("remote decisions once the server is up")
	}
}

func TestRejectionsAreErrorsNotOutages(t *testing.T) {
	srv := startServer(t, fast)
	bs := newClient(t, srv.Addr)
	_, err := bs.Route(ctxT(t), "no-such-route")
	var cpe *backstop.ControlPlaneError
	if !errors.As(err, &cpe) || cpe.Unavailable() || bs.Mode() != backstop.ModeRemote {
		t.Fatalf("an unknown route is the caller's bug, not an outage: %v", err)
	}
	_, err = bs.CanProceed(ctxT(t), "")
	if !errors.As(err, &cpe) || cpe.Code.String() != "InvalidArgument" {
		t.Fatalf("empty target: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := bs.CanProceed(ctx, sonnet); !errors.Is(err, context.Canceled) || bs.Mode() != backstop.ModeRemote {
		t.Fatalf("a cancelled context is returned, never taken for an outage: %v", err)
	}
}
