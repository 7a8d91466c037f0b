package backstop_test

// The Go runner of the language-neutral conformance suite
// (clients/conformance/README.md is the spec): every scenario file is played
// against the real server through this client's public API, with an
// in-process scripted provider whose errors are shaped like the Go SDKs'.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	backstop "github.com/backstop-dev/backstop/clients/go"
	"github.com/backstop-dev/backstop/clients/go/backstoptest"
	pb "github.com/backstop-dev/backstop/clients/go/backstopv1"
	"google.golang.org/grpc/codes"
)

// capabilities this client has (README: Capabilities).
var capabilities = map[string]bool{"worker": true, "reconcile": true}

type scenario struct {
	Schema      string                  `json:"$schema"`
	Format      int                     `json:"format"`
	Name        string                  `json:"name"`
	Description string                  `json:"description"`
	Requires    []string                `json:"requires"`
	Config      string                  `json:"config"`
	Client      *clientOptions          `json:"client"`
	Provider    map[string]targetScript `json:"provider"`
	Steps       []step                  `json:"steps"`
}

type clientOptions struct {
	TimeoutMs           *int64              `json:"timeout_ms"`
	Policy              string              `json:"policy"`
	ReconnectIntervalMs *int64              `json:"reconnect_interval_ms"`
	ConnectTimeoutMs    *int64              `json:"connect_timeout_ms"`
	Caller              *string             `json:"caller"`
	LocalRoutes         map[string][]string `json:"local_routes"`
	LocalPolicy         *struct {
		FailureThreshold         int   `json:"failure_threshold"`
		SuccessThreshold         int   `json:"success_threshold"`
		OpenDurationMs           int64 `json:"open_duration_ms"`
		PersistentOpenDurationMs int64 `json:"persistent_open_duration_ms"`
		MaxRetries               int   `json:"max_retries"`
		BaseDelayMs              int64 `json:"base_delay_ms"`
		MaxDelayMs               int64 `json:"max_delay_ms"`
	} `json:"local_policy"`
}

type targetScript struct {
	Script  []response `json:"script"`
	Default *response  `json:"default"`
}

type response struct {
	Status    int               `json:"status"`
	Text      *string           `json:"text"`
	Usage     *usage            `json:"usage"`
	SDK       string            `json:"sdk"`
	Headers   map[string]string `json:"headers"`
	LatencyMs int64             `json:"latency_ms"`
	Error     *struct {
		Type    string `json:"type"`
		Code    string `json:"code"`
		Message string `json:"message"`
	} `json:"error"`
	Failure string `json:"failure"`
}

type usage struct {
	InputTokens  uint64 `json:"input_tokens"`
	OutputTokens uint64 `json:"output_tokens"`
}

type rng struct {
	Min *float64 `json:"min"`
	Max *float64 `json:"max"`
}

func (r *rng) check(v float64) error {
	if r == nil {
		return nil
	}
	if r.Min != nil && v < *r.Min {
		return fmt.Errorf("%v < min %v", v, *r.Min)
	}
	if r.Max != nil && v > *r.Max {
		return fmt.Errorf("%v > max %v", v, *r.Max)
	}
	return nil
}

type step struct {
	Op                    string          `json:"op"`
	Comment               string          `json:"comment"`
	Route                 json.RawMessage `json:"route"`
	EstimatedTokens       uint64          `json:"estimated_tokens"`
	RequiredContextTokens uint64          `json:"required_context_tokens"`
	Exclude               []string        `json:"exclude"`
	Defer                 *struct {
		Payload        string            `json:"payload"`
		Metadata       map[string]string `json:"metadata"`
		IdempotencyKey string            `json:"idempotency_key"`
	} `json:"defer"`
	Structured *struct {
		Schema         map[string]interface{} `json:"schema"`
		MaxCorrections *int                   `json:"max_corrections"`
	} `json:"structured"`
	Target   string                      `json:"target"`
	Attempt  int                         `json:"attempt"`
	Script   []response                  `json:"script"`
	Default  json.RawMessage             `json:"default"`
	Mode     string                      `json:"mode"`
	WithinMs int64                       `json:"within_ms"`
	Action   string                      `json:"action"`
	Queue    string                      `json:"queue"`
	Targets  map[string]targetExpect     `json:"targets"`
	Queues   map[string]map[string]int64 `json:"queues"`
	Expect   *expectation                `json:"expect"`
}

