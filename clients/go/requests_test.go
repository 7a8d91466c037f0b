package backstop_test

// End-to-end user requests (issue #17) against the real binary: Call and
// Guard name each user request with one RequestID, sent on every Route /
// CanProceed / RecordOutcome of it (retries and fallbacks included); the
// success report closes it as completed, giving up finishes it as failed and
// deferring as deferred (FinishRequest). Finishing an id again answers
// Duplicate with what the server measured, which is how these tests read a
// request's attempts; the totals come from /metrics.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"regexp"
	"strconv"
	"testing"
	"time"

	backstop "github.com/backstop-dev/backstop/clients/go"
	"github.com/backstop-dev/backstop/clients/go/backstoptest"
)

const requestsConfig = `
[routes.chat]
targets = ["a", "b"]
[targets.a]
[targets.b]
`

func sample(t *testing.T, srv *backstoptest.Server, series string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + srv.HTTPAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(series) + ` (\S+)$`).FindSubmatch(body)
	if m == nil {
		return 0
	}
	v, _ := strconv.ParseFloat(string(m[1]), 64)
	return v
}

func requests(t *testing.T, srv *backstoptest.Server, route, result string) float64 {
	return sample(t, srv, fmt.Sprintf(`backstop_requests_total{route="%s",result="%s"}`, route, result))
}

// failing answers 401 (PERSISTENT, not retried: Call falls back) on the
// targets listed and succeeds elsewhere, recording the targets it was called for.
func failing(calls *[]string, targets ...string) backstop.Func {
	return func(ctx context.Context, p backstop.Permit) (backstop.Result, error) {
		*calls = append(*calls, p.Target)
		for _, t := range targets {
			if p.Target == t {
				return backstop.Result{}, &backstop.HTTPError{StatusCode: 401, Body: []byte(`{"error":{"type":"authentication_error","message":"bad key"}}`)}
			}
		}
		return backstop.Result{}, nil
	}
}

func TestRequestFallbackIsOneCompletedRequestWithTwoAttempts(t *testing.T) {
	srv := startServer(t, requestsConfig)
	c := newClient(t, srv.Addr)
	ctx := ctxT(t)
	var calls []string
	res, err := c.Call(ctx, "chat", failing(&calls, "a"), backstop.RequestID("user-req-1"))
	if err != nil || res.Target != "b" || fmt.Sprint(calls) != "[a b]" {
		t.Fatalf("Call: %+v %v (calls %v)", res, err, calls)
	}
	if n := requests(t, srv, "chat", "completed"); n != 1 {
		t.Fatalf("completed = %v", n)
	}
	if n := requests(t, srv, "chat", "failed"); n != 0 {
		t.Fatalf("failed = %v", n)
	}
	if n := sample(t, srv, `backstop_request_attempts_sum{route="chat"}`); n != 2 {
		t.Fatalf("attempts sum = %v", n)
	}
	again, err := c.FinishRequest(ctx, "user-req-1", backstop.RequestFailed, backstop.FinishOptions{})
	if err != nil || !again.Tracked || !again.Duplicate || again.Attempts != 2 || again.Route != "chat" || again.Duration > 10*time.Second {
		t.Fatalf("finish again: %+v %v", again, err)
	}

	// Without RequestID, Call makes one up.
	if _, err := c.Call(ctx, "chat", failing(&calls)); err != nil {
		t.Fatal(err)
	}
	if n := requests(t, srv, "chat", "completed"); n != 2 {
		t.Fatalf("completed = %v", n)
	}
}

func TestRequestExhaustedIsFailedAndDeferredIsDeferred(t *testing.T) {
	srv := startServer(t, requestsConfig)
	c := newClient(t, srv.Addr)
	ctx := ctxT(t)
	var calls []string
	_, err := c.Call(ctx, "chat", failing(&calls, "a", "b"), backstop.RequestID("doomed"))
	if !errors.Is(err, backstop.ErrAllTargetsFailed) || fmt.Sprint(calls) != "[a b]" {
		t.Fatalf("Call: %v (calls %v)", err, calls)
	}
	if f, c := requests(t, srv, "chat", "failed"), requests(t, srv, "chat", "completed"); f != 1 || c != 0 {
		t.Fatalf("failed %v completed %v", f, c)
	}
	again, err := c.FinishRequest(ctx, "doomed", backstop.RequestCompleted, backstop.FinishOptions{})
	if err != nil || !again.Duplicate || again.Attempts != 2 {
		t.Fatalf("finish again: %+v %v", again, err)
	}

	_, err = c.Call(ctx, "chat", failing(&calls, "a", "b"), backstop.RequestID("later-1"), backstop.DeferTo("chat", []byte(`{"prompt":"later"}`)))
	if !errors.Is(err, backstop.ErrDeferred) {
		t.Fatalf("Call with DeferTo: %v", err)
	}
	if d, f := requests(t, srv, "chat", "deferred"), requests(t, srv, "chat", "failed"); d != 1 || f != 1 {
		t.Fatalf("deferred %v failed %v", d, f)
	}
	if again, err := c.FinishRequest(ctx, "later-1", backstop.RequestFailed, backstop.FinishOptions{}); err != nil || !again.Duplicate {
		t.Fatalf("finish again: %+v %v", again, err)
	}
}

