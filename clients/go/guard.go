package backstop

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"
)

// Permit is what a guarded function receives: where to send the call and
// which API key to use. Token is the server's permit, opaque; Guard and Call
// pass it back for you.
type Permit struct {
	Target  string
	Token   string
	KeySlot string
	// 0 for a first try.
	Attempt int
	// The target's configured max_tokens (Call only; 0 = not configured).
	MaxTokens uint64
	// 0 = the route's primary served; n = the n-th fallback (Call only).
	FallbackDepth int
	// Admitted by the local fail-safe (Backstop unreachable).
	Local bool
	// On a retry: what the previous attempt returned, e.g. the
	// MalformedOutputError to build a correction prompt from.
	Previous error
	// The user request this call serves (see RequestID), reported with its outcome.
	RequestID string
}

// Result is what a guarded function tells about a call that returned. All
// fields are optional; with the Transport in the provider's HTTP client the
// status, headers and usage are read for you.
type Result struct {
	// Token usage: settles the token budgets with real numbers.
	InputTokens  uint64
	OutputTokens uint64
	// Response headers of a successful call: their rate-limit fields let
	// the server pause the fleet before the provider starts answering 429.
	Header http.Header
	// The provider's HTTP status, if the function did not return an error
	// for a non-2xx answer (then it is reported as a failure).
	HTTPStatus int
	// Overrides the classification, e.g. OutcomePartial for a reply the
	// function judged unusable without returning an error.
	Outcome   OutcomeClass
	ErrorType string
}

// Func makes one provider call. Return the provider's error unchanged: Guard
// and Call read its HTTP status, headers and error body (provider SDK
// errors, *HTTPError, net and context errors, MalformedOutputError).
type Func func(ctx context.Context, p Permit) (Result, error)

// scope lets the Transport, used inside a guarded function, hand what it saw
// on the wire (status, headers, error body, usage) to the Guard that admitted
// the call, instead of admitting and reporting the same call a second time.
type scope struct {
	mu        sync.Mutex
	status    int
	header    http.Header
	body      []byte
	in, out   uint64
	usageSeen bool
}

type scopeKey struct{}

func scopeFrom(ctx context.Context) *scope {
	s, _ := ctx.Value(scopeKey{}).(*scope)
	return s
}

func (s *scope) response(status int, h http.Header, body []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.status, s.header, s.body = status, h, body
}

// successHeader keeps a 2xx answer's headers: their rate-limit fields let
// the server pause the fleet before the provider starts answering 429.
func (s *scope) successHeader(h http.Header) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.header = h
}

func (s *scope) usage(in, out uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.in, s.out, s.usageSeen = in, out, true
}

func (s *scope) snapshot() (status int, h http.Header, body []byte, in, out uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.status, s.header, s.body, s.in, s.out
}

// observe combines what the function returned with what the Transport saw.
// It returns the report fields and the attempt's error (non-nil for a
// failure, synthesized when the function reported one without an error).
func observe(res Result, err error, sc *scope) (observed, error) {
	if err == nil && res.HTTPStatus != 0 && (res.HTTPStatus < 200 || res.HTTPStatus >= 300) {
		err = &HTTPError{StatusCode: res.HTTPStatus, Header: res.Header}
	}
	var obs observed
	var status int
	var header http.Header
	var body []byte
	var in, out uint64
	if sc != nil {
		status, header, body, in, out = sc.snapshot()
	}
	if err != nil {
		obs = observeError(err)
		// An SDK error this client cannot read, for a response the
		// Transport saw fail: the wire says what happened.
		if obs.HTTPStatus == 0 && status >= 300 && strings.HasPrefix(obs.ErrorType, "client_error") {
			wire := observeError(&HTTPError{StatusCode: status, Header: header, Body: body})
			wire.Message = obs.Message
			obs = wire
		}
	} else {
		obs = observed{Outcome: OutcomeSuccess, Headers: NormalizeHeaders(res.Header)}
		if obs.Headers == nil {
			obs.Headers = NormalizeHeaders(header)
		}
	}
	if res.InputTokens != 0 || res.OutputTokens != 0 {
		obs.InputTokens, obs.OutputTokens = res.InputTokens, res.OutputTokens
	} else if in != 0 || out != 0 {
		obs.InputTokens, obs.OutputTokens = in, out
	}
	if res.Outcome != OutcomeUnspecified {
		obs.Outcome = res.Outcome
		if err == nil && res.Outcome != OutcomeSuccess {
			err = fmt.Errorf("backstop: the call was reported as %s", res.Outcome)
			obs.Message = err.Error()
		}
	}
	if res.ErrorType != "" {
		obs.ErrorType = clip(res.ErrorType, MaxErrorType)
	}
	return obs, err
}

