package backstop_test

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	backstop "github.com/backstop-dev/backstop/clients/go"
	"github.com/backstop-dev/backstop/clients/go/backstoptest"
)

// recorder is a provider function for Call that records when it called which target.
type recorder struct {
	prov    *backstoptest.FakeProvider
	targets []string
	times   []time.Time
	max     []uint64
}

func (r *recorder) fn(ctx context.Context, p backstop.Permit) (backstop.Result, error) {
	r.targets = append(r.targets, p.Target)
	r.times = append(r.times, time.Now())
	r.max = append(r.max, p.MaxTokens)
	c, err := r.prov.Complete(ctx, nil, p.Target, "hello")
	if err != nil {
		return backstop.Result{}, err
	}
	return backstop.Result{InputTokens: c.InputTokens, OutputTokens: c.OutputTokens}, nil
}

func equal(a, b []string) bool { return strings.Join(a, ",") == strings.Join(b, ",") }

func TestCallFallsBackPastAFailingPrimary(t *testing.T) {
	srv := startServer(t, fast+chat)
	prov := newProvider(t)
	bs := newClient(t, srv.Addr)
	ctx := ctxT(t)
	prov.SetDefault(sonnet, ptr(backstoptest.Overloaded()))

	r := &recorder{prov: prov}
	res, err := bs.Call(ctx, "chat", r.fn, backstop.EstimatedTokens(100))
	if err != nil {
		t.Fatal(err)
	}
	// Sonnet failed, was retried once per the advice; its second failure
	// opened the breaker and the advice said CIRCUIT_OPEN (fall back, no
	// doomed retry), so gpt-4o served.
	if res.Target != gpt || res.FallbackDepth != 1 || !equal(r.targets, []string{sonnet, sonnet, gpt}) {
		t.Fatalf("served %v, result %+v", r.targets, res)
	}
	if len(res.Errors) != 2 || res.Errors[1].Outcome != backstop.OutcomeTransient {
		t.Fatalf("errors before the success: %v", res.Errors)
	}
	st, _ := bs.GetTarget(ctx, sonnet)
	if backstop.BreakerState(st.GetState()) != backstop.StateOpen {
		t.Fatalf("sonnet state %s", st.GetState())
	}
	r2 := &recorder{prov: prov}
	if res, err := bs.Call(ctx, "chat", r2.fn); err != nil || res.Target != gpt || !equal(r2.targets, []string{gpt}) {
		t.Fatalf("an open primary is skipped without being called: %v %v", r2.targets, err)
	}
	if prov.Calls(sonnet) != 2 {
		t.Fatalf("sonnet called %d times", prov.Calls(sonnet))
	}
}

func TestCallHonoursTheProvidersRetryHint(t *testing.T) {
	srv := startServer(t, fast+chat)
	prov := newProvider(t)
	bs := newClient(t, srv.Addr)
	ctx := ctxT(t)
	prov.Script(sonnet, backstoptest.Behaviour{Status: 429, Header: map[string]string{"retry-after-ms": "400"},
		Body: map[string]interface{}{"error": map[string]interface{}{"type": "rate_limit_error", "message": "slow down"}}})
	r := &recorder{prov: prov}
	if _, err := bs.Call(ctx, "chat", r.fn); err != nil {
		t.Fatal(err)
	}
	if !equal(r.targets, []string{sonnet, sonnet}) {
		t.Fatalf("served %v", r.targets)
	}
	if gap := r.times[1].Sub(r.times[0]); gap < 380*time.Millisecond || gap > time.Second {
		t.Fatalf("the retry came %s after the 429 with retry-after-ms 400", gap)
	}
}