func TestRequestGuard(t *testing.T) {
	srv := startServer(t, requestsConfig)
	c := newClient(t, srv.Addr)
	ctx := ctxT(t)
	var id string
	ok := func(ctx context.Context, p backstop.Permit) (backstop.Result, error) {
		id = p.RequestID
		return backstop.Result{}, nil
	}
	boom := func(ctx context.Context, p backstop.Permit) (backstop.Result, error) {
		return backstop.Result{}, &backstop.HTTPError{StatusCode: 500}
	}
	if _, err := c.Guard(ctx, "a", ok); err != nil || len(id) != 32 {
		t.Fatalf("Guard: %v (id %q)", err, id)
	}
	if _, err := c.Guard(ctx, "b", boom); err == nil {
		t.Fatal("Guard: want the function's error")
	}
	if done, failed := requests(t, srv, "direct", "completed"), requests(t, srv, "direct", "failed"); done != 1 || failed != 1 {
		t.Fatalf("completed %v failed %v", done, failed)
	}
	// An id of yours spans your retries: a failure leaves it open.
	if _, err := c.Guard(ctx, "a", boom, backstop.RequestID("mine")); err == nil {
		t.Fatal("want an error")
	}
	if _, err := c.Guard(ctx, "b", ok, backstop.RequestID("mine"), backstop.Attempt(1)); err != nil || id != "mine" {
		t.Fatalf("Guard: %v (id %q)", err, id)
	}
	f, err := c.FinishRequest(ctx, "mine", backstop.RequestFailed, backstop.FinishOptions{})
	if err != nil || !f.Duplicate || f.Attempts != 2 {
		t.Fatalf("finish: %+v %v", f, err)
	}
	if failed := requests(t, srv, "direct", "failed"); failed != 1 {
		t.Fatalf("failed %v", failed)
	}
}

func TestRequestLowLevel(t *testing.T) {
	srv := startServer(t, requestsConfig)
	c := newClient(t, srv.Addr)
	ctx := ctxT(t)
	d, err := c.Route(ctx, "chat", backstop.RequestID("manual"))
	if err != nil || d.Target != "a" {
		t.Fatalf("Route: %+v %v", d, err)
	}
	if _, err := c.RecordOutcome(ctx, backstop.OutcomeReport{Target: "a", Permit: d.Permit, HTTPStatus: 200,
		RequestID: "manual", Finish: backstop.RequestCompleted}); err != nil {
		t.Fatal(err)
	}
	adm, err := c.CanProceed(ctx, "b", backstop.RequestID("manual-2"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.RecordOutcome(ctx, backstop.OutcomeReport{Target: "b", Permit: adm.Permit, HTTPStatus: 500, RequestID: "manual-2"}); err != nil {
		t.Fatal(err)
	}
	f, err := c.FinishRequest(ctx, "manual-2", backstop.RequestFailed, backstop.FinishOptions{})
	if err != nil || !f.Tracked || f.Duplicate || f.Attempts != 1 || f.Route != "direct" {
		t.Fatalf("finish: %+v %v", f, err)
	}
	f, err = c.FinishRequest(ctx, "elsewhere", backstop.RequestDeferred, backstop.FinishOptions{Route: "chat", Elapsed: 2500 * time.Millisecond, Attempts: 3})
	if err != nil || f.Tracked || f.Duration != 2500*time.Millisecond || f.Attempts != 3 || f.Route != "chat" {
		t.Fatalf("finish (never seen): %+v %v", f, err)
	}
	if a, b, cc := requests(t, srv, "chat", "completed"), requests(t, srv, "direct", "failed"), requests(t, srv, "chat", "deferred"); a != 1 || b != 1 || cc != 1 {
		t.Fatalf("completed %v failed %v deferred %v", a, b, cc)
	}
	if _, err := c.FinishRequest(ctx, "", backstop.RequestFailed, backstop.FinishOptions{}); err == nil {
		t.Fatal("an empty id must be refused")
	}
	if _, err := c.FinishRequest(ctx, "x", backstop.RequestResultUnspecified, backstop.FinishOptions{}); err == nil {
		t.Fatal("an unspecified result must be refused")
	}
}

func TestRequestLocalModeSkipsTheFinish(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	logs := &logRecorder{}
	c := newClient(t, addr, backstop.WithTimeout(200*time.Millisecond), backstop.WithConnectTimeout(200*time.Millisecond),
		backstop.WithLocalRoutes(map[string][]string{"chat": {"a", "b"}}), backstop.WithLogger(logs))
	ctx := ctxT(t)
	var calls []string
	if res, err := c.Call(ctx, "chat", failing(&calls, "a")); err != nil || res.Target != "b" || !res.Local {
		t.Fatalf("Call: %+v %v", res, err)
	}
	if _, err := c.Call(ctx, "chat", failing(&calls, "a", "b")); !errors.Is(err, backstop.ErrAllTargetsFailed) {
		t.Fatalf("Call: %v", err)
	}
	if n := logs.count("could not finish"); n != 0 {
		t.Fatalf("the finish was attempted in local mode:\n%s", logs)
	}
}
