package backstop

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// CallResult describes the attempt that succeeded.
type CallResult struct {
	Target        string
	KeySlot       string
	FallbackDepth int
	// Provider calls made, including failed ones.
	Calls int
	// What Backstop made of the successful call.
	Outcome OutcomeResult
	// Failures before the success (other targets, earlier attempts).
	Errors []AttemptError
	// Decided by the local fail-safe (Backstop unreachable).
	Local bool
	// The success report closed the request (internal to Call).
	completed bool
}

// Call runs fn on the best available target of route, retrying as Backstop
// advises and falling back along the route:
//
//  1. Route (with Exclude, RequiredContextTokens, EstimatedTokens, and any
//     AtPriority, MaxOutputTokens, Strategy, ExpectedOutputTokens) admits the
//     best available target. A target refused for a spend limit or a
//     priority reserve is skipped, never called and never counted as a
//     provider failure: it shows in AllTargetsFailedError.Errors with
//     ReasonSpendLimit / ReasonPriorityReserved and its RetryAfter.
//  2. fn runs; its outcome is reported with the permit, status, error type,
//     headers, latency, attempt and token usage.
//  3. If the advice says retry, wait the advised delay and ask CanProceed for
//     the same target with attempt+1 (drawing on the fleet's retry budget).
//  4. Otherwise (PERSISTENT, BAD_INPUT, MAX_RETRIES, RETRY_BUDGET_EXHAUSTED, a
//     refused retry, or a retry that would outlast ctx's deadline) exclude the
//     target and Route again. Two exceptions: a PERSISTENT failure on a named
//     key slot (a 401 for one API key) routes again without excluding the
//     target, since another key of the same model may serve; and a
//     context-length error that states the prompt size raises
//     RequiredContextTokens, so the fallback skips models whose window is
//     too small. A *StructuredOutputError ends the loop at once.
//  5. When no target is left: *AllTargetsFailedError (every attempt and every
//     skipped target, in route order), or with DeferTo the payload is saved to
//     the deferred queue and the error is a *DeferredError (ErrDeferred).
//
// route is a configured route name, or "" with the Candidates option.
// Cancelling ctx stops the loop (the call in flight is still reported).
//
// The whole loop is one user request to the server, named by the RequestID
// option or a random id, sent on every Route, CanProceed and RecordOutcome:
// the success report completes it; giving up finishes it as failed, and
// deferring as deferred (FinishRequest, with the client's own elapsed time
// and attempt count). Finishing never fails the Call, and is skipped while
// the fail-safe decides.
func (c *Client) Call(ctx context.Context, route string, fn Func, opts ...CallOption) (CallResult, error) {
	cs := applyCallOptions(opts)
	if cs.requestID == "" {
		cs.requestID = newRequestID()
		opts = append(append([]CallOption(nil), opts...), RequestID(cs.requestID))
	}
	started := time.Now()
	res, err := c.call(ctx, route, fn, cs, opts)
	if err != nil && !res.completed {
		result := RequestFailed
		if errors.Is(err, ErrDeferred) {
			result = RequestDeferred
		}
		c.finishQuietly(ctx, cs.requestID, result, FinishOptions{Route: route, Elapsed: time.Since(started), Attempts: res.Calls})
	}
	res.completed = false
	return res, err
}

