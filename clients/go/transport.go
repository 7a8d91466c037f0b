package backstop

// Transport guards any HTTP-based provider SDK by sitting in its
// *http.Client: every model call is admitted by Backstop before it leaves and
// reported after it ends, with the status, provider headers and (for JSON and
// server-sent-event answers) token usage read off the wire.

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Bodies up to this size are buffered to read the model name (requests) or
// the usage (JSON answers); larger ones pass through untouched.
const maxPeek = 1 << 20

// Transport is an http.RoundTripper that guards provider calls:
//
//	hc := &http.Client{Transport: &backstop.Transport{Client: bs}}
//	openai.NewClient(option.WithHTTPClient(hc), option.WithMaxRetries(0))
//
// For each request it names the target (Target, else DefaultTarget), asks
// CanProceed, and when refused returns the refusal error (*CircuitOpenError,
// *RateLimitedError...) without calling the provider. Otherwise it forwards
// the request to Base and reports the outcome: non-2xx answers at once (the
// error body is read and put back for the SDK), successes when the body has
// been read or closed, with usage from the body. Requests whose target cannot
// be named (e.g. listing models) pass through unguarded.
//
// Inside Guard or Call (the request's context comes from the guarded
// function), the Transport does not admit or report again: it hands what it
// saw to the guard, so the SDK's errors need no parsing.
//
// The SDK's own retries should be off (they would retry refusals too, and
// Backstop's advice already paces retries); when an SDK does retry, its
// x-stainless-retry-count header is read as the attempt number.
type Transport struct {
	Client *Client
	// Base performs the requests (nil: http.DefaultTransport).
	Base http.RoundTripper
	// Target names a request's target; "" leaves it unguarded (nil: DefaultTarget).
	Target func(*http.Request) string
	// EstimateTokens says how many tokens a request will use (optional).
	EstimateTokens func(*http.Request) uint64
	// Options adds options to a request's admission, e.g.
	// AtPriority(PriorityBatch) for a background job's client, or
	// MaxOutputTokens read from the request (optional). A refusal for a
	// spend limit or a priority reserve comes back as *SpendLimitError /
	// *PriorityReservedError without calling the provider.
	Options func(*http.Request) []CallOption
	// SetKey adapts a request to the key slot Backstop chose (e.g. sets the
	// API key header of that slot); called only when the target declares keys.
	SetKey func(req *http.Request, keySlot string)
	// OnOutcome receives what Backstop made of each reported call (its
	// retry advice, breaker state); optional.
	OnOutcome func(req *http.Request, res OutcomeResult)
}

type targetKey struct{}

// WithTarget names the target of requests made with ctx, for the Transport:
// it wins over any Target function.
func WithTarget(ctx context.Context, target string) context.Context {
	return context.WithValue(ctx, targetKey{}, target)
}

// TargetFrom returns the target WithTarget put in ctx.
func TargetFrom(ctx context.Context) (string, bool) {
	t, ok := ctx.Value(targetKey{}).(string)
	return t, ok && t != ""
}

// DefaultTarget names a request "provider/model": the provider from the host
// (api.openai.com → openai, api.anthropic.com → anthropic,
// generativelanguage.googleapis.com → google, else the host name) and the
// model from the JSON body's "model" field or a Gemini-style
// /models/NAME:method path. "" when there is no model (not a model call).
func DefaultTarget(req *http.Request) string {
	model := modelFromPath(req.URL)
	if model == "" {
		model = modelFromBody(req)
	}
	if model == "" {
		return ""
	}
	return providerOf(req.URL) + "/" + model
}

func providerOf(u *url.URL) string {
	host := strings.ToLower(u.Hostname())
	switch {
	case host == "api.openai.com" || strings.HasSuffix(host, ".openai.azure.com"):
		return "openai"
	case host == "api.anthropic.com":
		return "anthropic"
	case host == "generativelanguage.googleapis.com" || strings.HasSuffix(host, "aiplatform.googleapis.com"):
		return "google"
	}
	return host
}

func modelFromPath(u *url.URL) string {
	p := u.Path
	i := strings.Index(p, "/models/")
	if i < 0 {
		return ""
	}
	rest := p[i+len("/models/"):]
	if j := strings.IndexByte(rest, ':'); j > 0 {
		return rest[:j]
	}
	return ""
}

