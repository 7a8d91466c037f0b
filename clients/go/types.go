package backstop

import (
	"fmt"
	"strings"
	"time"

	pb "github.com/backstop-dev/backstop/clients/go/backstopv1"
)

// The enums below have the same numeric values as their backstop.v1
// counterparts, so converting is a cast and a value this client was built
// without (a newer server's addition) survives the round trip. String() names
// such a value from the generated stubs when they know it, else by number:
// an unknown value is never an error.

// BreakerState is the state of a target's circuit breaker (backstop.v1.BreakerState).
type BreakerState int32

const (
	StateUnspecified  BreakerState = 0
	StateClosed       BreakerState = 1
	StateOpen         BreakerState = 2
	StateHalfOpen     BreakerState = 3
	StateForcedOpen   BreakerState = 4
	StateForcedClosed BreakerState = 5
)

func (s BreakerState) String() string {
	return enumName(pb.BreakerState_name, int32(s), "BREAKER_STATE_", "BreakerState")
}

// Reason says why a call was admitted or refused (backstop.v1.Reason).
type Reason int32

const (
	ReasonUnspecified          Reason = 0
	ReasonAllowed              Reason = 1
	ReasonCircuitOpen          Reason = 2
	ReasonProbeLimit           Reason = 3
	ReasonForcedOpen           Reason = 4
	ReasonRateLimited          Reason = 5
	ReasonConcurrencyLimit     Reason = 6
	ReasonRetryBudgetExhausted Reason = 7
	ReasonKeySlotsUnavailable  Reason = 8
	ReasonRequestTooLarge      Reason = 9
	ReasonExcluded             Reason = 10
	ReasonContextTooSmall      Reason = 11
	ReasonPriorityReserved     Reason = 12
	ReasonSpendLimit           Reason = 13

	// ReasonControlPlaneUnavailable is client-side only: the refusal of the
	// fail-closed policy while Backstop cannot be reached. Its value is far
	// above the server's so that it can never collide with a future one.
	ReasonControlPlaneUnavailable Reason = 10000
)

func (r Reason) String() string {
	if r == ReasonControlPlaneUnavailable {
		return "CONTROL_PLANE_UNAVAILABLE"
	}
	return enumName(pb.Reason_name, int32(r), "REASON_", "Reason")
}

// OutcomeClass is the failure taxonomy (backstop.v1.OutcomeClass).
// OutcomeUnspecified in a report lets the server classify from the HTTP
// status, error type and headers: the fleet's single source of truth.
type OutcomeClass int32

const (
	OutcomeUnspecified OutcomeClass = 0
	OutcomeSuccess     OutcomeClass = 1
	OutcomeTransient   OutcomeClass = 2
	OutcomeRateLimited OutcomeClass = 3
	OutcomePersistent  OutcomeClass = 4
	OutcomeBadInput    OutcomeClass = 5
	OutcomePartial     OutcomeClass = 6
	OutcomeTimeout     OutcomeClass = 7
)

func (c OutcomeClass) String() string {
	return enumName(pb.OutcomeClass_name, int32(c), "OUTCOME_CLASS_", "OutcomeClass")
}

// RetryReason says why retry advice said what it said (backstop.v1.RetryReason).
type RetryReason int32

const (
	RetryReasonUnspecified          RetryReason = 0
	RetryReasonSucceeded            RetryReason = 1
	RetryReasonRetryable            RetryReason = 2
	RetryReasonPersistent           RetryReason = 3
	RetryReasonBadInput             RetryReason = 4
	RetryReasonMaxRetries           RetryReason = 5
	RetryReasonRetryBudgetExhausted RetryReason = 6
	RetryReasonCorrectAndRetry      RetryReason = 7
	// RetryReasonCircuitOpen: the target's breaker is open (perhaps opened by
	// this outcome): do not retry it; fall back or defer. Delay says when it
	// admits again.
	RetryReasonCircuitOpen RetryReason = 8
)

func (r RetryReason) String() string {
	return enumName(pb.RetryReason_name, int32(r), "RETRY_REASON_", "RetryReason")
}

// Priority says how urgent a call is (backstop.v1.Priority). A budget may
// reserve headroom for higher priorities (reserve = { interactive = 0.2 }):
// when it runs low, batch and default calls are refused with
// ReasonPriorityReserved while interactive ones keep flowing. Pass it with the
// AtPriority option; unset is PriorityDefault.
type Priority int32

const (
	PriorityUnspecified Priority = 0
	// A person is waiting.
	PriorityInteractive Priority = 1
	PriorityDefault     Priority = 2
	// Background work that can wait.
	PriorityBatch Priority = 3
)

func (p Priority) String() string {
	return enumName(pb.Priority_name, int32(p), "PRIORITY_", "Priority")
}