type targetExpect struct {
	State               string                     `json:"state"`
	ConsecutiveFailures *uint32                    `json:"consecutive_failures"`
	Counters            map[string]uint64          `json:"counters"`
	KeySlots            map[string]map[string]bool `json:"key_slots"`
	Budgets             map[string]*rng            `json:"budgets"`
	Exists              *bool                      `json:"exists"`
}

type callExpect struct {
	Target     string  `json:"target"`
	KeySlot    *string `json:"key_slot"`
	Correction *int    `json:"correction"`
}

type expectation struct {
	Result *struct {
		Text     *string          `json:"text"`
		Value    *json.RawMessage `json:"value"`
		Deferred *struct {
			MessageContains string `json:"message_contains"`
		} `json:"deferred"`
	} `json:"result"`
	Error *struct {
		Type            string   `json:"type"`
		Reason          string   `json:"reason"`
		RetryAfterMs    *rng     `json:"retry_after_ms"`
		Status          int      `json:"status"`
		Local           *bool    `json:"local"`
		MessageContains []string `json:"message_contains"`
	} `json:"error"`
	Calls *[]callExpect `json:"calls"`
	Gaps  []struct {
		After int      `json:"after"`
		MinMs *float64 `json:"min_ms"`
		MaxMs *float64 `json:"max_ms"`
	} `json:"gaps"`
	MaxDurationMs *int64 `json:"max_duration_ms"`
	Mode          string `json:"mode"`
	Admission     *struct {
		Local   *bool   `json:"local"`
		KeySlot *string `json:"key_slot"`
	} `json:"admission"`
	Outcome *struct {
		ClassifiedAs string `json:"classified_as"`
		State        string `json:"state"`
		Retry        *bool  `json:"retry"`
		RetryReason  string `json:"retry_reason"`
		DelayMs      *rng   `json:"delay_ms"`
	} `json:"outcome"`
	Handled *[]struct {
		Target  string `json:"target"`
		Payload string `json:"payload"`
	} `json:"handled"`
}

// --- the scripted provider, with Go-SDK-shaped errors ------------------------------

// Shaped like anthropic-sdk-go's *anthropic.Error.
type anthropicSDKError struct {
	StatusCode int
	Request    *http.Request
	Response   *http.Response
	raw        string
}

func (e *anthropicSDKError) Error() string {
	return fmt.Sprintf("POST %q: %d %s", "https://api.anthropic.com/v1/messages", e.StatusCode, e.raw)
}
func (e *anthropicSDKError) RawJSON() string { return e.raw }

// Shaped like openai-go's *openai.Error: RawJSON is the inner error object.
type openaiSDKError struct {
	Code       string
	Message    string
	Param      string
	Type       string
	StatusCode int
	Request    *http.Request
	Response   *http.Response
	raw        string
}

func (e *openaiSDKError) Error() string {
	return fmt.Sprintf("POST %q: %d %s", "https://api.openai.com/v1/chat/completions", e.StatusCode, e.raw)
}
func (e *openaiSDKError) RawJSON() string { return e.raw }

type callRecord struct {
	target, keySlot string
	correction      int
	started, ended  time.Time
}

type fake struct {
	mu       sync.Mutex
	scripts  map[string][]response
	defaults map[string]*response
	calls    []callRecord
	raised   error
}

func (f *fake) next(target string) *response {
	f.mu.Lock()
	defer f.mu.Unlock()
	if q := f.scripts[target]; len(q) > 0 {
		f.scripts[target] = q[1:]
		return &q[0]
	}
	return f.defaults[target]
}

var errClientBug = errors.New("TypeError: cannot read property 'content' of undefined (a bug in the agent's own code)")

