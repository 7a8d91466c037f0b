package backstop_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	backstop "github.com/backstop-dev/backstop/clients/go"
	"github.com/backstop-dev/backstop/clients/go/backstoptest"
	pb "github.com/backstop-dev/backstop/clients/go/backstopv1"
)

// openAIish is what an OpenAI-style SDK does with its *http.Client: POST
// /v1/chat/completions, read the whole body, turn non-2xx into its own error.
type sdkError struct {
	Status int
	Body   string
}

func (e *sdkError) Error() string { return "sdk: status " + http.StatusText(e.Status) }

func chatCompletion(ctx context.Context, hc *http.Client, base, model string, stream bool) (string, error) {
	body, _ := json.Marshal(map[string]interface{}{"model": model, "stream": stream,
		"messages": []interface{}{map[string]string{"role": "user", "content": "hi"}}})
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, base+"/v1/chat/completions", bytes.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	resp, err := hc.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode >= 300 {
		return "", &sdkError{Status: resp.StatusCode, Body: string(data)}
	}
	return string(data), nil
}

// byModel names targets "openai/MODEL" from the body, as DefaultTarget does for api.openai.com.
func byModel(req *http.Request) string {
	t := backstop.DefaultTarget(req)
	if i := strings.IndexByte(t, '/'); i >= 0 {
		return "openai" + t[i:]
	}
	return ""
}

type outcomes struct {
	mu  sync.Mutex
	all []backstop.OutcomeResult
}

func (o *outcomes) add(_ *http.Request, r backstop.OutcomeResult) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.all = append(o.all, r)
}

func (o *outcomes) last() backstop.OutcomeResult {
	o.mu.Lock()
	defer o.mu.Unlock()
	if len(o.all) == 0 {
		return backstop.OutcomeResult{}
	}
	return o.all[len(o.all)-1]
}

func (o *outcomes) n() int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return len(o.all)
}

func tokensAvailable(t *testing.T, bs *backstop.Client, target string) float64 {
	st, err := bs.GetTarget(context.Background(), target)
	if err != nil {
		t.Fatal(err)
	}
	for _, ks := range st.GetKeySlots() {
		for _, b := range ks.GetBudgets() {
			if b.GetKind() == "tokens" {
				return b.GetAvailable()
			}
		}
	}
	t.Fatalf("%s has no token budget", target)
	return 0
}

func TestTransportGuardsAnSDKTransparently(t *testing.T) {
	srv := startServer(t, fast+`
[targets."openai/gpt-4o"]
tokens = 1000000
window = "1h"
`)
	prov := newProvider(t)
	bs := newClient(t, srv.Addr)
	ctx := ctxT(t)
	seen := &outcomes{}
	hc := &http.Client{Transport: &backstop.Transport{Client: bs, Target: byModel, OnOutcome: seen.add}}

	// A success: status, headers and the usage in the JSON body are reported.
	prov.Script(gpt, backstoptest.Behaviour{Status: 200, OutputTokens: 40000})
	if _, err := chatCompletion(ctx, hc, prov.URL, "gpt-4o", false); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 2*time.Second, "the success report", func() bool { return seen.n() == 1 })
	if seen.last().ClassifiedAs != backstop.OutcomeSuccess {
		t.Fatalf("%+v", seen.last())
	}
	if avail := tokensAvailable(t, bs, gpt); avail > 1000000-40000+2000 {
		t.Fatalf("usage not settled: %v tokens available", avail)
	}

	// Streaming: the usage chunk of the event stream is read too.
	before := tokensAvailable(t, bs, gpt)
	prov.Script(gpt, backstoptest.Behaviour{Status: 200, OutputTokens: 30000})
	text, err := chatCompletion(ctx, hc, prov.URL, "gpt-4o", true)
	if err != nil || !strings.Contains(text, "[DONE]") {
		t.Fatalf("%q %v", text, err)
	}
	waitFor(t, 2*time.Second, "the stream's report", func() bool { return seen.n() == 2 })
	if after := tokensAvailable(t, bs, gpt); before-after < 29000 {
		t.Fatalf("stream usage not settled: %v -> %v", before, after)
	}

	// A 429 with the provider's headers: the SDK still gets the full error
	// body, and the fleet is paused for the hint.
	prov.Script(gpt, backstoptest.RateLimitedOpenAI(2*time.Second))
	_, err = chatCompletion(ctx, hc, prov.URL, "gpt-4o", false)
	var se *sdkError
	if !errors.As(err, &se) || se.Status != 429 || !strings.Contains(se.Body, "rate_limit_exceeded") {
		t.Fatalf("the SDK sees the provider's answer unchanged: %v", err)
	}
	if last := seen.last(); last.ClassifiedAs != backstop.OutcomeRateLimited {
		t.Fatalf("%+v", last)
	}
	calls := prov.Calls(gpt)
	_, err = chatCompletion(ctx, hc, prov.URL, "gpt-4o", false)
	var rl *backstop.RateLimitedError
	if !errors.As(err, &rl) || rl.RetryAfter < time.Second || rl.Target != gpt {
		t.Fatalf("want a *RateLimitedError through the SDK's error, got %v", err)
	}
	if prov.Calls(gpt) != calls {
		t.Fatal("a refused request never reaches the provider")
	}

	// Requests that name no model (listing models...) pass through unguarded.
	resp, err := hc.Get(prov.URL + "/v1/models")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if st, _ := bs.GetTarget(ctx, "openai/"); st != nil {
		t.Fatal("no target for a request without a model")
	}
}

