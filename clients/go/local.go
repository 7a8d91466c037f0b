package backstop

// The local fail-safe: what the client decides alone while Backstop is
// unreachable. A small in-process copy of the server's rules with the
// server's defaults: one breaker per target (open after FailureThreshold
// consecutive failures, half-open with one probe after OpenDuration, closed
// after SuccessThreshold probe successes), the same failure taxonomy, a pause
// on 429s that carry a retry hint, and full-jitter backoff. It is
// deliberately per-process: it exists so an agent keeps working (and keeps
// backing off) while its control plane is gone, not to replace the fleet's
// shared view.

import (
	"math"
	"math/rand"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// localPermitPrefix marks permits issued by the local fail-safe. Server
// permits are opaque and never start with it.
const localPermitPrefix = "local:"

// LocalPolicy holds the settings of the local fail-safe. The zero value of a
// field means the server's default (DefaultLocalPolicy).
type LocalPolicy struct {
	FailureThreshold       int
	SuccessThreshold       int
	OpenDuration           time.Duration
	PersistentOpenDuration time.Duration
	// How long a half-open probe may stay unreported before its slot is reclaimed.
	ProbeLease time.Duration
	MaxRetries int
	BaseDelay  time.Duration
	MaxDelay   time.Duration
	// Clamp on a pause a provider's retry hint can impose.
	MaxPause time.Duration
}

// DefaultLocalPolicy is the server's default configuration.
var DefaultLocalPolicy = LocalPolicy{
	FailureThreshold:       5,
	SuccessThreshold:       2,
	OpenDuration:           60 * time.Second,
	PersistentOpenDuration: 10 * time.Minute,
	ProbeLease:             30 * time.Second,
	MaxRetries:             3,
	BaseDelay:              time.Second,
	MaxDelay:               60 * time.Second,
	MaxPause:               time.Hour,
}

func (p LocalPolicy) withDefaults() LocalPolicy {
	d := DefaultLocalPolicy
	if p.FailureThreshold > 0 {
		d.FailureThreshold = p.FailureThreshold
	}
	if p.SuccessThreshold > 0 {
		d.SuccessThreshold = p.SuccessThreshold
	}
	if p.OpenDuration > 0 {
		d.OpenDuration = p.OpenDuration
	}
	if p.PersistentOpenDuration > 0 {
		d.PersistentOpenDuration = p.PersistentOpenDuration
	}
	if p.ProbeLease > 0 {
		d.ProbeLease = p.ProbeLease
	}
	if p.MaxRetries > 0 {
		d.MaxRetries = p.MaxRetries
	}
	if p.BaseDelay > 0 {
		d.BaseDelay = p.BaseDelay
	}
	if p.MaxDelay > 0 {
		d.MaxDelay = p.MaxDelay
	}
	if p.MaxPause > 0 {
		d.MaxPause = p.MaxPause
	}
	return d
}

// FullJitter is the backoff before retry number attempt+1:
// uniform(0, min(maxDelay, base·2^attempt)), with r in [0, 1) the uniform draw.
func FullJitter(attempt int, base, maxDelay time.Duration, r float64) time.Duration {
	if attempt < 0 {
		attempt = 0
	}
	if attempt > 62 {
		attempt = 62
	}
	ceiling := float64(base) * math.Pow(2, float64(attempt))
	if ceiling > float64(maxDelay) {
		ceiling = float64(maxDelay)
	}
	return time.Duration(ceiling * r)
}

// The server's taxonomy markers, matched the same way (case-insensitive substrings).
var (
	quotaMarkers = []string{"insufficient_quota", "credit balance", "credit_balance", "billing",
		"quota_exceeded", "perday", "per_day", "per day", "limit: 0"}
	authMarkers = []string{"authentication_error", "permission_error", "invalid_api_key",
		"incorrect api key", "permission_denied", "unauthenticated", "account_deactivated"}
	badInputMarkers = []string{"invalid_request_error", "invalid_argument", "content_policy",
		"content_filter", "not_found_error"}
	rateMarkers    = []string{"rate_limit", "resource_exhausted", "too_many_requests"}
	timeoutMarkers = []string{"timeout", "timed_out", "deadline_exceeded"}
)

func containsAny(s string, markers []string) bool {
	for _, m := range markers {
		if strings.Contains(s, m) {
			return true
		}
	}
	return false
}

// Classify applies the server's taxonomy: an explicit class wins; then
// quota/credit markers (PERSISTENT even on a 429), then the HTTP status,
// then markers in the error type. The client uses it only while Backstop is
// unreachable; otherwise the server classifies.
func Classify(explicit OutcomeClass, httpStatus int, errorType string) OutcomeClass {
	if explicit != OutcomeUnspecified {
		return explicit
	}
	et := strings.ToLower(errorType)
	is2xx := httpStatus >= 200 && httpStatus < 300
	if !is2xx && containsAny(et, quotaMarkers) {
		return OutcomePersistent
	}
	if httpStatus != 0 {
		switch {
		case is2xx:
			return OutcomeSuccess
		case httpStatus == 408:
			return OutcomeTimeout
		case httpStatus == 429:
			return OutcomeRateLimited
		case httpStatus == 401 || httpStatus == 403:
			return OutcomePersistent
		case httpStatus == 409 || httpStatus == 425 || (httpStatus >= 500 && httpStatus <= 599):
			return OutcomeTransient
		}
		return OutcomeBadInput
	}
	switch {
	case containsAny(et, timeoutMarkers):
		return OutcomeTimeout
	case containsAny(et, authMarkers):
		return OutcomePersistent
	case containsAny(et, rateMarkers):
		return OutcomeRateLimited
	case containsAny(et, badInputMarkers):
		return OutcomeBadInput
	}
	return OutcomeTransient
}

// RetryHint is the provider's retry hint: retry-after-ms, retry-after
// (seconds or an HTTP date) or the explicit value, whichever is longest;
// 0 when there is none. Nonsense (negative, unparseable) counts as absent.
func RetryHint(headers map[string]string, explicit time.Duration, now time.Time) time.Duration {
	best := time.Duration(0)
	if explicit > 0 {
		best = explicit
	}
	for k, v := range headers {
		v = strings.TrimSpace(v)
		var d time.Duration
		switch strings.ToLower(k) {
		case "retry-after-ms":
			if f, err := strconv.ParseFloat(v, 64); err == nil && f > 0 && f < 1e12 {
				d = time.Duration(f * float64(time.Millisecond))
			}
		case "retry-after":
			if f, err := strconv.ParseFloat(v, 64); err == nil {
				if f > 0 && f < 1e9 {
					d = time.Duration(f * float64(time.Second))
				}
			} else if t, err := http.ParseTime(v); err == nil {
				d = t.Sub(now)
			}
		default:
			continue
		}
		if d > best {
			best = d
		}
	}
	return best
}

type localBreaker struct {
	state       BreakerState
	failures    int
	openUntil   time.Time
	successes   int
	probes      map[string]time.Time
	pausedUntil time.Time
}

// localEngine holds the per-process breakers, pauses and retry advice. Safe
// for concurrent use.
type localEngine struct {
	policy LocalPolicy
	now    func() time.Time
	rand   func() float64

	mu       sync.Mutex
	breakers map[string]*localBreaker
	ids      uint64
}

func newLocalEngine(p LocalPolicy) *localEngine {
	src := rand.New(rand.NewSource(time.Now().UnixNano()))
	var rmu sync.Mutex
	return &localEngine{
		policy:   p.withDefaults(),
		now:      time.Now,
		rand:     func() float64 { rmu.Lock(); defer rmu.Unlock(); return src.Float64() },
		breakers: map[string]*localBreaker{},
	}
}

func (e *localEngine) breaker(target string) *localBreaker {
	b := e.breakers[target]
	if b == nil {
		b = &localBreaker{state: StateClosed, probes: map[string]time.Time{}}
		e.breakers[target] = b
	}
	return b
}

func (e *localEngine) tick(b *localBreaker, now time.Time) {
	if b.state == StateOpen && !now.Before(b.openUntil) {
		b.state = StateHalfOpen
		b.successes = 0
		b.probes = map[string]time.Time{}
	}
	if b.state == StateHalfOpen {
		for p, until := range b.probes {
			if !until.After(now) {
				delete(b.probes, p)
			}
		}
	}
}

func (e *localEngine) open(b *localBreaker, now time.Time, d time.Duration) {
	b.state = StateOpen
	if until := now.Add(d); until.After(b.openUntil) {
		b.openUntil = until
	}
	b.failures = 0
	b.successes = 0
	b.probes = map[string]time.Time{}
}

func (e *localEngine) stateOf(target string) BreakerState {
	e.mu.Lock()
	defer e.mu.Unlock()
	b := e.breakers[target]
	if b == nil {
		return StateClosed
	}
	e.tick(b, e.now())
	return b.state
}

// seedOpen carries a fleet refusal seen just before an outage into local
// mode, so a target the fleet had opened is not hammered the moment Backstop
// goes away.
func (e *localEngine) seedOpen(target string, retryAfter time.Duration) {
	if retryAfter <= 0 {
		return
	}
	if retryAfter > e.policy.MaxPause {
		retryAfter = e.policy.MaxPause
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	b := e.breaker(target)
	if b.state == StateClosed {
		b.state = StateOpen
		b.openUntil = e.now().Add(retryAfter)
	}
}

func (e *localEngine) admit(target string) Admission {
	e.mu.Lock()
	defer e.mu.Unlock()
	now := e.now()
	b := e.breaker(target)
	e.tick(b, now)
	refuse := func(r Reason, after time.Duration) Admission {
		if after < 0 {
			after = 0
		}
		return Admission{Target: target, Reason: r, State: b.state, RetryAfter: after, Local: true}
	}
	if b.state == StateOpen {
		return refuse(ReasonCircuitOpen, b.openUntil.Sub(now))
	}
	if b.pausedUntil.After(now) {
		return refuse(ReasonRateLimited, b.pausedUntil.Sub(now))
	}
	e.ids++
	permit := localPermitPrefix + strconv.FormatUint(e.ids, 10)
	if b.state == StateHalfOpen {
		if len(b.probes) > 0 {
			var soonest time.Time
			for _, until := range b.probes {
				if soonest.IsZero() || until.Before(soonest) {
					soonest = until
				}
			}
			return refuse(ReasonProbeLimit, soonest.Sub(now))
		}
		b.probes[permit] = now.Add(e.policy.ProbeLease)
	}
	return Admission{Target: target, Allowed: true, Reason: ReasonAllowed, State: b.state, Permit: permit, Local: true}
}

func (e *localEngine) advise(cls OutcomeClass, attempt int, hint time.Duration) RetryAdvice {
	p := e.policy
	switch cls {
	case OutcomeSuccess:
		return RetryAdvice{Reason: RetryReasonSucceeded}
	case OutcomePersistent:
		return RetryAdvice{Reason: RetryReasonPersistent}
	case OutcomeBadInput:
		return RetryAdvice{Reason: RetryReasonBadInput}
	}
	if attempt >= p.MaxRetries {
		return RetryAdvice{Reason: RetryReasonMaxRetries}
	}
	if cls == OutcomePartial {
		return RetryAdvice{Retry: true, Reason: RetryReasonCorrectAndRetry}
	}
	delay := FullJitter(attempt, p.BaseDelay, p.MaxDelay, e.rand())
	if hint > delay {
		delay = hint
	}
	return RetryAdvice{Retry: true, Delay: delay, Reason: RetryReasonRetryable}
}

func (e *localEngine) record(r OutcomeReport) OutcomeResult {
	cls := Classify(r.Outcome, r.HTTPStatus, r.ErrorType)
	e.mu.Lock()
	defer e.mu.Unlock()
	now := e.now()
	hint := RetryHint(r.Headers, r.RetryAfter, now)
	if hint > e.policy.MaxPause {
		hint = e.policy.MaxPause
	}
	b := e.breaker(r.Target)
	e.tick(b, now)
	_, wasProbe := b.probes[r.Permit]
	delete(b.probes, r.Permit)
	const (
		ignore = iota
		success
		failure
		persistent
	)
	effect := failure
	switch {
	case cls == OutcomeRateLimited && hint > 0:
		if until := now.Add(hint); until.After(b.pausedUntil) {
			b.pausedUntil = until
		}
		effect = ignore
	case cls == OutcomeSuccess || cls == OutcomePartial:
		effect = success
	case cls == OutcomePersistent:
		effect = persistent
	case cls == OutcomeBadInput:
		effect = ignore
	}
	p := e.policy
	switch {
	case effect == persistent:
		e.open(b, now, p.PersistentOpenDuration)
	case b.state == StateHalfOpen && wasProbe:
		if effect == success {
			b.successes++
			if b.successes >= p.SuccessThreshold {
				b.state = StateClosed
				b.failures = 0
				b.probes = map[string]time.Time{}
			}
		} else if effect == failure {
			e.open(b, now, p.OpenDuration)
		}
	case b.state == StateClosed:
		if effect == success {
			b.failures = 0
		} else if effect == failure {
			b.failures++
			if b.failures >= p.FailureThreshold {
				e.open(b, now, p.OpenDuration)
			}
		}
	}
	return OutcomeResult{
		Target:       r.Target,
		ClassifiedAs: cls,
		State:        b.state,
		Retry:        e.advise(cls, r.Attempt, hint),
		Local:        true,
	}
}

// route picks the first admissible candidate in list order. A requested
// strategy cannot be applied locally (latencies, load and prices are the
// fleet's, on the server): the decision says StrategyOrdered, and why.
func (e *localEngine) route(candidates, exclude []string, strategy RouteStrategy) RouteDecision {
	why := "local fail-safe (Backstop unreachable): first admissible in list order"
	if strategy != StrategyUnspecified && strategy != StrategyOrdered {
		why += "; " + strings.ToLower(strategy.String()) + " needs the server"
	}
	excluded := map[string]bool{}
	for _, x := range exclude {
		excluded[x] = true
	}
	var skipped []Skip
	for depth, c := range candidates {
		if excluded[c] {
			skipped = append(skipped, Skip{Target: c, Reason: ReasonExcluded})
			continue
		}
		a := e.admit(c)
		if a.Allowed {
			return RouteDecision{Target: c, Permit: a.Permit, FallbackDepth: depth, Skipped: skipped, State: a.State, Local: true,
				Strategy: StrategyOrdered, Reason: why}
		}
		skipped = append(skipped, Skip{Target: c, Reason: a.Reason, RetryAfter: a.RetryAfter})
	}
	return RouteDecision{Skipped: skipped, RetryAfter: soonest(skipped), Local: true, Strategy: StrategyOrdered}
}

func soonest(skipped []Skip) time.Duration {
	var best time.Duration
	for _, s := range skipped {
		if s.RetryAfter > 0 && (best == 0 || s.RetryAfter < best) {
			best = s.RetryAfter
		}
	}
	return best
}

// routeMemory keeps candidate lists of routes, as configured locally and as
// learned from Route answers (every skipped target and the chosen one, in
// order), so the fail-safe can fall back along the order the server uses.
type routeMemory struct {
	mu     sync.Mutex
	routes map[string][]string
}

func newRouteMemory(configured map[string][]string) *routeMemory {
	m := &routeMemory{routes: map[string][]string{}}
	for k, v := range configured {
		m.routes[k] = append([]string(nil), v...)
	}
	return m
}

func (m *routeMemory) learn(route string, d RouteDecision) {
	var observed []string
	for _, s := range d.Skipped {
		observed = append(observed, s.Target)
	}
	if d.Target != "" {
		observed = append(observed, d.Target)
	}
	if len(observed) == 0 {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	known := m.routes[route]
	index := func(t string) int {
		for i, k := range known {
			if k == t {
				return i
			}
		}
		return -1
	}
	for i, t := range observed {
		if index(t) >= 0 {
			continue
		}
		at := 0
		if i > 0 {
			at = index(observed[i-1]) + 1
		}
		known = append(known, "")
		copy(known[at+1:], known[at:])
		known[at] = t
	}
	m.routes[route] = known
}

func (m *routeMemory) candidates(route string) []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]string(nil), m.routes[route]...)
}

// counter is a tiny atomic counter for stats.
type counter struct{ n int64 }

func (c *counter) add(d int64) { atomic.AddInt64(&c.n, d) }
func (c *counter) get() int64  { return atomic.LoadInt64(&c.n) }