func TestCallBackoffDelays(t *testing.T) {
	// Equal jitter: the retry after attempt n waits between cap/2 and cap, cap = 200ms * 2^n.
	srv := startServer(t, chat+`
[defaults.breaker]
failure_threshold = 10
[defaults.retry]
max_retries = 3
base_delay = "200ms"
max_delay = "2s"
strategy = "equal"
`)
	prov := newProvider(t)
	bs := newClient(t, srv.Addr)
	prov.Script(sonnet, backstoptest.Overloaded(), backstoptest.Overloaded())
	r := &recorder{prov: prov}
	if _, err := bs.Call(ctxT(t), "chat", r.fn); err != nil {
		t.Fatal(err)
	}
	if !equal(r.targets, []string{sonnet, sonnet, sonnet}) {
		t.Fatalf("served %v", r.targets)
	}
	first, second := r.times[1].Sub(r.times[0]), r.times[2].Sub(r.times[1])
	if first < 100*time.Millisecond || first > 450*time.Millisecond {
		t.Errorf("first retry after %s, want 100-200ms (+slack)", first)
	}
	if second < 200*time.Millisecond || second > 650*time.Millisecond {
		t.Errorf("second retry after %s, want 200-400ms (+slack)", second)
	}
}

func TestCallListsEveryErrorWhenAllTargetsFail(t *testing.T) {
	srv := startServer(t, fast+chat)
	prov := newProvider(t)
	bs := newClient(t, srv.Addr)
	ctx := ctxT(t)
	prov.SetDefault(sonnet, ptr(backstoptest.Overloaded()))
	prov.SetDefault(gpt, ptr(backstoptest.Unauthorized()))
	prov.SetDefault(haiku, ptr(backstoptest.ContextLength()))
	r := &recorder{prov: prov}
	_, err := bs.Call(ctx, "chat", r.fn)
	var all *backstop.AllTargetsFailedError
	if !errors.As(err, &all) || !errors.Is(err, backstop.ErrAllTargetsFailed) {
		t.Fatalf("want *AllTargetsFailedError, got %v", err)
	}
	type row struct {
		target string
		class  backstop.OutcomeClass
		reason backstop.Reason
		status int
	}
	var got []row
	for _, e := range all.Errors {
		got = append(got, row{e.Target, e.Outcome, e.Reason, e.HTTPStatus})
	}
	want := []row{
		{sonnet, backstop.OutcomeTransient, 0, 529},
		{sonnet, backstop.OutcomeTransient, 0, 529},
		// The second failure opened the breaker: the advice said CIRCUIT_OPEN.
		{gpt, backstop.OutcomePersistent, 0, 401}, // never retried
		{haiku, backstop.OutcomeBadInput, 0, 400}, // never retried
	}
	if len(got) != len(want) {
		t.Fatalf("errors %v", all.Errors)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("error %d = %+v, want %+v (all: %v)", i, got[i], want[i], all.Errors)
		}
	}
	var he *backstop.HTTPError
	if !errors.As(all.Errors[2].Err, &he) || he.StatusCode != 401 {
		t.Fatalf("the provider's error is kept: %v", all.Errors[2].Err)
	}
	for _, needle := range []string{`route "chat"`, sonnet, gpt, haiku, "http 529", "http 401", "maximum context length"} {
		if !strings.Contains(err.Error(), needle) {
			t.Errorf("message lacks %q:\n%s", needle, err)
		}
	}
	// Every target is now excluded or open: only the BAD_INPUT one is still admissible.
	r2 := &recorder{prov: prov}
	_, err = bs.Call(ctx, "chat", r2.fn)
	if !errors.As(err, &all) || !equal(r2.targets, []string{haiku}) {
		t.Fatalf("second call: %v %v", r2.targets, err)
	}
}