func (f *fake) call(ctx context.Context, target, keySlot string, correction int) (string, backstop.Result, error) {
	rec := callRecord{target: target, keySlot: keySlot, correction: correction, started: time.Now()}
	defer func() {
		rec.ended = time.Now()
		f.mu.Lock()
		f.calls = append(f.calls, rec)
		f.mu.Unlock()
	}()
	r := f.next(target)
	if r == nil {
		r = &response{}
	}
	if r.LatencyMs > 0 {
		select {
		case <-time.After(time.Duration(r.LatencyMs) * time.Millisecond):
		case <-ctx.Done():
			return "", backstop.Result{}, ctx.Err()
		}
	}
	header := http.Header{}
	for k, v := range r.Headers {
		header.Set(k, v)
	}
	raise := func(err error) (string, backstop.Result, error) {
		f.mu.Lock()
		f.raised = err
		f.mu.Unlock()
		return "", backstop.Result{}, err
	}
	switch r.Failure {
	case "timeout":
		return raise(&url.Error{Op: "Post", URL: "https://provider.invalid/v1", Err: context.DeadlineExceeded})
	case "connection":
		return raise(&url.Error{Op: "Post", URL: "https://provider.invalid/v1", Err: &net.OpError{Op: "dial", Net: "tcp",
			Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}})
	case "client_bug":
		return raise(errClientBug)
	case "":
	default:
		panic("unknown failure " + r.Failure)
	}
	status := r.Status
	if status == 0 {
		status = 200
	}
	resp := &http.Response{StatusCode: status, Header: header}
	if status >= 300 {
		e := r.Error
		if e == nil {
			e = &struct {
				Type    string `json:"type"`
				Code    string `json:"code"`
				Message string `json:"message"`
			}{}
		}
		if r.SDK == "openai" {
			inner := map[string]interface{}{"message": e.Message, "type": e.Type, "param": nil, "code": nil}
			if e.Code != "" {
				inner["code"] = e.Code
			}
			raw, _ := json.Marshal(inner)
			return raise(&openaiSDKError{Code: e.Code, Message: e.Message, Type: e.Type, StatusCode: status, Response: resp, raw: string(raw)})
		}
		raw, _ := json.Marshal(map[string]interface{}{"type": "error", "error": map[string]interface{}{"type": e.Type, "message": e.Message}})
		return raise(&anthropicSDKError{StatusCode: status, Response: resp, raw: string(raw)})
	}
	text := "reply from " + target
	if r.Text != nil {
		text = *r.Text
	}
	u := usage{InputTokens: 10, OutputTokens: 20}
	if r.Usage != nil {
		u = *r.Usage
	}
	return text, backstop.Result{InputTokens: u.InputTokens, OutputTokens: u.OutputTokens, Header: header}, nil
}

// --- the runner ------------------------------------------------------------------

func TestConformance(t *testing.T) {
	root, err := backstoptest.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	files, _ := filepath.Glob(filepath.Join(root, "clients", "conformance", "scenarios", "*.json"))
	if len(files) == 0 {
		t.Fatal("no scenarios in clients/conformance/scenarios")
	}
	for _, file := range files {
		file := file
		name := strings.TrimSuffix(filepath.Base(file), ".json")
		t.Run(name, func(t *testing.T) {
			sc := loadScenario(t, file)
			if sc.Name != name {
				t.Fatalf("name %q differs from the file stem %q", sc.Name, name)
			}
			for _, req := range sc.Requires {
				if !capabilities[req] {
					t.Skipf("requires capability %q", req)
				}
			}
			runScenario(t, sc)
		})
	}
}

func loadScenario(t *testing.T, file string) *scenario {
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var sc scenario
	if err := dec.Decode(&sc); err != nil {
		t.Fatalf("cannot parse %s: %v", filepath.Base(file), err)
	}
	if sc.Format != 1 {
		t.Fatalf("unknown format %d", sc.Format)
	}
	return &sc
}

type runner struct {
	t        *testing.T
	sc       *scenario
	srv      *backstoptest.Server
	bs       *backstop.Client
	fake     *fake
	bindings map[string]string
}

func ms(p *int64, def int64) time.Duration {
	if p != nil {
		return time.Duration(*p) * time.Millisecond
	}
	return time.Duration(def) * time.Millisecond
}