func modelFromBody(req *http.Request) string {
	if req.GetBody == nil {
		return ""
	}
	rc, err := req.GetBody()
	if err != nil {
		return ""
	}
	defer rc.Close()
	data, err := io.ReadAll(io.LimitReader(rc, maxPeek))
	if err != nil {
		return ""
	}
	var doc struct {
		Model string `json:"model"`
	}
	if json.Unmarshal(data, &doc) != nil {
		return ""
	}
	return doc.Model
}

// replayable makes the request's body re-readable (GetBody) when it is small,
// so the target can be read from it; the original request is never modified.
func replayable(req *http.Request) (*http.Request, error) {
	if req.Body == nil || req.Body == http.NoBody || req.GetBody != nil {
		return req, nil
	}
	if req.ContentLength > maxPeek {
		return req, nil
	}
	head, err := io.ReadAll(io.LimitReader(req.Body, maxPeek+1))
	if err != nil {
		return nil, err
	}
	clone := req.Clone(req.Context())
	if len(head) > maxPeek {
		clone.Body = readCloser{io.MultiReader(bytes.NewReader(head), req.Body), req.Body}
		return clone, nil
	}
	_ = req.Body.Close()
	clone.Body = io.NopCloser(bytes.NewReader(head))
	clone.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(head)), nil }
	return clone, nil
}

type readCloser struct {
	io.Reader
	io.Closer
}

func (t *Transport) base() http.RoundTripper {
	if t.Base != nil {
		return t.Base
	}
	return http.DefaultTransport
}

// RoundTrip implements http.RoundTripper.
func (t *Transport) RoundTrip(req *http.Request) (*http.Response, error) {
	ctx := req.Context()
	if sc := scopeFrom(ctx); sc != nil {
		resp, err := t.base().RoundTrip(req)
		if err != nil {
			return nil, err
		}
		if resp.StatusCode >= 200 && resp.StatusCode < 300 {
			sc.successHeader(resp.Header.Clone())
		}
		return t.watch(resp, func(status int, h http.Header, body []byte, in, out uint64, usage bool, _ error) {
			if status != 0 {
				sc.response(status, h, body)
			}
			if usage {
				sc.usage(in, out)
			}
		}), nil
	}
	if t.Client == nil {
		return t.base().RoundTrip(req)
	}
	req, err := replayable(req)
	if err != nil {
		return nil, err
	}
	target, named := TargetFrom(ctx)
	if !named {
		if t.Target != nil {
			target = t.Target(req)
		} else {
			target = DefaultTarget(req)
		}
	}
	if target == "" {
		return t.base().RoundTrip(req)
	}
	var opts []CallOption
	if t.EstimateTokens != nil {
		opts = append(opts, EstimatedTokens(t.EstimateTokens(req)))
	}
	if t.Options != nil {
		opts = append(opts, t.Options(req)...)
	}
	attempt, _ := strconv.Atoi(req.Header.Get("x-stainless-retry-count"))
	if attempt > 0 {
		opts = append(opts, Attempt(attempt))
	}
	adm, err := t.Client.CanProceed(ctx, target, opts...)
	if err != nil {
		return nil, err
	}
	if !adm.Allowed {
		return nil, refusalError(adm)
	}
	if adm.KeySlot != "" && t.SetKey != nil {
		req = req.Clone(ctx)
		t.SetKey(req, adm.KeySlot)
	}
	// A RequestID from Options goes with the outcome; the request is not
	// finished here (the SDK may retry it): finish it with FinishRequest.
	p := Permit{Target: target, Token: adm.Permit, KeySlot: adm.KeySlot, Attempt: max0(attempt), Local: adm.Local,
		RequestID: applyCallOptions(opts).requestID}
	started := time.Now()
	report := func(obs observed) {
		res, err := t.Client.report(ctx, p, obs, time.Since(started), RequestResultUnspecified)
		if err != nil {
			t.Client.s.logger.Printf("could not report the outcome of a call to %s: %v", target, err)
			return
		}
		if t.OnOutcome != nil {
			t.OnOutcome(req, res)
		}
	}
	resp, err := t.base().RoundTrip(req)
	if err != nil {
		report(observeError(err))
		return nil, err
	}
	return t.watch(resp, func(status int, h http.Header, body []byte, in, out uint64, usage bool, readErr error) {
		switch {
		case status >= 300 || (status != 0 && status < 200):
			report(observeError(&HTTPError{StatusCode: status, Header: h, Body: body}))
		case readErr != nil:
			report(observeError(readErr))
		case status == 0:
			obs := observed{Outcome: OutcomeSuccess, Headers: NormalizeHeaders(resp.Header)}
			if usage {
				obs.InputTokens, obs.OutputTokens = in, out
			}
			report(obs)
		}
	}), nil
}