// RouteStrategy says how Route orders a route's candidates
// (backstop.v1.RouteStrategy). In a request (the Strategy option),
// StrategyUnspecified means the route's own.
type RouteStrategy int32

const (
	StrategyUnspecified RouteStrategy = 0
	// First admissible in list order: a fallback list.
	StrategyOrdered RouteStrategy = 1
	// Random by the route's weights among admissible candidates.
	StrategyWeighted RouteStrategy = 2
	// Fewest outstanding permits.
	StrategyLeastBusy RouteStrategy = 3
	// Lowest recent latency, with a small exploration share.
	StrategyLowestLatency RouteStrategy = 4
	// Lowest expected price: estimated tokens at the input price plus
	// ExpectedOutputTokens at the output price.
	StrategyLowestCost RouteStrategy = 5
	// Largest remaining budget fraction.
	StrategyMostHeadroom RouteStrategy = 6
)

func (s RouteStrategy) String() string {
	return enumName(pb.RouteStrategy_name, int32(s), "ROUTE_STRATEGY_", "RouteStrategy")
}

// BreakerMode is how an operator sets a breaker (backstop.v1.BreakerMode).
type BreakerMode int32

const (
	ModeUnspecified BreakerMode = 0
	ModeAutomatic   BreakerMode = 1
	ModeForceOpen   BreakerMode = 2
	ModeForceClosed BreakerMode = 3
)

func (m BreakerMode) String() string {
	return enumName(pb.BreakerMode_name, int32(m), "BREAKER_MODE_", "BreakerMode")
}

func enumName(names map[int32]string, v int32, prefix, typ string) string {
	if n, ok := names[v]; ok {
		return strings.TrimPrefix(n, prefix)
	}
	return fmt.Sprintf("%s(%d)", typ, v)
}

// Admission is the answer to "may I call target now?" (CanProceed).
type Admission struct {
	Target  string
	Allowed bool
	Reason  Reason
	State   BreakerState
	// When refused: how long until asking again can succeed (0 = unknown).
	RetryAfter time.Duration
	// Permit identifies this admission. It is opaque: pass it back verbatim
	// with the outcome (it releases reserved budget and makes a probe count).
	Permit string
	// Which of the target's API keys to use ("" when the target declares none).
	KeySlot string
	// Shadow mode: the refusal that would have been answered.
	ShadowReason Reason
	// Decided by the local fail-safe because Backstop was unreachable.
	Local bool
	// The server's message (nil for local decisions): fields added by newer
	// servers are there once the stubs are regenerated.
	Raw *pb.CanProceedResponse
}

// RetryAdvice says whether and when to retry the call just reported.
type RetryAdvice struct {
	Retry bool
	// How long to wait first: max(provider hint, jittered backoff).
	Delay  time.Duration
	Reason RetryReason
}

// OutcomeResult is what Backstop made of a reported outcome (RecordOutcome).
type OutcomeResult struct {
	Target       string
	ClassifiedAs OutcomeClass
	State        BreakerState
	Retry        RetryAdvice
	// The permit was from an older breaker generation: counted, did not move the breaker.
	StalePermit bool
	// The permit had been reported already: nothing changed, and the answer
	// repeats the first one (a retried report is safe).
	Duplicate bool
	// What the call cost at the target's prices (its usage times
	// cost_per_mtok_input / cost_per_mtok_output); 0 when the target is
	// unpriced, no usage was reported, or the fail-safe decided.
	Cost  float64
	Local bool
	Raw   *pb.RecordOutcomeResponse
}

// Skip is a route candidate passed over, and why.
type Skip struct {
	Target     string
	Reason     Reason
	RetryAfter time.Duration
}

// RouteDecision says which target of a route should serve a request now (Route).
// Target is "" when no candidate is available: Skipped says why for each,
// RetryAfter when the soonest may be tried again.
type RouteDecision struct {
	Target        string
	Permit        string
	KeySlot       string
	FallbackDepth int
	Skipped       []Skip
	// The chosen target's configured max_tokens (0 = not configured).
	MaxTokens         uint64
	CostPerMTokInput  float64
	CostPerMTokOutput float64
	RetryAfter        time.Duration
	State             BreakerState
	Local             bool
	// The strategy that ordered the candidates (the route's own, or the
	// one the request asked for with the Strategy option).
	Strategy RouteStrategy
	// Why this target, in words, e.g. "least_busy: b has the fewest permits
	// outstanding (1)".
	Reason string
	Raw    *pb.RouteResponse
}

// OutcomeReport is one provider call's outcome, as sent to RecordOutcome.
// Outcome OutcomeUnspecified lets the server classify from HTTPStatus,
// ErrorType and Headers (the normal case for HTTP errors).
type OutcomeReport struct {
	Target       string
	Permit       string
	Outcome      OutcomeClass
	HTTPStatus   int
	ErrorType    string
	Latency      time.Duration
	RetryAfter   time.Duration
	InputTokens  uint64
	OutputTokens uint64
	Attempt      int
	// Raw provider response headers, lower-case names.
	Headers map[string]string
	KeySlot string
	Caller  string
	// The user request this call served (see RequestID); "" = none.
	RequestID string
	// Set on a request's last outcome to close it in the same call (needs
	// RequestID): usually RequestCompleted.
	Finish RequestResult
}

