package backstop_test

import (
	"context"
	"errors"
	"io"
	"math"
	"net/http"
	"strings"
	"testing"
	"time"

	backstop "github.com/backstop-dev/backstop/clients/go"
)

// Priorities, spend limits and routing strategies against the real server.
const prioritySpendConfig = `
[targets.p]
requests_per_minute = 10
reserve = { interactive = 0.3 }

[targets.m]
cost_per_mtok_input = 3.0
cost_per_mtok_output = 15.0
spend = 0.01
window = "1h"

[targets.a]
[targets.b]

[routes.fast]
targets = ["a", "b"]
strategy = "lowest_latency"
explore = 0.0
`

// (1000 in, 200 out) at $3 / $15 per million tokens: 0.6 cents of the 1 cent an hour.
const (
	spendIn   = 1000
	spendOut  = 200
	spendCost = 0.006
)

func withUsage(ctx context.Context, p backstop.Permit) (backstop.Result, error) {
	return backstop.Result{InputTokens: spendIn, OutputTokens: spendOut}, nil
}

func TestPriorityReserveRefusesBatchWhileInteractivePasses(t *testing.T) {
	srv := startServer(t, prioritySpendConfig)
	bs := newClient(t, srv.Addr)
	ctx := ctxT(t)

	for i := 0; i < 7; i++ {
		a, err := bs.CanProceed(ctx, "p", backstop.AtPriority(backstop.PriorityBatch))
		if err != nil || !a.Allowed {
			t.Fatalf("batch #%d: %+v, %v", i, a, err)
		}
	}
	a, err := bs.CanProceed(ctx, "p", backstop.AtPriority(backstop.PriorityBatch))
	if err != nil || a.Allowed || a.Reason != backstop.ReasonPriorityReserved || a.RetryAfter <= 0 {
		t.Fatalf("8th batch = %+v, %v; want refused PRIORITY_RESERVED with RetryAfter", a, err)
	}
	if a.Reason.String() != "PRIORITY_RESERVED" {
		t.Fatalf("Reason.String() = %q", a.Reason)
	}
	if a, _ := bs.CanProceed(ctx, "p"); a.Reason != backstop.ReasonPriorityReserved {
		t.Fatalf("unset priority (default) = %+v", a)
	}

	// Guard: a typed refusal, fn not called, found as a *RateLimitedError too.
	called := false
	_, err = bs.Guard(ctx, "p", func(context.Context, backstop.Permit) (backstop.Result, error) {
		called = true
		return backstop.Result{}, nil
	}, backstop.AtPriority(backstop.PriorityDefault))
	var pr *backstop.PriorityReservedError
	var rl *backstop.RateLimitedError
	if called || !errors.As(err, &pr) || !errors.As(err, &rl) || !errors.Is(err, backstop.ErrRefused) {
		t.Fatalf("Guard at default priority: called=%v err=%v (%T)", called, err, err)
	}
	if pr.RetryAfter <= 0 || rl.Reason != backstop.ReasonPriorityReserved {
		t.Fatalf("refusal = %+v / %+v", pr.Refusal, rl.Refusal)
	}

	// Call passes the priority down: batch is refused, interactive is served.
	_, err = bs.Call(ctx, "", withUsage, backstop.Candidates("p"), backstop.AtPriority(backstop.PriorityBatch))
	var all *backstop.AllTargetsFailedError
	if !errors.As(err, &all) || len(all.Errors) != 1 || all.Errors[0].Reason != backstop.ReasonPriorityReserved ||
		all.Errors[0].Outcome != backstop.OutcomeUnspecified {
		t.Fatalf("Call at batch: %v", err)
	}
	res, err := bs.Call(ctx, "", withUsage, backstop.Candidates("p"), backstop.AtPriority(backstop.PriorityInteractive))
	if err != nil || res.Target != "p" {
		t.Fatalf("Call at interactive: %+v, %v", res, err)
	}
	for i := 0; i < 2; i++ {
		if a, err := bs.CanProceed(ctx, "p", backstop.AtPriority(backstop.PriorityInteractive)); err != nil || !a.Allowed {
			t.Fatalf("interactive #%d: %+v, %v", i, a, err)
		}
	}
	if a, _ := bs.CanProceed(ctx, "p", backstop.AtPriority(backstop.PriorityInteractive)); a.Reason != backstop.ReasonRateLimited {
		t.Fatalf("interactive beyond the budget = %+v", a)
	}
	st, err := bs.GetTarget(ctx, "p")
	if err != nil || st.GetConsecutiveFailures() != 0 || st.GetCounters().GetTransient() != 0 {
		t.Fatalf("refusals must not count as provider failures: %v, %v", st, err)
	}
}

