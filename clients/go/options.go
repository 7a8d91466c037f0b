package backstop

import (
	"crypto/tls"
	"fmt"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
)

// Policy says what the client does while Backstop is unreachable.
type Policy int

const (
	// FailOpen decides locally: an in-process breaker, the same taxonomy,
	// full-jitter backoff. Agents keep working. The default.
	FailOpen Policy = iota
	// FailClosed refuses every call (*UnreachableError) until Backstop is back.
	FailClosed
)

func (p Policy) String() string {
	if p == FailClosed {
		return "fail-closed"
	}
	return "fail-open"
}

// Logger receives the client's few log lines (one per outage and recovery,
// reports that could not be delivered). *log.Logger satisfies it.
type Logger interface {
	Printf(format string, args ...interface{})
}

type settings struct {
	timeout           time.Duration
	queueTimeout      time.Duration
	connectTimeout    time.Duration
	reconnectInterval time.Duration
	policy            Policy
	local             LocalPolicy
	localRoutes       map[string][]string
	caller            string
	token             string
	creds             credentials.TransportCredentials
	dialOptions       []grpc.DialOption
	logger            Logger
	reconcileLimit    int
	stream            bool
}

func defaultSettings() settings {
	host, _ := os.Hostname()
	return settings{
		timeout:           50 * time.Millisecond,
		queueTimeout:      5 * time.Second,
		connectTimeout:    time.Second,
		reconnectInterval: 500 * time.Millisecond,
		policy:            FailOpen,
		caller:            fmt.Sprintf("%s:%d", host, os.Getpid()),
		logger:            stdLogger{},
		reconcileLimit:    10000,
		stream:            streamEnabledByEnv(),
	}
}

// Option configures a Client.
type Option func(*settings)

// WithTimeout sets the deadline of each decision call (CanProceed,
// RecordOutcome, Route); 50 ms by default. A control plane that cannot
// answer that fast is treated as down rather than slowing every agent call.
func WithTimeout(d time.Duration) Option { return func(s *settings) { s.timeout = d } }

// WithQueueTimeout sets the deadline of deferred-queue and admin calls (5 s).
func WithQueueTimeout(d time.Duration) Option { return func(s *settings) { s.queueTimeout = d } }

// WithConnectTimeout bounds how long the first decision may wait for the
// connection to come up (1 s); after that the fail-safe decides.
func WithConnectTimeout(d time.Duration) Option { return func(s *settings) { s.connectTimeout = d } }

// WithReconnectInterval sets how often the background probe retries an
// unreachable Backstop (500 ms).
func WithReconnectInterval(d time.Duration) Option {
	return func(s *settings) { s.reconnectInterval = d }
}

// WithPolicy chooses FailOpen (default) or FailClosed.
func WithPolicy(p Policy) Option { return func(s *settings) { s.policy = p } }

// WithLocalPolicy sets the local breaker and backoff (default: the server's defaults).
func WithLocalPolicy(p LocalPolicy) Option { return func(s *settings) { s.local = p } }

// WithLocalRoutes gives candidate lists per route for local mode (routes
// seen in Route answers are learned too).
func WithLocalRoutes(routes map[string][]string) Option {
	return func(s *settings) { s.localRoutes = routes }
}

// WithCaller sets the agent id sent with every call (default host:pid);
// it shows in events, e.g. who tripped a breaker.
func WithCaller(id string) Option { return func(s *settings) { s.caller = id } }

// WithToken sends `authorization: Bearer <token>` with every call (the
// server's [server] admin_token guards Admin calls today). Over plaintext
// the token is visible on the network: use WithTLS outside loopback.
func WithToken(token string) Option { return func(s *settings) { s.token = token } }

// WithTLS switches the connection to TLS with this config (nil: the system roots).
func WithTLS(cfg *tls.Config) Option {
	return func(s *settings) { s.creds = credentials.NewTLS(cfg) }
}

// WithTransportCredentials sets gRPC transport credentials (e.g. mTLS).
func WithTransportCredentials(c credentials.TransportCredentials) Option {
	return func(s *settings) { s.creds = c }
}

// WithDialOptions adds gRPC dial options (interceptors, tracing...).
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(s *settings) { s.dialOptions = append(s.dialOptions, opts...) }
}

// WithLogger replaces the default logger (the standard log package).
// Pass nil to silence the client.
func WithLogger(l Logger) Option {
	return func(s *settings) {
		if l == nil {
			l = nopLogger{}
		}
		s.logger = l
	}
}

// WithReconcileLimit bounds how many outcomes decided locally are kept to
// report once Backstop is back (10000; the oldest are dropped first).
func WithReconcileLimit(n int) Option { return func(s *settings) { s.reconcileLimit = n } }

