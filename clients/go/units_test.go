package backstop

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Shaped like openai-go's *openai.Error: StatusCode, Response, Type, Code,
// Message, and RawJSON() with the inner error object.
type openaiStyleError struct {
	Code       string
	Type       string
	Message    string
	StatusCode int
	Response   *http.Response
	raw        string
}

func (e *openaiStyleError) Error() string   { return fmt.Sprintf("%d %s", e.StatusCode, e.Message) }
func (e *openaiStyleError) RawJSON() string { return e.raw }

// Shaped like anthropic-sdk-go's *anthropic.Error: the whole body in RawJSON().
type anthropicStyleError struct {
	StatusCode int
	Response   *http.Response
	raw        string
}

func (e *anthropicStyleError) Error() string   { return fmt.Sprint(e.StatusCode) }
func (e *anthropicStyleError) RawJSON() string { return e.raw }

// Shaped like googleapi.Error: Code, Header, Body.
type googleStyleError struct {
	Code   int
	Header http.Header
	Body   string
}

func (e *googleStyleError) Error() string { return "googleapi" }

func TestObserveErrorReadsProviderShapes(t *testing.T) {
	resp := &http.Response{StatusCode: 429, Header: http.Header{"Retry-After": {"3"}, "X-Ratelimit-Remaining-Requests": {"0"}, "Server": {"x"}}}
	cases := []struct {
		name   string
		err    error
		status int
		etype  string
		header string
	}{
		{"openai-go 429 quota", &openaiStyleError{Code: "insufficient_quota", Type: "insufficient_quota", Message: "You exceeded your current quota",
			StatusCode: 429, Response: resp, raw: `{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}`},
			429, "insufficient_quota: You exceeded your current quota", "retry-after"},
		{"anthropic-sdk-go 529", &anthropicStyleError{StatusCode: 529, Response: &http.Response{StatusCode: 529},
			raw: `{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}`}, 529, "overloaded_error: Overloaded", ""},
		{"credit balance only in the message", &anthropicStyleError{StatusCode: 400,
			raw: `{"type":"error","error":{"type":"invalid_request_error","message":"Your credit balance is too low"}}`},
			400, "invalid_request_error: Your credit balance is too low", ""},
		{"wrapped by the caller", fmt.Errorf("ask: %w", &HTTPError{StatusCode: 503, Body: []byte(`{"error":{"message":"The server is overloaded","type":"server_error","code":"server_is_overloaded"}}`)}),
			503, "server_error server_is_overloaded: The server is overloaded", ""},
		{"gemini", &googleStyleError{Code: 429, Header: http.Header{}, Body: `{"error":{"code":429,"message":"Quota exceeded","status":"RESOURCE_EXHAUSTED"}}`},
			429, "429 RESOURCE_EXHAUSTED: Quota exceeded", ""},
	}
	for _, tc := range cases {
		obs := observeError(tc.err)
		if obs.Outcome != OutcomeUnspecified || obs.HTTPStatus != tc.status || obs.ErrorType != tc.etype {
			t.Errorf("%s: got %s %d %q, want the server to classify %d %q", tc.name, obs.Outcome, obs.HTTPStatus, obs.ErrorType, tc.status, tc.etype)
		}
		if tc.header != "" && obs.Headers[tc.header] == "" {
			t.Errorf("%s: headers %v lack %s", tc.name, obs.Headers, tc.header)
		}
	}
}