func TestSpendLimitRefusalSurfacesWithRetryAfterAndRecordSaysTheCost(t *testing.T) {
	srv := startServer(t, prioritySpendConfig)
	bs := newClient(t, srv.Addr)
	ctx := ctxT(t)

	first, err := bs.CanProceed(ctx, "m", backstop.EstimatedTokens(spendIn), backstop.MaxOutputTokens(spendOut))
	if err != nil || !first.Allowed {
		t.Fatalf("first = %+v, %v", first, err)
	}
	// 0.3 cents of input + 0.15 of output on top of the 0.6 reserved does not fit the 1 cent.
	a, err := bs.CanProceed(ctx, "m", backstop.EstimatedTokens(spendIn), backstop.MaxOutputTokens(100))
	if err != nil || a.Allowed || a.Reason != backstop.ReasonSpendLimit || a.RetryAfter <= 0 {
		t.Fatalf("over the spend limit = %+v, %v", a, err)
	}
	out, err := bs.RecordOutcome(ctx, backstop.OutcomeReport{Target: "m", Permit: first.Permit, Outcome: backstop.OutcomeSuccess,
		InputTokens: spendIn, OutputTokens: spendOut})
	if err != nil || math.Abs(out.Cost-spendCost) > 1e-9 {
		t.Fatalf("record = %+v, %v; want cost %v", out, err, spendCost)
	}

	called := false
	_, err = bs.Guard(ctx, "m", func(context.Context, backstop.Permit) (backstop.Result, error) {
		called = true
		return backstop.Result{}, nil
	}, backstop.EstimatedTokens(spendIn), backstop.MaxOutputTokens(spendOut))
	var sl *backstop.SpendLimitError
	var rl *backstop.RateLimitedError
	var refused backstop.RefusedError
	if called || !errors.As(err, &sl) || !errors.As(err, &rl) || !errors.As(err, &refused) || !errors.Is(err, backstop.ErrRefused) {
		t.Fatalf("Guard over the spend limit: called=%v err=%v (%T)", called, err, err)
	}
	if sl.Reason != backstop.ReasonSpendLimit || sl.Target != "m" || sl.RetryAfter <= 0 || refused.Details().RetryAfter != sl.RetryAfter {
		t.Fatalf("refusal = %+v", sl.Refusal)
	}
	if !strings.Contains(err.Error(), "SPEND_LIMIT") || !strings.Contains(err.Error(), "retry in") {
		t.Fatalf("message = %q", err)
	}

	calls := 0
	_, err = bs.Call(ctx, "", func(ctx context.Context, p backstop.Permit) (backstop.Result, error) {
		calls++
		return withUsage(ctx, p)
	}, backstop.Candidates("m"), backstop.EstimatedTokens(spendIn), backstop.MaxOutputTokens(spendOut))
	var all *backstop.AllTargetsFailedError
	if calls != 0 || !errors.As(err, &all) || len(all.Errors) != 1 {
		t.Fatalf("Call over the spend limit: calls=%d err=%v", calls, err)
	}
	if e := all.Errors[0]; e.Target != "m" || e.Reason != backstop.ReasonSpendLimit || e.RetryAfter <= 0 || all.RetryAfter <= 0 {
		t.Fatalf("attempt error = %+v (RetryAfter %v)", e, all.RetryAfter)
	}
	st, err := bs.GetTarget(ctx, "m")
	if err != nil || st.GetState().String() != "BREAKER_STATE_CLOSED" || st.GetConsecutiveFailures() != 0 {
		t.Fatalf("a spend refusal is not a provider failure: %v, %v", st, err)
	}
}

