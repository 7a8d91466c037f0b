package backstop

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
)

// Sentinels for errors.Is. The typed errors below match them, so a caller can
// test the category with errors.Is and read the details with errors.As.
var (
	// ErrRefused matches every refusal: *CircuitOpenError, *RateLimitedError,
	// *PriorityReservedError, *SpendLimitError, *RequestTooLargeError,
	// *UnreachableError, *OtherRefusalError.
	ErrRefused = errors.New("backstop: refused")
	// ErrDeferred matches the *DeferredError Call returns when it saved the
	// request to the deferred queue instead of answering it.
	ErrDeferred = errors.New("backstop: request deferred")
	// ErrAllTargetsFailed matches *AllTargetsFailedError.
	ErrAllTargetsFailed = errors.New("backstop: all targets failed")
	// ErrUnavailable matches a *ControlPlaneError for an outage
	// (UNAVAILABLE or a missed deadline) of a call with no local fallback:
	// the deferred queue, admin calls.
	ErrUnavailable = errors.New("backstop: control plane unavailable")
	// ErrUnauthenticated matches a *ControlPlaneError for UNAUTHENTICATED:
	// no token, or one the server does not accept (see WithToken).
	ErrUnauthenticated = errors.New("backstop: unauthenticated")
	// ErrPermissionDenied matches a *ControlPlaneError for PERMISSION_DENIED:
	// the caller's principal lacks the role the call needs.
	ErrPermissionDenied = errors.New("backstop: permission denied")
)

// Refusal is what every refusal error carries.
type Refusal struct {
	Target string
	Reason Reason
	State  BreakerState
	// How long until asking again can succeed (0 = unknown).
	RetryAfter time.Duration
	// The refusal came from this process's fail-safe, not the fleet's view.
	Local bool
}

func (r Refusal) message() string {
	s := fmt.Sprintf("backstop: %s refused: %s", r.Target, r.Reason)
	if r.RetryAfter > 0 {
		s += "; retry in " + roundDuration(r.RetryAfter).String()
	}
	if r.Local {
		s += " (local fail-safe)"
	}
	return s
}

// RefusedError is implemented by every refusal error: errors.As(err, &r)
// with a RefusedError variable finds any of them.
type RefusedError interface {
	error
	Details() Refusal
}

// CircuitOpenError: the target's breaker is open, forced open, probing with
// every probe slot taken, or every API key of it is disabled.
type CircuitOpenError struct{ Refusal }

func (e *CircuitOpenError) Error() string        { return e.message() }
func (e *CircuitOpenError) Is(target error) bool { return target == ErrRefused }
func (e *CircuitOpenError) Details() Refusal     { return e.Refusal }

// RateLimitedError: a request, token or concurrency budget is spent, the
// provider asked the fleet to pause, or the fleet's retry budget is spent.
// RetryAfter says when the budget admits again.
type RateLimitedError struct{ Refusal }

func (e *RateLimitedError) Error() string        { return e.message() }
func (e *RateLimitedError) Is(target error) bool { return target == ErrRefused }
func (e *RateLimitedError) Details() Refusal     { return e.Refusal }

// PriorityReservedError: the budget's remaining room is reserved for higher
// priorities (its reserve); RetryAfter says when this priority fits again. It
// is a budget refusal, so errors.As(err, &rl) with a *RateLimitedError
// variable finds it too. Not the provider's fault: nothing is reported.
type PriorityReservedError struct{ Refusal }

func (e *PriorityReservedError) Error() string        { return e.message() }
func (e *PriorityReservedError) Is(target error) bool { return target == ErrRefused }
func (e *PriorityReservedError) Details() Refusal     { return e.Refusal }

// As lets errors.As find it as a *RateLimitedError too.
func (e *PriorityReservedError) As(target interface{}) bool { return asRateLimited(e.Refusal, target) }

// SpendLimitError: a spend limit (money per window, on the target or a
// budget group it draws on) would be exceeded by this call's reservation
// (estimated tokens at the input price + MaxOutputTokens at the output
// price); RetryAfter says when the window frees enough. It is a budget
// refusal, so errors.As(err, &rl) with a *RateLimitedError variable finds it
// too. Not the provider's fault: nothing is reported.
type SpendLimitError struct{ Refusal }

func (e *SpendLimitError) Error() string        { return e.message() }
func (e *SpendLimitError) Is(target error) bool { return target == ErrRefused }
func (e *SpendLimitError) Details() Refusal     { return e.Refusal }

// As lets errors.As find it as a *RateLimitedError too.
func (e *SpendLimitError) As(target interface{}) bool { return asRateLimited(e.Refusal, target) }

func asRateLimited(r Refusal, target interface{}) bool {
	if t, ok := target.(**RateLimitedError); ok {
		*t = &RateLimitedError{r}
		return true
	}
	return false
}

// RequestTooLargeError: the estimated tokens exceed what the target's token
// budget can ever admit; waiting will not help.
type RequestTooLargeError struct{ Refusal }

func (e *RequestTooLargeError) Error() string        { return e.message() }
func (e *RequestTooLargeError) Is(target error) bool { return target == ErrRefused }
func (e *RequestTooLargeError) Details() Refusal     { return e.Refusal }

// UnreachableError: the fail-closed policy refuses calls while Backstop is unreachable.
type UnreachableError struct{ Refusal }

func (e *UnreachableError) Error() string        { return e.message() }
func (e *UnreachableError) Is(target error) bool { return target == ErrRefused }
func (e *UnreachableError) Details() Refusal     { return e.Refusal }