func TestObserveErrorClassifiesWhatTheServerCannotSee(t *testing.T) {
	var syntax *json.SyntaxError
	jsonErr := json.Unmarshal([]byte("{"), &struct{}{})
	errors.As(jsonErr, &syntax)
	refused := &url.Error{Op: "Post", URL: "http://x", Err: &net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}}
	timeout := &url.Error{Op: "Post", URL: "http://x", Err: context.DeadlineExceeded}
	cases := []struct {
		name string
		err  error
		want OutcomeClass
	}{
		{"deadline", context.DeadlineExceeded, OutcomeTimeout},
		{"http client timeout", timeout, OutcomeTimeout},
		{"os deadline", os.ErrDeadlineExceeded, OutcomeTimeout},
		{"connection refused", refused, OutcomeTransient},
		{"reset mid-body", fmt.Errorf("read: %w", syscall.ECONNRESET), OutcomeTransient},
		{"unexpected EOF", io.ErrUnexpectedEOF, OutcomeTransient},
		{"bad JSON", jsonErr, OutcomePartial},
		{"malformed", Malformed("x", errors.New("no")), OutcomePartial},
		{"structured", &StructuredOutputError{Corrections: 1}, OutcomePartial},
		{"cancelled", fmt.Errorf("stop: %w", context.Canceled), OutcomeBadInput},
		{"agent bug", errors.New("nil map"), OutcomeBadInput},
	}
	for _, tc := range cases {
		obs := observeError(tc.err)
		if obs.Outcome != tc.want || obs.HTTPStatus != 0 {
			t.Errorf("%s: %s, want %s", tc.name, obs.Outcome, tc.want)
		}
	}
	if et := observeError(errors.New("boom")).ErrorType; et != "client_error: errors.errorString" {
		t.Errorf("error type %q", et)
	}
}

func TestNormalizeHeadersKeepsSignalsFirstWithinBounds(t *testing.T) {
	h := http.Header{}
	for i := 0; i < 100; i++ {
		h.Set(fmt.Sprintf("X-Filler-%03d", i), "v")
	}
	h.Add("Retry-After", "2")
	h.Add("X-Ratelimit-Reset-Requests", "6m0s")
	h.Add("Set-Cookie", "a")
	h.Add("Set-Cookie", "b")
	got := NormalizeHeaders(h)
	if len(got) != MaxHeaders || got["retry-after"] != "2" || got["x-ratelimit-reset-requests"] != "6m0s" {
		t.Fatalf("%d headers, signals %q %q", len(got), got["retry-after"], got["x-ratelimit-reset-requests"])
	}
	big := http.Header{"Retry-After": {"1"}, "X-Big": {strings.Repeat("x", MaxHeaderBytes)}}
	if got := NormalizeHeaders(big); len(got) != 1 || got["retry-after"] != "1" {
		t.Fatalf("byte bound: %v", len(got))
	}
	if got := NormalizeHeaders(http.Header{"Set-Cookie": {"a", "b"}}); got["set-cookie"] != "a, b" {
		t.Fatalf("repeated: %v", got)
	}
	if et := composeErrorType("t", "t", strings.Repeat("é", 300)); len(et) > MaxErrorType || !strings.HasPrefix(et, "t: é") {
		t.Fatalf("clipped error type: %d bytes", len(et))
	}
}

func TestClassifyIsTheServersTaxonomy(t *testing.T) {
	cases := []struct {
		status int
		etype  string
		want   OutcomeClass
	}{
		{200, "", OutcomeSuccess},
		{429, "rate_limit_exceeded", OutcomeRateLimited},
		{429, "insufficient_quota", OutcomePersistent},
		{400, "invalid_request_error: Your credit balance is too low", OutcomePersistent},
		{401, "authentication_error", OutcomePersistent},
		{403, "", OutcomePersistent},
		{408, "", OutcomeTimeout},
		{500, "", OutcomeTransient},
		{529, "overloaded_error", OutcomeTransient},
		{400, "context_length_exceeded", OutcomeBadInput},
		{404, "", OutcomeBadInput},
		{0, "timeout: url.Error", OutcomeTimeout},
		{0, "invalid_api_key", OutcomePersistent},
		{0, "RESOURCE_EXHAUSTED", OutcomeRateLimited},
		{0, "connection reset", OutcomeTransient},
	}
	for _, tc := range cases {
		if got := Classify(OutcomeUnspecified, tc.status, tc.etype); got != tc.want {
			t.Errorf("%d %q: %s, want %s", tc.status, tc.etype, got, tc.want)
		}
	}
	if Classify(OutcomePartial, 500, "") != OutcomePartial {
		t.Error("an explicit class wins")
	}
}