func runScenario(t *testing.T, sc *scenario) {
	srv, err := backstoptest.Start(sc.Config)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	co := sc.Client
	if co == nil {
		co = &clientOptions{}
	}
	caller := "conformance"
	if co.Caller != nil {
		caller = *co.Caller
	}
	opts := []backstop.Option{
		backstop.WithTimeout(ms(co.TimeoutMs, 1000)),
		backstop.WithReconnectInterval(ms(co.ReconnectIntervalMs, 100)),
		backstop.WithConnectTimeout(ms(co.ConnectTimeoutMs, 1000)),
		backstop.WithCaller(caller),
		backstop.WithLocalRoutes(co.LocalRoutes),
		backstop.WithLogger(nil),
	}
	switch co.Policy {
	case "", "fail_open":
	case "fail_closed":
		opts = append(opts, backstop.WithPolicy(backstop.FailClosed))
	default:
		t.Fatalf("unknown policy %q", co.Policy)
	}
	if lp := co.LocalPolicy; lp != nil {
		opts = append(opts, backstop.WithLocalPolicy(backstop.LocalPolicy{
			FailureThreshold: lp.FailureThreshold, SuccessThreshold: lp.SuccessThreshold,
			OpenDuration: time.Duration(lp.OpenDurationMs) * time.Millisecond, PersistentOpenDuration: time.Duration(lp.PersistentOpenDurationMs) * time.Millisecond,
			MaxRetries: lp.MaxRetries, BaseDelay: time.Duration(lp.BaseDelayMs) * time.Millisecond, MaxDelay: time.Duration(lp.MaxDelayMs) * time.Millisecond,
		}))
	}
	bs, err := backstop.New(srv.Addr, opts...)
	if err != nil {
		t.Fatal(err)
	}
	defer bs.Close()
	f := &fake{scripts: map[string][]response{}, defaults: map[string]*response{}}
	for target, s := range sc.Provider {
		f.scripts[target] = append([]response(nil), s.Script...)
		f.defaults[target] = s.Default
	}
	r := &runner{t: t, sc: sc, srv: srv, bs: bs, fake: f, bindings: map[string]string{}}
	for i := range sc.Steps {
		if err := r.step(&sc.Steps[i]); err != nil {
			t.Fatalf("%s: step %d (%s): %v", sc.Name, i, sc.Steps[i].Op, err)
		}
	}
}

func (r *runner) step(s *step) error {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	switch s.Op {
	case "call":
		return r.call(ctx, s)
	case "guard":
		return r.guard(ctx, s)
	case "provider":
		r.fake.mu.Lock()
		r.fake.scripts[s.Target] = append(r.fake.scripts[s.Target], s.Script...)
		if len(s.Default) > 0 {
			var d *response
			dec := json.NewDecoder(bytes.NewReader(s.Default))
			dec.DisallowUnknownFields()
			if err := dec.Decode(&d); err != nil {
				r.fake.mu.Unlock()
				return fmt.Errorf("default: %v", err)
			}
			r.fake.defaults[s.Target] = d
		}
		r.fake.mu.Unlock()
		return nil
	case "kill_server":
		r.srv.Kill()
		return nil
	case "restart_server":
		return r.srv.Restart()
	case "wait_mode":
		within := ms(&s.WithinMs, 10000)
		if s.WithinMs == 0 {
			within = 10 * time.Second
		}
		deadline := time.Now().Add(within)
		for string(r.bs.Mode()) != s.Mode {
			if time.Now().After(deadline) {
				return fmt.Errorf("mode is %s, not %s, after %s", r.bs.Mode(), s.Mode, within)
			}
			time.Sleep(10 * time.Millisecond)
		}
		return nil
	case "admin":
		var err error
		switch s.Action {
		case "force_open":
			_, err = r.bs.SetBreakerState(ctx, s.Target, backstop.ModeForceOpen, "conformance")
		case "force_closed":
			_, err = r.bs.SetBreakerState(ctx, s.Target, backstop.ModeForceClosed, "conformance")
		case "automatic":
			_, err = r.bs.SetBreakerState(ctx, s.Target, backstop.ModeAutomatic, "conformance")
		case "reset":
			_, err = r.bs.ResetTarget(ctx, s.Target)
		default:
			return fmt.Errorf("unknown admin action %q", s.Action)
		}
		return err
	case "drain":
		return r.drain(s)
	case "expect_server":
		deadline := time.Now().Add(time.Duration(s.WithinMs) * time.Millisecond)
		for {
			err := r.expectServer(ctx, s)
			if err == nil || time.Now().After(deadline) {
				return err
			}
			time.Sleep(25 * time.Millisecond)
		}
	}
	return fmt.Errorf("unknown op %q", s.Op)
}

type stepResult struct {
	text      *string
	value     interface{}
	deferred  *backstop.Deferred
	err       error
	admission *backstop.Permit
	outcome   *backstop.OutcomeResult
	calls     []callRecord
	took      time.Duration
}