// watch reads what the outcome needs off a response. For a non-2xx answer it
// reads the error body at once (putting it back for the caller) and calls
// done with the status. For a 2xx answer it wraps the body and calls done
// with status 0 when the body ends or is closed, with the usage found in it.
func (t *Transport) watch(resp *http.Response, done func(status int, h http.Header, body []byte, in, out uint64, usage bool, readErr error)) *http.Response {
	if resp.StatusCode < 200 || resp.StatusCode >= 300 {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		resp.Body = readCloser{io.MultiReader(bytes.NewReader(body), resp.Body), resp.Body}
		done(resp.StatusCode, resp.Header.Clone(), body, 0, 0, false, nil)
		return resp
	}
	ct := strings.ToLower(resp.Header.Get("Content-Type"))
	ob := &observedBody{rc: resp.Body, sse: strings.Contains(ct, "event-stream"), json: strings.Contains(ct, "json")}
	ob.done = func(readErr error) {
		in, out, ok := ob.usage()
		done(0, nil, nil, in, out, ok, readErr)
	}
	resp.Body = ob
	return resp
}

// observedBody passes a response body through and keeps what it needs to find
// the usage: a JSON body (up to maxPeek), or the SSE data lines that carry usage.
type observedBody struct {
	rc   io.ReadCloser
	sse  bool
	json bool

	buf      bytes.Buffer
	overflow bool
	line     []byte
	in, out  uint64
	seen     bool

	once sync.Once
	done func(readErr error)
}

func (b *observedBody) Read(p []byte) (int, error) {
	n, err := b.rc.Read(p)
	if n > 0 {
		b.take(p[:n])
	}
	if err == io.EOF {
		b.finish(nil)
	} else if err != nil {
		b.finish(err)
	}
	return n, err
}

func (b *observedBody) Close() error {
	err := b.rc.Close()
	b.finish(nil)
	return err
}

func (b *observedBody) finish(err error) {
	b.once.Do(func() { b.done(err) })
}

func (b *observedBody) take(p []byte) {
	switch {
	case b.sse:
		for len(p) > 0 {
			i := bytes.IndexByte(p, '\n')
			if i < 0 {
				if len(b.line)+len(p) <= maxPeek {
					b.line = append(b.line, p...)
				}
				return
			}
			b.line = append(b.line, p[:i]...)
			b.sseLine(b.line)
			b.line = b.line[:0]
			p = p[i+1:]
		}
	case b.json && !b.overflow:
		if b.buf.Len()+len(p) > maxPeek {
			b.overflow = true
			b.buf.Reset()
			return
		}
		b.buf.Write(p)
	}
}

// sseLine reads usage from one "data: {...}" line. Anthropic sends input
// tokens in message_start and the output count in message_delta; OpenAI sends
// one usage chunk at the end: the largest value of each kind wins.
func (b *observedBody) sseLine(line []byte) {
	line = bytes.TrimSpace(line)
	if !bytes.HasPrefix(line, []byte("data:")) || !bytes.Contains(line, []byte(`"usage"`)) {
		return
	}
	in, out, ok := Usage(bytes.TrimSpace(line[len("data:"):]))
	if !ok {
		return
	}
	b.seen = true
	if in > b.in {
		b.in = in
	}
	if out > b.out {
		b.out = out
	}
}

func (b *observedBody) usage() (uint64, uint64, bool) {
	if b.sse {
		if len(b.line) > 0 {
			b.sseLine(b.line)
			b.line = nil
		}
		return b.in, b.out, b.seen
	}
	if b.json && !b.overflow && b.buf.Len() > 0 {
		return Usage(b.buf.Bytes())
	}
	return 0, 0, false
}