func TestRetryHint(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	cases := []struct {
		h    map[string]string
		want time.Duration
	}{
		{map[string]string{"retry-after": "2"}, 2 * time.Second},
		{map[string]string{"Retry-After-Ms": "400"}, 400 * time.Millisecond},
		{map[string]string{"retry-after": "1", "retry-after-ms": "1500"}, 1500 * time.Millisecond},
		{map[string]string{"retry-after": now.Add(30 * time.Second).Format(http.TimeFormat)}, 30 * time.Second},
		{map[string]string{"retry-after": "-1"}, 0},
		{map[string]string{"retry-after": "soon"}, 0},
		{nil, 0},
	}
	for _, tc := range cases {
		if got := RetryHint(tc.h, 0, now); got != tc.want {
			t.Errorf("%v: %s, want %s", tc.h, got, tc.want)
		}
	}
	if RetryHint(nil, 3*time.Second, now) != 3*time.Second {
		t.Error("explicit hint")
	}
}

func TestFullJitterBounds(t *testing.T) {
	base, max := 100*time.Millisecond, time.Second
	for attempt := 0; attempt < 70; attempt++ {
		ceiling := base << uint(attempt)
		if attempt > 10 || ceiling > max {
			ceiling = max
		}
		if got := FullJitter(attempt, base, max, 0.999999); got > ceiling || got < ceiling*99/100 {
			t.Fatalf("attempt %d: %s, ceiling %s", attempt, got, ceiling)
		}
		if got := FullJitter(attempt, base, max, 0); got != 0 {
			t.Fatalf("attempt %d: the floor of full jitter is 0, got %s", attempt, got)
		}
	}
	if FullJitter(2, base, max, 0.5) != 200*time.Millisecond {
		t.Fatal("uniform draw scales the ceiling")
	}
}

type fakeClock struct{ t time.Time }

func (c *fakeClock) now() time.Time          { return c.t }
func (c *fakeClock) advance(d time.Duration) { c.t = c.t.Add(d) }

func newTestEngine() (*localEngine, *fakeClock) {
	clk := &fakeClock{t: time.Unix(1000, 0)}
	e := newLocalEngine(LocalPolicy{FailureThreshold: 2, SuccessThreshold: 2, OpenDuration: time.Second,
		ProbeLease: 500 * time.Millisecond, MaxRetries: 2, BaseDelay: 100 * time.Millisecond, MaxDelay: time.Second})
	e.now = clk.now
	e.rand = func() float64 { return 0.5 }
	return e, clk
}

func TestLocalBreakerOpensProbesAndCloses(t *testing.T) {
	e, clk := newTestEngine()
	fail := func(permit string, attempt int) OutcomeResult {
		return e.record(OutcomeReport{Target: "m", Permit: permit, HTTPStatus: 529, Attempt: attempt})
	}
	a := e.admit("m")
	if !a.Allowed || !a.Local || !strings.HasPrefix(a.Permit, localPermitPrefix) {
		t.Fatalf("%+v", a)
	}
	r := fail(a.Permit, 0)
	if r.State != StateClosed || !r.Retry.Retry || r.Retry.Delay != 50*time.Millisecond {
		t.Fatalf("first failure: %+v (full jitter 0.5 x 100ms)", r)
	}
	if r := fail(e.admit("m").Permit, 1); r.State != StateOpen || r.Retry.Delay != 100*time.Millisecond {
		t.Fatalf("second failure opens: %+v", r)
	}
	if a := e.admit("m"); a.Allowed || a.Reason != ReasonCircuitOpen || a.RetryAfter != time.Second {
		t.Fatalf("open: %+v", a)
	}
	clk.advance(time.Second)
	probe := e.admit("m")
	if !probe.Allowed || probe.State != StateHalfOpen {
		t.Fatalf("half-open probe: %+v", probe)
	}
	if a := e.admit("m"); a.Allowed || a.Reason != ReasonProbeLimit {
		t.Fatalf("one probe at a time: %+v", a)
	}
	clk.advance(600 * time.Millisecond) // the probe never reported: its lease is reclaimed
	probe = e.admit("m")
	if !probe.Allowed {
		t.Fatalf("lease reclaimed: %+v", probe)
	}
	e.record(OutcomeReport{Target: "m", Permit: probe.Permit, HTTPStatus: 200})
	probe = e.admit("m")
	if r := e.record(OutcomeReport{Target: "m", Permit: probe.Permit, HTTPStatus: 200}); r.State != StateClosed {
		t.Fatalf("two probe successes close it: %+v", r)
	}
	if r := fail("", 2); r.Retry.Retry || r.Retry.Reason != RetryReasonMaxRetries {
		t.Fatalf("max retries: %+v", r)
	}
}