func TestCallPassesContextWindowExcludeAndMaxTokens(t *testing.T) {
	srv := startServer(t, fast+chat+`
[targets."anthropic/sonnet"]
context_window = 200000
max_tokens = 8096
[targets."openai/gpt-4o"]
context_window = 128000
[targets."anthropic/haiku"]
context_window = 200000
max_tokens = 4096
`)
	prov := newProvider(t)
	bs := newClient(t, srv.Addr)
	r := &recorder{prov: prov}
	// Sonnet excluded by the caller, gpt-4o's window too small: haiku serves, with its max_tokens.
	res, err := bs.Call(ctxT(t), "chat", r.fn, backstop.RequiredContextTokens(150000), backstop.Exclude(sonnet))
	if err != nil || res.Target != haiku || r.max[0] != 4096 {
		t.Fatalf("%+v %v %v", res, r.max, err)
	}
}

func TestCallWithCandidatesAndDeadline(t *testing.T) {
	srv := startServer(t, fast)
	prov := newProvider(t)
	bs := newClient(t, srv.Addr)
	prov.SetDefault("x/one", ptr(backstoptest.Unauthorized()))
	r := &recorder{prov: prov}
	res, err := bs.Call(ctxT(t), "", r.fn, backstop.Candidates("x/one", "x/two"))
	if err != nil || res.Target != "x/two" || !equal(r.targets, []string{"x/one", "x/two"}) {
		t.Fatalf("%v %v", r.targets, err)
	}
	// A 429 asking for 5 s does not fit a 1 s deadline: fall back at once instead of sleeping.
	prov.Script("y/one", backstoptest.RateLimitedOpenAI(5*time.Second))
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	r = &recorder{prov: prov}
	start := time.Now()
	res, err = bs.Call(ctx, "", r.fn, backstop.Candidates("y/one", "y/two"))
	if err != nil || res.Target != "y/two" || time.Since(start) > 500*time.Millisecond {
		t.Fatalf("%v %v after %s", r.targets, err, time.Since(start))
	}
}

func TestCallRetriesMalformedOutputWithTheErrorInHand(t *testing.T) {
	srv := startServer(t, fast+chat)
	prov := newProvider(t)
	bs := newClient(t, srv.Addr)
	prov.Script(sonnet, backstoptest.Reply(`{"answer": `), backstoptest.Reply(`{"answer": 42}`))
	var previous []error
	res, err := bs.Call(ctxT(t), "chat", func(ctx context.Context, p backstop.Permit) (backstop.Result, error) {
		previous = append(previous, p.Previous)
		c, err := prov.Complete(ctx, nil, p.Target, "answer in JSON")
		if err != nil {
			return backstop.Result{}, err
		}
		var v struct{ Answer int }
		if err := json.Unmarshal([]byte(c.Text), &v); err != nil {
			return backstop.Result{}, backstop.Malformed(c.Text, err)
		}
		return backstop.Result{}, nil
	})
	if err != nil || res.Target != sonnet || res.Errors[0].Outcome != backstop.OutcomePartial {
		t.Fatalf("%+v %v", res, err)
	}
	var m *backstop.MalformedOutputError
	if len(previous) != 2 || previous[0] != nil || !errors.As(previous[1], &m) || m.Reply != `{"answer": ` {
		t.Fatalf("the retry sees the malformed reply: %v", previous)
	}
	st, _ := bs.GetTarget(ctxT(t), sonnet)
	if st.GetCounters().GetPartial() != 1 || st.GetConsecutiveFailures() != 0 {
		t.Fatalf("PARTIAL is tallied, not a breaker failure: %v", st.GetCounters())
	}
}

