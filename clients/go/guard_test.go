package backstop_test

import (
	"context"
	"errors"
	"net/http"
	"testing"
	"time"

	backstop "github.com/backstop-dev/backstop/clients/go"
	"github.com/backstop-dev/backstop/clients/go/backstoptest"
)

func TestGuardReportsSuccessAndSettlesUsage(t *testing.T) {
	srv := startServer(t, fast+`
[targets."anthropic/sonnet"]
tokens = 1000000
window = "1h"
`)
	prov := newProvider(t)
	bs := newClient(t, srv.Addr)
	ctx := ctxT(t)
	prov.Script(sonnet, backstoptest.Behaviour{Status: 200, OutputTokens: 50000})

	var served []string
	out, err := bs.Guard(ctx, sonnet, completion(prov, nil, &served))
	if err != nil {
		t.Fatal(err)
	}
	if out.ClassifiedAs != backstop.OutcomeSuccess || out.State != backstop.StateClosed || out.Local {
		t.Fatalf("outcome = %+v", out)
	}
	st, err := bs.GetTarget(ctx, sonnet)
	if err != nil {
		t.Fatal(err)
	}
	if st.GetCounters().GetSuccess() != 1 || st.GetCounters().GetAdmitted() != 1 {
		t.Fatalf("counters = %v", st.GetCounters())
	}
	// The 50000 output tokens the provider reported were charged to the budget.
	var tokens float64 = -1
	for _, ks := range st.GetKeySlots() {
		for _, b := range ks.GetBudgets() {
			if b.GetKind() == "tokens" {
				tokens = b.GetAvailable()
			}
		}
	}
	if tokens < 0 || tokens > 1000000-50000+2000 {
		t.Fatalf("token budget available = %v, want about 950000", tokens)
	}
}

func TestGuardRefusesOnceTheBreakerOpens(t *testing.T) {
	srv := startServer(t, fast)
	prov := newProvider(t)
	bs := newClient(t, srv.Addr)
	ctx := ctxT(t)
	prov.SetDefault(sonnet, ptr(backstoptest.Overloaded()))

	var served []string
	fn := completion(prov, nil, &served)
	out, err := bs.Guard(ctx, sonnet, fn)
	var he *backstop.HTTPError
	if !errors.As(err, &he) || he.StatusCode != 529 {
		t.Fatalf("the provider's error is returned unchanged: got %v", err)
	}
	if out.ClassifiedAs != backstop.OutcomeTransient || out.State != backstop.StateClosed || !out.Retry.Retry {
		t.Fatalf("first 529: %+v", out)
	}
	out, _ = bs.Guard(ctx, sonnet, fn)
	if out.State != backstop.StateOpen {
		t.Fatalf("second 529 should open the breaker (threshold 2): %+v", out)
	}
	_, err = bs.Guard(ctx, sonnet, func(context.Context, backstop.Permit) (backstop.Result, error) {
		t.Fatal("must not be called while the breaker is open")
		return backstop.Result{}, nil
	})
	var open *backstop.CircuitOpenError
	if !errors.As(err, &open) || !errors.Is(err, backstop.ErrRefused) {
		t.Fatalf("want *CircuitOpenError, got %T %v", err, err)
	}
	if open.Reason != backstop.ReasonCircuitOpen || open.RetryAfter <= 0 || open.RetryAfter > 500*time.Millisecond || open.Local {
		t.Fatalf("refusal = %+v", open.Refusal)
	}
	var refused backstop.RefusedError
	if !errors.As(err, &refused) || refused.Details().Target != sonnet {
		t.Fatalf("RefusedError interface: %v", err)
	}
	if prov.Calls(sonnet) != 2 {
		t.Fatalf("provider calls = %d, want 2", prov.Calls(sonnet))
	}
}