// RequestResult is how a user request ended, after all its retries and fallbacks.
type RequestResult int32

const (
	RequestResultUnspecified RequestResult = RequestResult(pb.RequestResult_REQUEST_RESULT_UNSPECIFIED)
	// Answered.
	RequestCompleted RequestResult = RequestResult(pb.RequestResult_REQUEST_RESULT_COMPLETED)
	// Saved to the deferred queue, to be served later.
	RequestDeferred RequestResult = RequestResult(pb.RequestResult_REQUEST_RESULT_DEFERRED)
	// Given up on: every retry and fallback failed or was refused.
	RequestFailed RequestResult = RequestResult(pb.RequestResult_REQUEST_RESULT_FAILED)
)

func (r RequestResult) String() string {
	switch r {
	case RequestCompleted:
		return "completed"
	case RequestDeferred:
		return "deferred"
	case RequestFailed:
		return "failed"
	}
	return "unspecified"
}

// FinishOptions is the client's own measure of a request, used only by a
// server that never saw it (it started on another replica, or expired).
type FinishOptions struct {
	// A configured route name to count it under (anything else counts as "direct").
	Route    string
	Elapsed  time.Duration
	Attempts int
}

// FinishResult is what FinishRequest got back.
type FinishResult struct {
	// This server saw the request start and measured it itself.
	Tracked bool
	// The request had already been finished: nothing was counted again.
	Duplicate bool
	// From first admission to finish (or the client's Elapsed when not tracked).
	Duration time.Duration
	// Outcomes reported for the request (or the client's Attempts when not tracked).
	Attempts int
	// The route label it was counted under ("direct" when no configured route served it).
	Route string
}

// AttemptError is one failed attempt, refusal or skipped target inside Call.
type AttemptError struct {
	Target string
	// How Backstop classified the failure (OutcomeUnspecified for a refusal or skip).
	Outcome    OutcomeClass
	Message    string
	HTTPStatus int
	// For refusals and skips: why the target was not called.
	Reason     Reason
	RetryAfter time.Duration
	Attempt    int
	// What the provider function returned, for failed attempts.
	Err error
}

func (e AttemptError) String() string {
	if e.Outcome != OutcomeUnspecified {
		what := e.Outcome.String()
		if e.HTTPStatus != 0 {
			what += fmt.Sprintf(" (http %d)", e.HTTPStatus)
		}
		if e.Message != "" {
			return fmt.Sprintf("%s: %s: %s", e.Target, what, e.Message)
		}
		return e.Target + ": " + what
	}
	s := e.Target + ": " + e.Reason.String()
	if e.RetryAfter > 0 {
		s += ", retry in " + roundDuration(e.RetryAfter).String()
	}
	return s
}

// Deferred describes a request saved to a deferred queue.
type Deferred struct {
	ID    string
	Queue string
	// A message for the end user ("your request has been saved...").
	Message   string
	Duplicate bool
	// Items waiting in the queue after this one was added.
	Depth uint64
	// Why it was deferred: every attempt that failed first (from Call).
	Errors []AttemptError
}

// DeferredItem is a claimed deferred request. It comes already admitted: call
// Target with the request in Payload, using KeySlot; the worker reports the
// outcome with Permit.
type DeferredItem struct {
	ID             string
	Queue          string
	Payload        []byte
	Metadata       map[string]string
	LeaseToken     string
	Attempt        int
	MaxAttempts    int
	Target         string
	Permit         string
	KeySlot        string
	LastError      string
	EnqueuedAt     time.Time
	LeaseExpiresAt time.Time
	DeadLetteredAt time.Time
	Raw            *pb.DeferredItem
}

// ClaimResult is what Claim handed out. When Items is empty because the
// queue's target is not admissible, BlockedReason says why and RetryAfter when.
type ClaimResult struct {
	Items         []*DeferredItem
	BlockedReason Reason
	RetryAfter    time.Duration
}

// NackResult says what a Nack did.
type NackResult struct {
	DeadLettered bool
	Attempt      int
}

// QueueStat describes one deferred queue.
type QueueStat struct {
	Queue       string
	Depth       uint64
	InFlight    uint64
	DeadLetters uint64
	OldestAge   time.Duration
	Bytes       uint64
}

func roundDuration(d time.Duration) time.Duration {
	switch {
	case d >= time.Second:
		return d.Round(10 * time.Millisecond)
	case d >= time.Millisecond:
		return d.Round(time.Millisecond)
	}
	return d
}