func (r *runner) call(ctx context.Context, s *step) error {
	var opts []backstop.CallOption
	route := ""
	var asName string
	if err := json.Unmarshal(s.Route, &asName); err == nil {
		route = asName
	} else {
		var list []string
		if err := json.Unmarshal(s.Route, &list); err != nil {
			return fmt.Errorf("route: %v", err)
		}
		opts = append(opts, backstop.Candidates(list...))
	}
	opts = append(opts, backstop.EstimatedTokens(s.EstimatedTokens), backstop.RequiredContextTokens(s.RequiredContextTokens), backstop.Exclude(s.Exclude...))
	if d := s.Defer; d != nil {
		opts = append(opts, backstop.DeferTo("", []byte(d.Payload)), backstop.Metadata(d.Metadata), backstop.IdempotencyKey(d.IdempotencyKey))
	}
	var text *string
	var value interface{}
	var fn backstop.Func
	if st := s.Structured; st != nil {
		max := 2
		if st.MaxCorrections != nil {
			max = *st.MaxCorrections
		}
		if max == 0 {
			max = -1
		}
		fn = backstop.Structured(func(ctx context.Context, p backstop.Permit, c *backstop.Correction) (string, backstop.Result, error) {
			n := 0
			if c != nil {
				n = c.Number
			}
			return r.fake.call(ctx, p.Target, p.KeySlot, n)
		}, backstop.StructuredOptions{Schema: st.Schema, MaxCorrections: max}, &value)
	} else {
		fn = func(ctx context.Context, p backstop.Permit) (backstop.Result, error) {
			t, res, err := r.fake.call(ctx, p.Target, p.KeySlot, 0)
			if err == nil {
				text = &t
			}
			return res, err
		}
	}
	n := r.callsSoFar()
	start := time.Now()
	_, err := r.bs.Call(ctx, route, fn, opts...)
	res := stepResult{text: text, err: err, calls: r.callsSince(n), took: time.Since(start)}
	var de *backstop.DeferredError
	if errors.As(err, &de) {
		res.deferred, res.err = &de.Deferred, nil
	}
	if s.Structured != nil && err == nil {
		res.value = value
	}
	return r.check(s.Expect, res)
}

func (r *runner) guard(ctx context.Context, s *step) error {
	var text *string
	var permit backstop.Permit
	n := r.callsSoFar()
	start := time.Now()
	out, err := r.bs.Guard(ctx, s.Target, func(ctx context.Context, p backstop.Permit) (backstop.Result, error) {
		permit = p
		t, res, err := r.fake.call(ctx, p.Target, p.KeySlot, 0)
		if err == nil {
			text = &t
		}
		return res, err
	}, backstop.EstimatedTokens(s.EstimatedTokens), backstop.Attempt(s.Attempt))
	res := stepResult{text: text, err: err, calls: r.callsSince(n), took: time.Since(start)}
	if permit.Target != "" {
		res.admission = &permit
		res.outcome = &out
	}
	return r.check(s.Expect, res)
}

func (r *runner) drain(s *step) error {
	within := time.Duration(s.WithinMs) * time.Millisecond
	if within == 0 {
		within = 10 * time.Second
	}
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	type handled struct{ target, payload string }
	var got []handled
	n := r.callsSoFar()
	w := backstop.NewDeferredWorker(r.bs, s.Queue, func(ctx context.Context, item *backstop.DeferredItem) (backstop.Result, error) {
		got = append(got, handled{item.Target, string(item.Payload)})
		_, res, err := r.fake.call(ctx, item.Target, item.KeySlot, 0)
		return res, err
	})
	w.Wait = 200 * time.Millisecond
	if err := w.RunUntilEmpty(ctx); err != nil {
		return err
	}
	if ctx.Err() != nil {
		return fmt.Errorf("the queue was not drained within %s", within)
	}
	e := s.Expect
	if e == nil {
		return nil
	}
	if e.Handled != nil {
		if len(*e.Handled) != len(got) {
			return fmt.Errorf("handled %v, want %v", got, *e.Handled)
		}
		for i, h := range *e.Handled {
			if got[i] != (handled{h.Target, h.Payload}) {
				return fmt.Errorf("handled %v, want %v", got, *e.Handled)
			}
		}
	}
	return r.checkCalls(e, r.callsSince(n))
}

func (r *runner) callsSoFar() int {
	r.fake.mu.Lock()
	defer r.fake.mu.Unlock()
	return len(r.fake.calls)
}

func (r *runner) callsSince(n int) []callRecord {
	r.fake.mu.Lock()
	defer r.fake.mu.Unlock()
	return append([]callRecord(nil), r.fake.calls[n:]...)
}