func (c *Client) call(ctx context.Context, route string, fn Func, cs callSettings, opts []CallOption) (CallResult, error) {
	if route == "" && len(cs.candidates) == 0 {
		return CallResult{}, errors.New("backstop: Call needs a route name or the Candidates option")
	}
	queue := cs.deferQueue
	if queue == "" {
		queue = route
	}
	if cs.deferring && queue == "" {
		return CallResult{}, errors.New("backstop: DeferTo with a candidate list needs a queue name")
	}
	var errs []AttemptError
	exclude := append([]string(nil), cs.exclude...)
	var tried []string
	// (target, key slot) pairs that failed PERSISTENT: only that key is
	// disabled, so the target is routed to again (another key may serve),
	// unless Route hands back a key that already failed.
	failedSlots := map[[2]string]bool{}
	requiredContext := cs.requiredContextTokens
	calls := 0
	var last RouteDecision
	for {
		ropts := append(append([]CallOption(nil), opts...), func(s *callSettings) {
			s.exclude = exclude
			s.attempt = 0
			s.requiredContextTokens = requiredContext
		})
		d, err := c.Route(ctx, route, ropts...)
		if err != nil {
			return CallResult{Errors: errs, Calls: calls}, err
		}
		last = d
		if d.Target == "" {
			errs = postMortem(errs, d, tried)
			break
		}
		target := d.Target
		if d.KeySlot != "" && failedSlots[[2]string{target, d.KeySlot}] {
			exclude = append(exclude, target)
			continue
		}
		tried = append(tried, target)
		slotFailed := false
		p := Permit{Target: target, Token: d.Permit, KeySlot: d.KeySlot, MaxTokens: d.MaxTokens, FallbackDepth: d.FallbackDepth, Local: d.Local,
			RequestID: cs.requestID}
		for {
			obs, ferr, latency := c.invoke(ctx, fn, p)
			calls++
			finish := RequestResultUnspecified
			if ferr == nil {
				finish = RequestCompleted
			}
			out, rerr := c.report(ctx, p, obs, latency, finish)
			if rerr != nil {
				// The server rejected the report: decide on local advice.
				c.s.logger.Printf("could not report an outcome to Backstop (%v); using local advice", rerr)
				out = c.local.record(OutcomeReport{Target: target, Outcome: obs.Outcome, HTTPStatus: obs.HTTPStatus,
					ErrorType: obs.ErrorType, Headers: obs.Headers, Attempt: p.Attempt})
			}
			if ferr == nil {
				return CallResult{Target: target, KeySlot: p.KeySlot, FallbackDepth: d.FallbackDepth, Calls: calls,
					Outcome: out, Errors: errs, Local: p.Local, completed: true}, nil
			}
			msg := obs.Message
			if msg == "" {
				msg = ferr.Error()
			}
			errs = append(errs, AttemptError{Target: target, Outcome: out.ClassifiedAs, Message: msg,
				HTTPStatus: obs.HTTPStatus, Attempt: p.Attempt, Err: ferr})
			if ctx.Err() != nil {
				return CallResult{Errors: errs, Calls: calls}, ctx.Err()
			}
			var soe *StructuredOutputError
			if errors.As(ferr, &soe) {
				// The corrections are used up: falling back would only repeat them.
				return CallResult{Errors: errs, Calls: calls}, ferr
			}
			if out.ClassifiedAs == OutcomeBadInput {
				if n := contextTokensNeeded(obs.ErrorType + " " + obs.Message); n > requiredContext {
					requiredContext = n
				}
			}
			advice := out.Retry
			if !advice.Retry {
				if out.ClassifiedAs == OutcomePersistent && p.KeySlot != "" {
					failedSlots[[2]string{target, p.KeySlot}] = true
					slotFailed = true
				}
				break
			}
			if dl, ok := ctx.Deadline(); ok && time.Now().Add(advice.Delay).After(dl) {
				break
			}
			if err := sleepCtx(ctx, advice.Delay); err != nil {
				return CallResult{Errors: errs, Calls: calls}, err
			}
			aopts := append(append([]CallOption(nil), opts...), Attempt(p.Attempt+1))
			adm, err := c.CanProceed(ctx, target, aopts...)
			if err != nil {
				return CallResult{Errors: errs, Calls: calls}, err
			}
			if !adm.Allowed {
				errs = append(errs, AttemptError{Target: target, Message: "refused", Reason: adm.Reason, RetryAfter: adm.RetryAfter, Attempt: p.Attempt + 1})
				break
			}
			p = Permit{Target: target, Token: adm.Permit, KeySlot: adm.KeySlot, Attempt: p.Attempt + 1,
				MaxTokens: d.MaxTokens, FallbackDepth: d.FallbackDepth, Local: adm.Local, Previous: ferr, RequestID: cs.requestID}
		}
		if !slotFailed {
			exclude = append(exclude, target)
		}
	}

	name := "route " + fmt.Sprintf("%q", route)
	if route == "" {
		name = "candidates [" + strings.Join(cs.candidates, ", ") + "]"
	}
	fail := &AllTargetsFailedError{Route: name, Errors: errs, RetryAfter: last.RetryAfter}
	if last.Local && len(last.Skipped) == 0 && len(tried) == 0 {
		fail.Note = "Backstop is unreachable and this client knows no targets for this route; " +
			"pass WithLocalRoutes to keep routing while the control plane is down"
	}
	if !cs.deferring {
		return CallResult{Errors: errs, Calls: calls}, fail
	}
	deferred, err := c.Defer(ctx, queue, cs.payload, opts...)
	if err != nil {
		fail.DeferErr = err
		return CallResult{Errors: errs, Calls: calls}, fail
	}
	deferred.Errors = errs
	return CallResult{Errors: errs, Calls: calls}, &DeferredError{Deferred: deferred}
}

// The prompt size a context-length error states: OpenAI "... your messages
// resulted in 150000 tokens", Anthropic "prompt is too long: 150000 tokens >
// 100000 maximum".
var promptTokens = []*regexp.Regexp{
	regexp.MustCompile(`resulted in (\d+) tokens`),
	regexp.MustCompile(`(\d+) tokens > \d+`),
}

// contextTokensNeeded reads the prompt size from a context-length error (0
// if it states none), so the fallback Route skips models whose window is too small.
func contextTokensNeeded(text string) uint64 {
	for _, re := range promptTokens {
		if m := re.FindStringSubmatch(text); m != nil {
			n, _ := strconv.ParseUint(m[1], 10, 64)
			return n
		}
	}
	return 0
}

// postMortem orders every error by route order: each tried target's
// attempts, and for the others why the last Route passed them over.
func postMortem(errs []AttemptError, final RouteDecision, tried []string) []AttemptError {
	byTarget := map[string][]AttemptError{}
	var order []string
	for _, e := range errs {
		if _, ok := byTarget[e.Target]; !ok {
			order = append(order, e.Target)
		}
		byTarget[e.Target] = append(byTarget[e.Target], e)
	}
	wasTried := map[string]bool{}
	for _, t := range tried {
		wasTried[t] = true
	}
	var out []AttemptError
	for _, s := range final.Skipped {
		if es, ok := byTarget[s.Target]; ok {
			out = append(out, es...)
			delete(byTarget, s.Target)
		} else if s.Reason != ReasonExcluded && !wasTried[s.Target] {
			out = append(out, AttemptError{Target: s.Target, Message: "skipped", Reason: s.Reason, RetryAfter: s.RetryAfter})
		}
	}
	for _, t := range order {
		out = append(out, byTarget[t]...)
	}
	return out
}