func TestLocalEngineTaxonomyEffects(t *testing.T) {
	e, clk := newTestEngine()
	r := e.record(OutcomeReport{Target: "q", HTTPStatus: 429, ErrorType: "insufficient_quota"})
	if r.ClassifiedAs != OutcomePersistent || r.State != StateOpen || r.Retry.Retry {
		t.Fatalf("quota: %+v", r)
	}
	for i := 0; i < 5; i++ {
		if r := e.record(OutcomeReport{Target: "b", HTTPStatus: 400}); r.State != StateClosed || r.Retry.Retry {
			t.Fatalf("bad input never opens: %+v", r)
		}
	}
	r = e.record(OutcomeReport{Target: "p", HTTPStatus: 429, Headers: map[string]string{"retry-after": "3"}})
	if r.ClassifiedAs != OutcomeRateLimited || r.Retry.Delay != 3*time.Second || r.State != StateClosed {
		t.Fatalf("429 with a hint: %+v", r)
	}
	if a := e.admit("p"); a.Allowed || a.Reason != ReasonRateLimited || a.RetryAfter != 3*time.Second {
		t.Fatalf("paused: %+v", a)
	}
	clk.advance(3 * time.Second)
	if a := e.admit("p"); !a.Allowed {
		t.Fatalf("pause over: %+v", a)
	}
	e.seedOpen("s", 2*time.Second)
	if a := e.admit("s"); a.Allowed || a.RetryAfter != 2*time.Second {
		t.Fatalf("a fleet refusal carried into local mode: %+v", a)
	}
	d := e.route([]string{"s", "x", "y"}, []string{"x"}, StrategyUnspecified)
	if d.Target != "y" || d.FallbackDepth != 2 || len(d.Skipped) != 2 || d.Skipped[1].Reason != ReasonExcluded {
		t.Fatalf("local route: %+v", d)
	}
}

func TestRouteMemoryLearnsTheServersOrder(t *testing.T) {
	m := newRouteMemory(nil)
	m.learn("chat", RouteDecision{Target: "c", Skipped: []Skip{{Target: "a"}, {Target: "b"}}})
	m.learn("chat", RouteDecision{Target: "a"})
	m.learn("chat", RouteDecision{Target: "d", Skipped: []Skip{{Target: "a"}, {Target: "b"}, {Target: "c"}}})
	if got := strings.Join(m.candidates("chat"), ","); got != "a,b,c,d" {
		t.Fatalf("learned %s", got)
	}
}

func TestUnknownEnumValuesAreNamedNotRejected(t *testing.T) {
	if s := Reason(42).String(); s != "Reason(42)" {
		t.Fatal(s)
	}
	if ReasonCircuitOpen.String() != "CIRCUIT_OPEN" || StateHalfOpen.String() != "HALF_OPEN" {
		t.Fatal("known names")
	}
	err := refusalError(Admission{Target: "t", Reason: Reason(42)})
	var other *OtherRefusalError
	if !errors.As(err, &other) || !errors.Is(err, ErrRefused) {
		t.Fatalf("%T", err)
	}
}

func TestUsageShapes(t *testing.T) {
	cases := map[string][2]uint64{
		`{"usage":{"input_tokens":3,"output_tokens":4}}`:                                          {3, 4},
		`{"usage":{"prompt_tokens":5,"completion_tokens":6}}`:                                     {5, 6},
		`{"type":"message_start","message":{"usage":{"input_tokens":7}}}`:                         {7, 0},
		`{"type":"response.completed","response":{"usage":{"input_tokens":8,"output_tokens":9}}}`: {8, 9},
	}
	for body, want := range cases {
		in, out, ok := Usage([]byte(body))
		if !ok || in != want[0] || out != want[1] {
			t.Errorf("%s: %d %d %v", body, in, out, ok)
		}
	}
	if _, _, ok := Usage([]byte(`{"choices":[]}`)); ok {
		t.Error("no usage")
	}
}