func TestGuardOutcomeCarriesTheCost(t *testing.T) {
	srv := startServer(t, prioritySpendConfig)
	bs := newClient(t, srv.Addr)
	out, err := bs.Guard(ctxT(t), "m", withUsage, backstop.EstimatedTokens(spendIn), backstop.MaxOutputTokens(spendOut))
	if err != nil || math.Abs(out.Cost-spendCost) > 1e-9 {
		t.Fatalf("Guard = %+v, %v; want cost %v", out, err, spendCost)
	}
}

func TestRouteStrategyAndReason(t *testing.T) {
	srv := startServer(t, prioritySpendConfig)
	bs := newClient(t, srv.Addr)
	ctx := ctxT(t)

	own, err := bs.Route(ctx, "fast")
	if err != nil || own.Strategy != backstop.StrategyLowestLatency || !strings.HasPrefix(own.Reason, "lowest_latency") {
		t.Fatalf("route's own strategy: %+v, %v", own, err)
	}
	busy, err := bs.Route(ctx, "fast", backstop.Strategy(backstop.StrategyLeastBusy), backstop.AtPriority(backstop.PriorityInteractive))
	if err != nil || busy.Strategy != backstop.StrategyLeastBusy || !strings.HasPrefix(busy.Reason, "least_busy") {
		t.Fatalf("least_busy: %+v, %v", busy, err)
	}
	if busy.Strategy.String() != "LEAST_BUSY" {
		t.Fatalf("Strategy.String() = %q", busy.Strategy)
	}
	cheap, err := bs.Route(ctx, "fast", backstop.Strategy(backstop.StrategyLowestCost), backstop.EstimatedTokens(100), backstop.ExpectedOutputTokens(50))
	if err != nil || cheap.Strategy != backstop.StrategyLowestCost || cheap.Reason == "" {
		t.Fatalf("lowest_cost: %+v, %v", cheap, err)
	}
	ordered, err := bs.Route(ctx, "", backstop.Candidates("a", "b"), backstop.Strategy(backstop.StrategyOrdered))
	if err != nil || ordered.Target != "a" || ordered.Strategy != backstop.StrategyOrdered {
		t.Fatalf("ordered: %+v, %v", ordered, err)
	}
	res, err := bs.Call(ctx, "fast", withUsage, backstop.Strategy(backstop.StrategyMostHeadroom), backstop.AtPriority(backstop.PriorityBatch))
	if err != nil || (res.Target != "a" && res.Target != "b") {
		t.Fatalf("Call with a strategy: %+v, %v", res, err)
	}
}

func TestFailSafeAcceptsPriorityAndStrategy(t *testing.T) {
	bs := newClient(t, "127.0.0.1:1", backstop.WithTimeout(50*time.Millisecond), backstop.WithConnectTimeout(200*time.Millisecond))
	ctx := ctxT(t)
	a, err := bs.CanProceed(ctx, "m", backstop.AtPriority(backstop.PriorityBatch), backstop.MaxOutputTokens(spendOut))
	if err != nil || !a.Allowed || !a.Local {
		t.Fatalf("local admission = %+v, %v", a, err)
	}
	d, err := bs.Route(ctx, "", backstop.Candidates("a", "b"), backstop.Strategy(backstop.StrategyLowestCost),
		backstop.AtPriority(backstop.PriorityInteractive), backstop.MaxOutputTokens(1), backstop.ExpectedOutputTokens(1))
	if err != nil || !d.Local || d.Target != "a" || d.Strategy != backstop.StrategyOrdered || !strings.Contains(d.Reason, "lowest_cost") {
		t.Fatalf("local route = %+v, %v", d, err)
	}
	out, err := bs.Guard(ctx, "a", withUsage, backstop.AtPriority(backstop.PriorityInteractive), backstop.MaxOutputTokens(spendOut))
	if err != nil || !out.Local || out.Cost != 0 {
		t.Fatalf("local guard = %+v, %v", out, err)
	}
	res, err := bs.Call(ctx, "", withUsage, backstop.Candidates("a"), backstop.AtPriority(backstop.PriorityBatch), backstop.Strategy(backstop.StrategyLeastBusy))
	if err != nil || !res.Local {
		t.Fatalf("local call = %+v, %v", res, err)
	}
}