func TestGuardLetsTheServerClassify(t *testing.T) {
	srv := startServer(t, fast)
	prov := newProvider(t)
	bs := newClient(t, srv.Addr)
	ctx := ctxT(t)
	cases := []struct {
		target string
		b      backstoptest.Behaviour
		class  backstop.OutcomeClass
		retry  bool
		state  backstop.BreakerState
	}{
		// A 429 that is really an exhausted quota: PERSISTENT, opens at once, never retried.
		{"openai/quota", backstoptest.InsufficientQuota(), backstop.OutcomePersistent, false, backstop.StateOpen},
		{"anthropic/key", backstoptest.Unauthorized(), backstop.OutcomePersistent, false, backstop.StateOpen},
		// The request itself is wrong: never touches the breaker, never retried.
		{"openai/ctx", backstoptest.ContextLength(), backstop.OutcomeBadInput, false, backstop.StateClosed},
		{"openai/busy", backstoptest.Unavailable(), backstop.OutcomeTransient, true, backstop.StateClosed},
		{"anthropic/slow", backstoptest.RateLimitedAnthropic(2 * time.Second), backstop.OutcomeRateLimited, true, backstop.StateClosed},
	}
	for _, tc := range cases {
		prov.Script(tc.target, tc.b)
		var served []string
		out, err := bs.Guard(ctx, tc.target, completion(prov, nil, &served))
		if err == nil {
			t.Fatalf("%s: want the provider's error", tc.target)
		}
		if out.ClassifiedAs != tc.class || out.Retry.Retry != tc.retry || out.State != tc.state {
			t.Errorf("%s: got class %s retry %v state %s, want %s %v %s", tc.target, out.ClassifiedAs, out.Retry.Retry, out.State, tc.class, tc.retry, tc.state)
		}
	}
	// The 429's retry-after paused the target for the whole fleet.
	_, err := bs.Guard(ctx, "anthropic/slow", func(context.Context, backstop.Permit) (backstop.Result, error) {
		t.Fatal("must not be called while paused")
		return backstop.Result{}, nil
	})
	var rl *backstop.RateLimitedError
	if !errors.As(err, &rl) || rl.RetryAfter < time.Second || rl.RetryAfter > 2*time.Second {
		t.Fatalf("want *RateLimitedError with about 2s RetryAfter, got %v", err)
	}
}

func TestGuardReportsPanicsAndCancellationAsTheAgentsOwn(t *testing.T) {
	srv := startServer(t, fast)
	bs := newClient(t, srv.Addr)
	ctx := ctxT(t)
	func() {
		defer func() {
			if r := recover(); r != "boom" {
				t.Fatalf("the panic is re-raised, got %v", r)
			}
		}()
		_, _ = bs.Guard(ctx, sonnet, func(context.Context, backstop.Permit) (backstop.Result, error) { panic("boom") })
	}()
	cctx, cancel := context.WithCancel(ctx)
	out, err := bs.Guard(cctx, sonnet, func(ctx context.Context, _ backstop.Permit) (backstop.Result, error) {
		cancel()
		return backstop.Result{}, ctx.Err()
	})
	if !errors.Is(err, context.Canceled) || out.ClassifiedAs != backstop.OutcomeBadInput {
		t.Fatalf("cancelled call: %v %+v", err, out)
	}
	st, _ := bs.GetTarget(ctx, sonnet)
	c := st.GetCounters()
	if c.GetBadInput() != 2 || c.GetTransient() != 0 || st.GetConsecutiveFailures() != 0 {
		t.Fatalf("panic and cancellation are BAD_INPUT, never a provider failure: %v", c)
	}
}

func TestGuardResultCanReportAFailureWithoutAnError(t *testing.T) {
	srv := startServer(t, fast)
	bs := newClient(t, srv.Addr)
	ctx := ctxT(t)
	out, err := bs.Guard(ctx, sonnet, func(context.Context, backstop.Permit) (backstop.Result, error) {
		return backstop.Result{HTTPStatus: 503, Header: http.Header{"Retry-After": {"1"}}}, nil
	})
	var he *backstop.HTTPError
	if !errors.As(err, &he) || he.StatusCode != 503 || out.ClassifiedAs != backstop.OutcomeTransient {
		t.Fatalf("status-only failure: %v %+v", err, out)
	}
	out, err = bs.Guard(ctx, sonnet, func(context.Context, backstop.Permit) (backstop.Result, error) {
		return backstop.Result{Outcome: backstop.OutcomePartial}, nil
	})
	if err == nil || out.ClassifiedAs != backstop.OutcomePartial || out.Retry.Reason != backstop.RetryReasonCorrectAndRetry {
		t.Fatalf("partial: %v %+v", err, out)
	}
}

func ptr(b backstoptest.Behaviour) *backstoptest.Behaviour { return &b }