// OtherRefusalError carries a refusal reason this client does not know (a
// newer server's); it still matches ErrRefused.
type OtherRefusalError struct{ Refusal }

func (e *OtherRefusalError) Error() string        { return e.message() }
func (e *OtherRefusalError) Is(target error) bool { return target == ErrRefused }
func (e *OtherRefusalError) Details() Refusal     { return e.Refusal }

// refusalError is the most specific refusal error for a's reason.
func refusalError(a Admission) error {
	r := Refusal{Target: a.Target, Reason: a.Reason, State: a.State, RetryAfter: a.RetryAfter, Local: a.Local}
	switch a.Reason {
	case ReasonCircuitOpen, ReasonProbeLimit, ReasonForcedOpen, ReasonKeySlotsUnavailable:
		return &CircuitOpenError{r}
	case ReasonRateLimited, ReasonConcurrencyLimit, ReasonRetryBudgetExhausted:
		return &RateLimitedError{r}
	case ReasonPriorityReserved:
		return &PriorityReservedError{r}
	case ReasonSpendLimit:
		return &SpendLimitError{r}
	case ReasonRequestTooLarge:
		return &RequestTooLargeError{r}
	case ReasonControlPlaneUnavailable:
		return &UnreachableError{r}
	}
	return &OtherRefusalError{r}
}

// ControlPlaneError: Backstop answered with an error that is not a decision:
// a bad request (INVALID_ARGUMENT), an unknown route (NOT_FOUND), a missing
// token (UNAUTHENTICATED)... These are bugs or misconfiguration, so they are
// returned rather than papered over by the fail-safe. Outages (UNAVAILABLE,
// a missed deadline) of calls without a local fallback also come as a
// ControlPlaneError; those match ErrUnavailable.
type ControlPlaneError struct {
	Method  string
	Code    codes.Code
	Message string
}

func (e *ControlPlaneError) Error() string {
	return fmt.Sprintf("backstop: %s: %s: %s", e.Method, e.Code, e.Message)
}

// Is matches ErrUnavailable for outage codes, ErrUnauthenticated and
// ErrPermissionDenied for those codes.
func (e *ControlPlaneError) Is(target error) bool {
	switch target {
	case ErrUnavailable:
		return isOutageCode(e.Code)
	case ErrUnauthenticated:
		return e.Code == codes.Unauthenticated
	case ErrPermissionDenied:
		return e.Code == codes.PermissionDenied
	}
	return false
}

// Unavailable reports whether this is an outage rather than a rejection.
func (e *ControlPlaneError) Unavailable() bool { return isOutageCode(e.Code) }

func isOutageCode(c codes.Code) bool {
	return c == codes.Unavailable || c == codes.DeadlineExceeded
}

// DeferredError is returned by Call when every target failed and the request
// was saved to the deferred queue (the DeferTo option). It matches ErrDeferred;
// Deferred.Message is meant for the end user.
type DeferredError struct {
	Deferred Deferred
}

func (e *DeferredError) Error() string {
	return fmt.Sprintf("backstop: request deferred to queue %q as %s after %d failed attempt(s)",
		e.Deferred.Queue, e.Deferred.ID, len(e.Deferred.Errors))
}

func (e *DeferredError) Is(target error) bool { return target == ErrDeferred }

// AllTargetsFailedError: every target of a route failed or was unavailable.
// Errors lists every attempt and every skipped target in route order, so the
// message reads like a post-mortem; RetryAfter is when the soonest target may
// be available again (0 = unknown).
type AllTargetsFailedError struct {
	Route      string
	Errors     []AttemptError
	RetryAfter time.Duration
	// Set when deferring was asked for and failed too.
	DeferErr error
	Note     string
}

func (e *AllTargetsFailedError) Error() string {
	var b strings.Builder
	seen := map[string]bool{}
	for _, a := range e.Errors {
		seen[a.Target] = true
	}
	fmt.Fprintf(&b, "backstop: all targets failed for %s", e.Route)
	if len(seen) > 0 {
		fmt.Fprintf(&b, " (%d tried or skipped)", len(seen))
	}
	b.WriteString(":")
	for _, a := range e.Errors {
		b.WriteString("\n  - " + a.String())
	}
	if e.Note != "" {
		b.WriteString("\n  (" + e.Note + ")")
	}
	if e.RetryAfter > 0 {
		b.WriteString("\n  soonest retry in " + roundDuration(e.RetryAfter).String())
	}
	if e.DeferErr != nil {
		b.WriteString("\n  and the request could not be deferred: " + e.DeferErr.Error())
	}
	return b.String()
}

func (e *AllTargetsFailedError) Is(target error) bool { return target == ErrAllTargetsFailed }

// Unwrap exposes the defer failure, if any.
func (e *AllTargetsFailedError) Unwrap() error { return e.DeferErr }

// MalformedOutputError marks a reply that arrived but did not parse or
// validate. Returned from a guarded function it is reported as PARTIAL (the
// provider answered; the answer was unusable): a provider success for the
// breaker, and retry advice to correct and retry.
type MalformedOutputError struct {
	Reply string
	Err   error
}

func (e *MalformedOutputError) Error() string {
	if e.Err != nil {
		return "backstop: malformed output: " + e.Err.Error()
	}
	return "backstop: malformed output"
}

func (e *MalformedOutputError) Unwrap() error { return e.Err }

// Malformed wraps err (e.g. a json.Unmarshal error on the model's reply) so
// that it is reported as PARTIAL.
func Malformed(reply string, err error) error { return &MalformedOutputError{Reply: reply, Err: err} }