func TestTransportOptionsCarryPriorityAndSurfaceTheRefusal(t *testing.T) {
	srv := startServer(t, prioritySpendConfig)
	bs := newClient(t, srv.Addr)
	calls := 0
	tr := &backstop.Transport{
		Client: bs,
		Target: func(*http.Request) string { return "p" },
		Options: func(*http.Request) []backstop.CallOption {
			return []backstop.CallOption{backstop.AtPriority(backstop.PriorityBatch)}
		},
		Base: roundTripFunc(func(r *http.Request) (*http.Response, error) {
			calls++
			return &http.Response{StatusCode: 200, Header: http.Header{"Content-Type": {"application/json"}},
				Body: io.NopCloser(strings.NewReader(`{}`)), Request: r}, nil
		}),
	}
	do := func() error {
		req, _ := http.NewRequestWithContext(ctxT(t), http.MethodPost, "http://provider.invalid/v1/chat", strings.NewReader(`{}`))
		resp, err := tr.RoundTrip(req)
		if err == nil {
			_, _ = io.ReadAll(resp.Body)
			resp.Body.Close()
		}
		return err
	}
	for i := 0; i < 7; i++ {
		if err := do(); err != nil {
			t.Fatalf("batch #%d: %v", i, err)
		}
	}
	err := do()
	var pr *backstop.PriorityReservedError
	if !errors.As(err, &pr) || pr.RetryAfter <= 0 || calls != 7 {
		t.Fatalf("8th batch request: err=%v (%T), provider calls=%d", err, err, calls)
	}
}

func TestClaimAndTheWorkerAdmitAtTheirPriority(t *testing.T) {
	srv := startServer(t, prioritySpendConfig)
	bs := newClient(t, srv.Addr)
	ctx := ctxT(t)
	for i := 0; i < 7; i++ {
		if a, err := bs.CanProceed(ctx, "p", backstop.AtPriority(backstop.PriorityBatch)); err != nil || !a.Allowed {
			t.Fatalf("batch #%d: %+v, %v", i, a, err)
		}
	}
	if _, err := bs.Defer(ctx, "p", []byte("later")); err != nil {
		t.Fatal(err)
	}
	held, err := bs.Claim(ctx, "p", backstop.ClaimOptions{Priority: backstop.PriorityBatch})
	if err != nil || len(held.Items) != 0 || held.BlockedReason != backstop.ReasonPriorityReserved || held.RetryAfter <= 0 {
		t.Fatalf("batch claim = %+v, %v", held, err)
	}
	var handled []string
	w := backstop.NewDeferredWorker(bs, "p", func(ctx context.Context, item *backstop.DeferredItem) (backstop.Result, error) {
		handled = append(handled, string(item.Payload))
		return backstop.Result{}, nil
	})
	w.Priority = backstop.PriorityInteractive
	w.Wait = 100 * time.Millisecond
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := w.RunUntilEmpty(rctx); err != nil {
		t.Fatal(err)
	}
	if len(handled) != 1 || handled[0] != "later" {
		t.Fatalf("handled = %q", handled)
	}
}