// bind checks a string expectation, which may be a binding "=NAME".
func (r *runner) bind(want, got string) error {
	if !strings.HasPrefix(want, "=") {
		if want != got {
			return fmt.Errorf("%q, want %q", got, want)
		}
		return nil
	}
	name := want[1:]
	if v, ok := r.bindings[name]; ok {
		if v != got {
			return fmt.Errorf("%q, want %q (bound to %s)", got, v, want)
		}
		return nil
	}
	for other, v := range r.bindings {
		if v == got {
			return fmt.Errorf("%q is already bound to =%s, cannot bind %s", got, other, want)
		}
	}
	r.bindings[name] = got
	return nil
}

func lower(s fmt.Stringer) string { return strings.ToLower(s.String()) }

func (r *runner) checkCalls(e *expectation, calls []callRecord) error {
	if e.Calls != nil {
		want := *e.Calls
		var got []string
		for _, c := range calls {
			got = append(got, fmt.Sprintf("%s[%s]#%d", c.target, c.keySlot, c.correction))
		}
		if len(want) != len(calls) {
			return fmt.Errorf("calls %v, want %d call(s) %+v", got, len(want), want)
		}
		for i, w := range want {
			c := calls[i]
			if w.Target != c.target {
				return fmt.Errorf("call %d to %s, want %s (calls %v)", i, c.target, w.Target, got)
			}
			if w.KeySlot != nil {
				if err := r.bind(*w.KeySlot, c.keySlot); err != nil {
					return fmt.Errorf("call %d key slot: %v", i, err)
				}
			}
			if w.Correction != nil && *w.Correction != c.correction {
				return fmt.Errorf("call %d correction %d, want %d", i, c.correction, *w.Correction)
			}
		}
	}
	for _, g := range e.Gaps {
		if g.After+1 >= len(calls) {
			return fmt.Errorf("no call after call %d", g.After)
		}
		gap := float64(calls[g.After+1].started.Sub(calls[g.After].ended)) / float64(time.Millisecond)
		if g.MinMs != nil && gap < *g.MinMs {
			return fmt.Errorf("gap after call %d: %.1f ms < %v ms", g.After, gap, *g.MinMs)
		}
		if g.MaxMs != nil && gap > *g.MaxMs {
			return fmt.Errorf("gap after call %d: %.1f ms > %v ms", g.After, gap, *g.MaxMs)
		}
	}
	return nil
}