// detached carries ctx's values without its deadline or cancellation: an
// outcome is reported even when the caller gave up, so the permit's budget
// and probe slot are released.
type detached struct{ parent context.Context }

func (d detached) Deadline() (time.Time, bool)     { return time.Time{}, false }
func (d detached) Done() <-chan struct{}           { return nil }
func (d detached) Err() error                      { return nil }
func (d detached) Value(k interface{}) interface{} { return d.parent.Value(k) }

// invoke runs fn once with a scope for the Transport. A panic in fn is
// reported (as the agent's own bug: BAD_INPUT, which never blames the
// provider but releases the permit) and then re-raised.
func (c *Client) invoke(ctx context.Context, fn Func, p Permit) (obs observed, err error, latency time.Duration) {
	sc := &scope{}
	started := time.Now()
	defer func() {
		if r := recover(); r != nil {
			obs = observed{Outcome: OutcomeBadInput, ErrorType: "client_error: panic", Message: fmt.Sprint(r)}
			_, _ = c.report(ctx, p, obs, time.Since(started), RequestResultUnspecified)
			panic(r)
		}
	}()
	res, ferr := fn(context.WithValue(ctx, scopeKey{}, sc), p)
	latency = time.Since(started)
	obs, err = observe(res, ferr, sc)
	return obs, err, latency
}

// report sends one attempt's outcome; finish closes its request in the same call.
func (c *Client) report(ctx context.Context, p Permit, obs observed, latency time.Duration, finish RequestResult) (OutcomeResult, error) {
	if p.RequestID == "" {
		finish = RequestResultUnspecified
	}
	return c.RecordOutcome(detached{ctx}, OutcomeReport{
		Target:       p.Target,
		Permit:       p.Token,
		Outcome:      obs.Outcome,
		HTTPStatus:   obs.HTTPStatus,
		ErrorType:    obs.ErrorType,
		Latency:      latency,
		InputTokens:  obs.InputTokens,
		OutputTokens: obs.OutputTokens,
		Attempt:      p.Attempt,
		Headers:      obs.Headers,
		KeySlot:      p.KeySlot,
		Caller:       c.s.caller,
		RequestID:    p.RequestID,
		Finish:       finish,
	})
}

// Guard runs fn as one provider call to target between CanProceed and
// RecordOutcome.
//
// When the fleet says no, fn is not called and the error is a
// *CircuitOpenError, *RateLimitedError (also *PriorityReservedError for a
// budget's priority reserve, *SpendLimitError for a spend limit, both found
// by errors.As as a *RateLimitedError too), *RequestTooLargeError or
// (fail-closed policy, Backstop unreachable) *UnreachableError, all matching
// ErrRefused and carrying RetryAfter. Otherwise fn runs, its outcome is reported (classified
// from its error: see Func) and Guard returns what Backstop made of it
// (breaker state, retry advice) together with fn's own error, unchanged.
// Options: EstimatedTokens, Attempt, AtPriority, MaxOutputTokens, RequestID.
//
// Without RequestID the guarded call is a user request of its own (a random
// id): a success completes it, a refusal or failure finishes it as failed.
// A RequestID you pass may span several guarded calls (your retries): a
// success completes it, a failure leaves it open for your next attempt or
// your FinishRequest.
func (c *Client) Guard(ctx context.Context, target string, fn Func, opts ...CallOption) (OutcomeResult, error) {
	cs := applyCallOptions(opts)
	own := cs.requestID == ""
	if own {
		cs.requestID = newRequestID()
		opts = append(append([]CallOption(nil), opts...), RequestID(cs.requestID))
	}
	adm, err := c.CanProceed(ctx, target, opts...)
	if err != nil {
		return OutcomeResult{}, err
	}
	if !adm.Allowed {
		if own {
			c.finishQuietly(ctx, cs.requestID, RequestFailed, FinishOptions{})
		}
		return OutcomeResult{}, refusalError(adm)
	}
	p := Permit{Target: target, Token: adm.Permit, KeySlot: adm.KeySlot, Attempt: cs.attempt, Local: adm.Local, RequestID: cs.requestID}
	obs, ferr, latency := c.invoke(ctx, fn, p)
	finish := RequestResultUnspecified
	if ferr == nil {
		finish = RequestCompleted
	}
	out, rerr := c.report(ctx, p, obs, latency, finish)
	if ferr != nil && own {
		c.finishQuietly(ctx, cs.requestID, RequestFailed, FinishOptions{Attempts: 1})
	}
	if ferr != nil {
		if rerr != nil {
			// fn's own error matters more; do not replace it.
			c.s.logger.Printf("could not report the outcome of a call to %s: %v", target, rerr)
		}
		return out, ferr
	}
	return out, rerr
}