// WithoutStream makes every decision a unary RPC instead of an item on the
// client's Decide stream (the default). The environment variable
// BACKSTOP_STREAM=0 does the same without a code change. Against a server
// without Decide the client falls back to unary calls by itself.
func WithoutStream() Option { return func(s *settings) { s.stream = false } }

type stdLogger struct{}

func (stdLogger) Printf(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, time.Now().Format("2006/01/02 15:04:05 ")+"backstop: "+format+"\n", args...)
}

type nopLogger struct{}

func (nopLogger) Printf(string, ...interface{}) {}

// CallOption tunes one decision, Guard, Call or Defer. Options that do not
// apply to a method are ignored by it.
type CallOption func(*callSettings)

type callSettings struct {
	estimatedTokens       uint64
	requiredContextTokens uint64
	priority              Priority
	maxOutputTokens       uint64
	strategy              RouteStrategy
	expectedOutputTokens  uint64
	attempt               int
	exclude               []string
	candidates            []string
	deferQueue            string
	deferring             bool
	payload               []byte
	metadata              map[string]string
	idempotencyKey        string
	maxAttempts           int
	notBefore             time.Time
	requestID             string
}

func applyCallOptions(opts []CallOption) callSettings {
	var c callSettings
	for _, o := range opts {
		if o != nil {
			o(&c)
		}
	}
	return c
}

// RequestID names the user request a call serves (at most 128 bytes; the
// same on every retry and fallback of it), so the server measures the
// request end to end: backstop_requests_total{route,result}, its duration and
// attempts. Call and Guard make one up when it is not given; see
// Client.FinishRequest for closing one by hand.
func RequestID(id string) CallOption { return func(c *callSettings) { c.requestID = id } }

// EstimatedTokens reserves this many tokens against token budgets (settled
// by the outcome's real usage).
func EstimatedTokens(n uint64) CallOption { return func(c *callSettings) { c.estimatedTokens = n } }

// RequiredContextTokens skips route candidates whose context window is smaller.
func RequiredContextTokens(n uint64) CallOption {
	return func(c *callSettings) { c.requiredContextTokens = n }
}

// AtPriority says how urgent the call is (CanProceed, Route, Guard, Call):
// budgets with a reserve refuse lower priorities first, with
// ReasonPriorityReserved (*PriorityReservedError from Guard). Unset is
// PriorityDefault.
func AtPriority(p Priority) CallOption { return func(c *callSettings) { c.priority = p } }

// MaxOutputTokens is the most output the call may produce: reserved at the
// target's output price against spend limits (CanProceed, Route, Guard,
// Call). A refusal says ReasonSpendLimit (*SpendLimitError from Guard) with
// RetryAfter.
func MaxOutputTokens(n uint64) CallOption { return func(c *callSettings) { c.maxOutputTokens = n } }

// Strategy overrides the route's strategy for Route (and every Route of Call).
func Strategy(s RouteStrategy) CallOption { return func(c *callSettings) { c.strategy = s } }

// ExpectedOutputTokens is the output StrategyLowestCost prices (0: the
// route's own expected_output_tokens).
func ExpectedOutputTokens(n uint64) CallOption {
	return func(c *callSettings) { c.expectedOutputTokens = n }
}

// Attempt marks a retry (> 0 draws on the fleet-wide retry budget).
func Attempt(n int) CallOption { return func(c *callSettings) { c.attempt = n } }

// Exclude skips these route candidates (e.g. targets this request already failed on).
func Exclude(targets ...string) CallOption {
	return func(c *callSettings) { c.exclude = append(c.exclude, targets...) }
}

// Candidates routes over this ad-hoc ordered list instead of a configured
// route (pass "" as the route name).
func Candidates(targets ...string) CallOption {
	return func(c *callSettings) { c.candidates = append([]string(nil), targets...) }
}

// DeferTo makes Call save payload to the deferred queue (a route or target
// name; "" = the route's own queue) when every target fails. Call then
// returns a *DeferredError.
func DeferTo(queue string, payload []byte) CallOption {
	return func(c *callSettings) {
		c.deferring = true
		c.deferQueue = queue
		c.payload = payload
	}
}

// Metadata is stored with a deferred request (session id, task context...).
func Metadata(m map[string]string) CallOption { return func(c *callSettings) { c.metadata = m } }

// IdempotencyKey makes a second Defer with the same key return the first item.
func IdempotencyKey(k string) CallOption { return func(c *callSettings) { c.idempotencyKey = k } }

// MaxAttempts sets the deliveries before a deferred item is dead-lettered.
func MaxAttempts(n int) CallOption { return func(c *callSettings) { c.maxAttempts = n } }

// NotBefore makes a deferred item claimable only from t on.
func NotBefore(t time.Time) CallOption { return func(c *callSettings) { c.notBefore = t } }