func TestTransportInsideGuardDoesNotAdmitTwice(t *testing.T) {
	srv := startServer(t, fast+chat)
	prov := newProvider(t)
	bs := newClient(t, srv.Addr)
	ctx := ctxT(t)
	hc := &http.Client{Transport: &backstop.Transport{Client: bs, Target: byModel}}
	// An SDK error type the client cannot read: the Transport saw the 503 on the wire.
	opaque := func(ctx context.Context, p backstop.Permit) (backstop.Result, error) {
		_, err := chatCompletion(ctx, hc, prov.URL, strings.TrimPrefix(p.Target, "openai/"), false)
		if err != nil {
			return backstop.Result{}, errors.New("sdk: something went wrong")
		}
		return backstop.Result{}, nil
	}
	prov.Script(gpt, backstoptest.Unavailable())
	out, err := bs.Guard(ctx, gpt, opaque)
	if err == nil || out.ClassifiedAs != backstop.OutcomeTransient {
		t.Fatalf("classified from the wire: %+v %v", out, err)
	}
	if _, err := bs.Call(ctx, "", opaque, backstop.Candidates(gpt)); err != nil {
		t.Fatal(err)
	}
	st, _ := bs.GetTarget(ctx, gpt)
	if c := st.GetCounters(); c.GetAdmitted() != 2 || c.GetSuccess() != 1 || c.GetTransient() != 1 {
		t.Fatalf("one admission per guarded call: %v", c)
	}
	// A success whose headers say the request budget is spent: the guard
	// reports them, and the fleet pauses before the provider answers 429.
	prov.Script(gpt, backstoptest.Behaviour{Status: 200, Header: map[string]string{
		"x-ratelimit-limit-requests": "500", "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s"}})
	if _, err := bs.Guard(ctx, gpt, opaque); err != nil {
		t.Fatal(err)
	}
	if a, _ := bs.CanProceed(ctx, gpt); a.Allowed || a.Reason != backstop.ReasonRateLimited {
		t.Fatalf("paused by the success's headers: %+v", a)
	}
}

func TestDefaultTarget(t *testing.T) {
	cases := map[string]struct{ url, body, want string }{
		"openai":    {"https://api.openai.com/v1/chat/completions", `{"model":"gpt-4o","messages":[]}`, "openai/gpt-4o"},
		"anthropic": {"https://api.anthropic.com/v1/messages", `{"max_tokens":10,"model":"claude-sonnet-4-5"}`, "anthropic/claude-sonnet-4-5"},
		"gemini":    {"https://generativelanguage.googleapis.com/v1beta/models/gemini-2.0-flash:generateContent", `{}`, "google/gemini-2.0-flash"},
		"azure":     {"https://my.openai.azure.com/openai/deployments/x/chat/completions", `{"model":"gpt-4o"}`, "openai/gpt-4o"},
		"other":     {"http://127.0.0.1:8080/v1/messages", `{"model":"m"}`, "127.0.0.1/m"},
		"no model":  {"https://api.openai.com/v1/models", ``, ""},
	}
	for name, tc := range cases {
		req, _ := http.NewRequest(http.MethodPost, tc.url, strings.NewReader(tc.body))
		if got := backstop.DefaultTarget(req); got != tc.want {
			t.Errorf("%s: %q, want %q", name, got, tc.want)
		}
	}
	ctx := backstop.WithTarget(context.Background(), "custom/x")
	if got, ok := backstop.TargetFrom(ctx); !ok || got != "custom/x" {
		t.Fatal(got)
	}
}