func TestCallDefersAndTheWorkerDrains(t *testing.T) {
	srv := startServer(t, fast+chat)
	prov := newProvider(t)
	bs := newClient(t, srv.Addr)
	ctx := ctxT(t)
	for _, m := range []string{sonnet, gpt, haiku} {
		prov.SetDefault(m, ptr(backstoptest.Overloaded()))
	}
	payload := []byte(`{"prompt":"summarise my inbox"}`)
	r := &recorder{prov: prov}
	_, err := bs.Call(ctx, "chat", r.fn, backstop.DeferTo("", payload), backstop.Metadata(map[string]string{"session": "s-1"}))
	var de *backstop.DeferredError
	if !errors.As(err, &de) || !errors.Is(err, backstop.ErrDeferred) {
		t.Fatalf("want a *DeferredError, got %v", err)
	}
	if de.Deferred.ID == "" || de.Deferred.Queue != "chat" || de.Deferred.Message == "" || len(de.Deferred.Errors) == 0 {
		t.Fatalf("deferred = %+v", de.Deferred)
	}
	again, err := bs.Defer(ctx, "chat", payload, backstop.IdempotencyKey("req-42"))
	dup, err2 := bs.Defer(ctx, "chat", payload, backstop.IdempotencyKey("req-42"))
	if err != nil || err2 != nil || dup.ID != again.ID || !dup.Duplicate || again.Duplicate {
		t.Fatalf("idempotent defer: %+v %+v %v %v", again, dup, err, err2)
	}
	stats, _ := bs.QueueStats(ctx, "chat")
	if len(stats) != 1 || stats[0].Depth != 2 {
		t.Fatalf("queue stats %+v", stats)
	}

	// Service restored: the worker drains both items through the route.
	for _, m := range []string{sonnet, gpt, haiku} {
		prov.SetDefault(m, nil)
	}
	var handled []string
	w := backstop.NewDeferredWorker(bs, "chat", func(ctx context.Context, item *backstop.DeferredItem) (backstop.Result, error) {
		if string(item.Payload) != string(payload) || item.Target == "" || item.Permit == "" {
			t.Errorf("item %+v", item)
		}
		handled = append(handled, item.Metadata["session"])
		c, err := prov.Complete(ctx, nil, item.Target, "deferred")
		if err != nil {
			return backstop.Result{}, err
		}
		return backstop.Result{InputTokens: c.InputTokens, OutputTokens: c.OutputTokens}, nil
	})
	w.Wait = 200 * time.Millisecond
	// The breakers opened by the outage admit a probe after 500 ms; the worker waits for it.
	if err := w.RunUntilEmpty(ctx); err != nil {
		t.Fatal(err)
	}
	if s := w.Stats(); s.Acked != 2 || s.Nacked != 0 || len(handled) != 2 {
		t.Fatalf("worker stats %+v, handled %v", s, handled)
	}
	stats, _ = bs.QueueStats(ctx, "chat")
	if len(stats) != 1 || stats[0].Depth != 0 || stats[0].InFlight != 0 {
		t.Fatalf("queue after draining %+v", stats)
	}
}

func TestWorkerNacksFailuresUntilDeadLettered(t *testing.T) {
	srv := startServer(t, fast)
	bs := newClient(t, srv.Addr)
	ctx := ctxT(t)
	if _, err := bs.Defer(ctx, "x/flaky", []byte("p"), backstop.MaxAttempts(2)); err != nil {
		t.Fatal(err)
	}
	w := backstop.NewDeferredWorker(bs, "x/flaky", func(ctx context.Context, item *backstop.DeferredItem) (backstop.Result, error) {
		return backstop.Result{}, backstop.Malformed("nope", errors.New("bad reply"))
	})
	w.Wait, w.RetryDelay = 100*time.Millisecond, 10*time.Millisecond
	if err := w.RunUntilEmpty(ctx); err != nil {
		t.Fatal(err)
	}
	if s := w.Stats(); s.Nacked != 2 || s.DeadLettered != 1 || s.Acked != 0 {
		t.Fatalf("stats %+v", s)
	}
	dead, err := bs.DeadLetters(ctx, "x/flaky")
	if err != nil || len(dead) != 1 || !strings.Contains(dead[0].LastError, "bad reply") {
		t.Fatalf("dead letters %+v %v", dead, err)
	}
	if err := bs.Requeue(ctx, dead[0].ID); err != nil {
		t.Fatal(err)
	}
	if stats, _ := bs.QueueStats(ctx, "x/flaky"); stats[0].Depth != 1 {
		t.Fatalf("requeued: %+v", stats)
	}
}