func (r *runner) check(e *expectation, res stepResult) error {
	if e == nil {
		if res.err != nil {
			return fmt.Errorf("unexpected error: %v", res.err)
		}
		return nil
	}
	if e.Error == nil && res.err != nil {
		return fmt.Errorf("unexpected error: %v", res.err)
	}
	if e.Result != nil {
		switch {
		case e.Result.Text != nil:
			if res.text == nil || *res.text != *e.Result.Text {
				return fmt.Errorf("result text %v, want %q", deref(res.text), *e.Result.Text)
			}
		case e.Result.Value != nil:
			var want interface{}
			_ = json.Unmarshal(*e.Result.Value, &want)
			wj, _ := json.Marshal(want)
			gj, _ := json.Marshal(res.value)
			if !bytes.Equal(wj, gj) {
				return fmt.Errorf("result value %s, want %s", gj, wj)
			}
		case e.Result.Deferred != nil:
			if res.deferred == nil || res.deferred.ID == "" || !strings.Contains(res.deferred.Message, e.Result.Deferred.MessageContains) {
				return fmt.Errorf("deferred %+v, want a message containing %q", res.deferred, e.Result.Deferred.MessageContains)
			}
		}
	}
	if ee := e.Error; ee != nil {
		if res.err == nil {
			return errors.New("no error, want " + ee.Type)
		}
		if err := r.checkError(ee.Type, res.err); err != nil {
			return err
		}
		var refused backstop.RefusedError
		var all *backstop.AllTargetsFailedError
		var retryAfter time.Duration
		hasRetryAfter := false
		if errors.As(res.err, &refused) {
			d := refused.Details()
			retryAfter, hasRetryAfter = d.RetryAfter, true
			if ee.Reason != "" && lower(d.Reason) != ee.Reason {
				return fmt.Errorf("reason %s, want %s", lower(d.Reason), ee.Reason)
			}
			if ee.Local != nil && d.Local != *ee.Local {
				return fmt.Errorf("local %v, want %v", d.Local, *ee.Local)
			}
		} else if errors.As(res.err, &all) {
			retryAfter, hasRetryAfter = all.RetryAfter, true
		}
		if ee.RetryAfterMs != nil {
			if !hasRetryAfter {
				return fmt.Errorf("%T has no retry_after", res.err)
			}
			if err := ee.RetryAfterMs.check(float64(retryAfter) / float64(time.Millisecond)); err != nil {
				return fmt.Errorf("retry_after_ms: %v", err)
			}
		}
		if ee.Status != 0 {
			var a *anthropicSDKError
			var o *openaiSDKError
			status := 0
			if errors.As(res.err, &a) {
				status = a.StatusCode
			} else if errors.As(res.err, &o) {
				status = o.StatusCode
			}
			if status != ee.Status {
				return fmt.Errorf("status %d, want %d", status, ee.Status)
			}
		}
		for _, sub := range ee.MessageContains {
			if !strings.Contains(res.err.Error(), sub) {
				return fmt.Errorf("message lacks %q:\n%s", sub, res.err)
			}
		}
	}
	if err := r.checkCalls(e, res.calls); err != nil {
		return err
	}
	if e.MaxDurationMs != nil && res.took > time.Duration(*e.MaxDurationMs)*time.Millisecond {
		return fmt.Errorf("took %s, max %d ms", res.took, *e.MaxDurationMs)
	}
	if e.Mode != "" && string(r.bs.Mode()) != e.Mode {
		return fmt.Errorf("mode %s, want %s", r.bs.Mode(), e.Mode)
	}
	if a := e.Admission; a != nil {
		if res.admission == nil {
			return errors.New("the guarded block never ran")
		}
		if a.Local != nil && res.admission.Local != *a.Local {
			return fmt.Errorf("admission local %v, want %v", res.admission.Local, *a.Local)
		}
		if a.KeySlot != nil {
			if err := r.bind(*a.KeySlot, res.admission.KeySlot); err != nil {
				return fmt.Errorf("admission key slot: %v", err)
			}
		}
	}
	if o := e.Outcome; o != nil {
		if res.outcome == nil {
			return errors.New("no outcome was reported")
		}
		out := res.outcome
		if o.ClassifiedAs != "" && lower(out.ClassifiedAs) != o.ClassifiedAs {
			return fmt.Errorf("classified_as %s, want %s", lower(out.ClassifiedAs), o.ClassifiedAs)
		}
		if o.State != "" && lower(out.State) != o.State {
			return fmt.Errorf("state %s, want %s", lower(out.State), o.State)
		}
		if o.Retry != nil && out.Retry.Retry != *o.Retry {
			return fmt.Errorf("retry %v, want %v", out.Retry.Retry, *o.Retry)
		}
		if o.RetryReason != "" && lower(out.Retry.Reason) != o.RetryReason {
			return fmt.Errorf("retry_reason %s, want %s", lower(out.Retry.Reason), o.RetryReason)
		}
		if err := o.DelayMs.check(float64(out.Retry.Delay) / float64(time.Millisecond)); err != nil {
			return fmt.Errorf("delay_ms: %v", err)
		}
	}
	return nil
}

func deref(s *string) string {
	if s == nil {
		return "<none>"
	}
	return fmt.Sprintf("%q", *s)
}

func (r *runner) checkError(typ string, err error) error {
	ok := false
	switch typ {
	case "AllTargetsFailed":
		var e *backstop.AllTargetsFailedError
		ok = errors.As(err, &e)
	case "CircuitOpen":
		var e *backstop.CircuitOpenError
		ok = errors.As(err, &e)
	case "RateLimited":
		var e *backstop.RateLimitedError
		ok = errors.As(err, &e)
	case "RequestTooLarge":
		var e *backstop.RequestTooLargeError
		ok = errors.As(err, &e)
	case "BackstopUnreachable":
		var e *backstop.UnreachableError
		ok = errors.As(err, &e)
	case "StructuredOutputError":
		var e *backstop.StructuredOutputError
		ok = errors.As(err, &e)
	case "ProviderError":
		r.fake.mu.Lock()
		raised := r.fake.raised
		r.fake.mu.Unlock()
		ok = raised != nil && raised != errClientBug && err == raised // propagated unchanged
	case "ClientBug":
		ok = err == errClientBug
	default:
		return fmt.Errorf("unknown error type %q", typ)
	}
	if !ok {
		return fmt.Errorf("error %T (%v), want %s", err, err, typ)
	}
	return nil
}