func TestTransportNamesTargetsFromTheRequestContext(t *testing.T) {
	srv := startServer(t, fast)
	prov := newProvider(t)
	bs := newClient(t, srv.Addr)
	// A body the Transport must read to find nothing, and give back intact.
	var got []byte
	base := roundTripFunc(func(r *http.Request) (*http.Response, error) {
		got, _ = io.ReadAll(r.Body)
		return &http.Response{StatusCode: 200, Header: http.Header{"Content-Type": {"application/json"}},
			Body: io.NopCloser(strings.NewReader(`{"usage":{"input_tokens":3,"output_tokens":4}}`)), Request: r}, nil
	})
	hc := &http.Client{Transport: &backstop.Transport{Client: bs, Base: base}}
	body := strings.Repeat("x", 1000)
	req, _ := http.NewRequestWithContext(backstop.WithTarget(ctxT(t), "custom/model"), http.MethodPost, prov.URL+"/v1/x", io.NopCloser(strings.NewReader(body)))
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if string(got) != body {
		t.Fatalf("the request body reached the provider intact: %d bytes", len(got))
	}
	waitFor(t, 2*time.Second, "the report", func() bool {
		st, err := bs.GetTarget(context.Background(), "custom/model")
		return err == nil && st.GetCounters().GetSuccess() == 1
	})
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

func TestWatchStreamsEventsAndResumesAcrossARestart(t *testing.T) {
	srv := startServer(t, fast)
	bs := newClient(t, srv.Addr, backstop.WithReconnectInterval(50*time.Millisecond))
	ctx, cancel := context.WithCancel(ctxT(t))
	events := bs.Watch(ctx, backstop.WatchOptions{Targets: []string{sonnet}})
	next := func(kind pb.EventKind) backstop.Event {
		t.Helper()
		timeout := time.After(10 * time.Second)
		for {
			select {
			case e, ok := <-events:
				if !ok || e.Err != nil {
					t.Fatalf("stream ended: %v", e.Err)
				}
				if e.Kind == kind {
					return e
				}
			case <-timeout:
				t.Fatalf("no %s event", kind)
			}
		}
	}
	next(pb.EventKind_EVENT_KIND_SNAPSHOT)
	fail := func(context.Context, backstop.Permit) (backstop.Result, error) {
		return backstop.Result{}, &backstop.HTTPError{StatusCode: 529}
	}
	_, _ = bs.Guard(ctx, sonnet, fail)
	_, _ = bs.Guard(ctx, sonnet, fail)
	e := next(pb.EventKind_EVENT_KIND_BREAKER_TRANSITION)
	if tr := e.Raw.GetBreakerTransition(); e.Target != sonnet || tr.GetTo() != pb.BreakerState_BREAKER_STATE_OPEN || tr.GetCaller() != "go-test" {
		t.Fatalf("%v", e.Raw)
	}
	// The server restarts: the watch resumes by itself and sees what follows.
	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	if _, err := bs.SetBreakerState(ctx, sonnet, backstop.ModeForceOpen, "maintenance"); err != nil {
		t.Fatal(err)
	}
	f := next(pb.EventKind_EVENT_KIND_TARGET_FORCED)
	if f.Raw.GetTargetForced().GetReason() != "maintenance" || f.Seq <= e.Seq {
		t.Fatalf("%v (seq %d after %d)", f.Raw, f.Seq, e.Seq)
	}
	cancel()
	for e := range events {
		if e.Err != nil && !errors.Is(e.Err, context.Canceled) {
			t.Fatalf("closing event: %v", e.Err)
		}
	}
}