var counterNames = map[string]func(*pb.OutcomeCounters) uint64{
	"admitted": (*pb.OutcomeCounters).GetAdmitted, "refused": (*pb.OutcomeCounters).GetRefused,
	"success": (*pb.OutcomeCounters).GetSuccess, "transient": (*pb.OutcomeCounters).GetTransient,
	"rate_limited": (*pb.OutcomeCounters).GetRateLimited, "persistent": (*pb.OutcomeCounters).GetPersistent,
	"bad_input": (*pb.OutcomeCounters).GetBadInput, "partial": (*pb.OutcomeCounters).GetPartial,
	"timeout": (*pb.OutcomeCounters).GetTimeout, "stale": (*pb.OutcomeCounters).GetStale,
}

func (r *runner) expectServer(ctx context.Context, s *step) error {
	names := make([]string, 0, len(s.Targets))
	for n := range s.Targets {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, name := range names {
		want := s.Targets[name]
		st, err := r.bs.GetTarget(ctx, name)
		var cpe *backstop.ControlPlaneError
		notFound := errors.As(err, &cpe) && cpe.Code == codes.NotFound
		if want.Exists != nil {
			if *want.Exists == notFound {
				return fmt.Errorf("%s: exists %v, want %v", name, !notFound, *want.Exists)
			}
			if notFound {
				continue
			}
		}
		if err != nil {
			return fmt.Errorf("%s: %v", name, err)
		}
		if want.State != "" {
			if got := strings.ToLower(strings.TrimPrefix(st.GetState().String(), "BREAKER_STATE_")); got != want.State {
				return fmt.Errorf("%s: state %s, want %s", name, got, want.State)
			}
		}
		if want.ConsecutiveFailures != nil && st.GetConsecutiveFailures() != *want.ConsecutiveFailures {
			return fmt.Errorf("%s: consecutive_failures %d, want %d", name, st.GetConsecutiveFailures(), *want.ConsecutiveFailures)
		}
		for c, v := range want.Counters {
			get, ok := counterNames[c]
			if !ok {
				return fmt.Errorf("unknown counter %q", c)
			}
			if got := get(st.GetCounters()); got != v {
				return fmt.Errorf("%s: counters.%s = %d, want %d (all: %v)", name, c, got, v, st.GetCounters())
			}
		}
		for slotName, fields := range want.KeySlots {
			slot := slotName
			if strings.HasPrefix(slotName, "=") {
				v, ok := r.bindings[slotName[1:]]
				if !ok {
					return fmt.Errorf("binding %s is not bound yet", slotName)
				}
				slot = v
			}
			var ks *pb.KeySlotStatus
			for _, k := range st.GetKeySlots() {
				if k.GetName() == slot {
					ks = k
				}
			}
			if ks == nil {
				return fmt.Errorf("%s: no key slot %q", name, slot)
			}
			for f, v := range fields {
				var got bool
				switch f {
				case "disabled":
					got = ks.GetDisabled()
				case "paused":
					got = ks.GetPausedUntil() != nil && ks.GetPausedUntil().AsTime().After(time.Now())
				default:
					return fmt.Errorf("unknown key slot field %q", f)
				}
				if got != v {
					return fmt.Errorf("%s: key slot %s %s = %v, want %v", name, slot, f, got, v)
				}
			}
		}
		for kind, want := range want.Budgets {
			if len(st.GetKeySlots()) == 0 {
				return fmt.Errorf("%s: no key slot", name)
			}
			found := false
			for _, b := range st.GetKeySlots()[0].GetBudgets() {
				if b.GetKind() == kind {
					found = true
					if err := want.check(b.GetAvailable()); err != nil {
						return fmt.Errorf("%s: budget %s: %v", name, kind, err)
					}
				}
			}
			if !found {
				return fmt.Errorf("%s: no %s budget", name, kind)
			}
		}
	}
	for q, fields := range s.Queues {
		stats, err := r.bs.QueueStats(ctx, q)
		if err != nil {
			return err
		}
		var qs backstop.QueueStat
		for _, x := range stats {
			if x.Queue == q {
				qs = x
			}
		}
		for f, v := range fields {
			var got uint64
			switch f {
			case "depth":
				got = qs.Depth
			case "in_flight":
				got = qs.InFlight
			case "dead_letters":
				got = qs.DeadLetters
			default:
				return fmt.Errorf("unknown queue field %q", f)
			}
			if int64(got) != v {
				return fmt.Errorf("queue %s: %s = %d, want %d", q, f, got, v)
			}
		}
	}
	return nil
}
