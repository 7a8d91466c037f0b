// Package backstop is the Go client of Backstop, the resilience control plane
// for fleets of AI agents.
//
// Instead of every agent process carrying its own retry loop, circuit
// breaker, fallback router and "save the failed request" queue, each with a
// partial view, every process asks one Backstop server "may I call this model
// now?" and tells it what happened. The fleet then shares one breaker per
// model, one set of rate-limit budgets, one retry budget and one fallback order.
//
//   - Client.Guard: one provider call between CanProceed and RecordOutcome,
//     with failures classified from the provider's error.
//   - Client.Call: the whole route → call → report → retry → fall back → defer loop.
//   - Transport: an http.RoundTripper that guards any HTTP-based provider SDK.
//   - DeferredWorker: drains requests deferred while every model was down.
//   - Client.Watch: the live event stream (breaker transitions, fallbacks...).
//   - Every decision of a Client travels over one bidirectional Decide stream
//     (unary calls with WithoutStream, BACKSTOP_STREAM=0, or a server without it).
//   - A fail-safe: when Backstop itself is unreachable, decisions are taken
//     locally (an in-process breaker and full-jitter backoff) until it is back,
//     and what was decided meanwhile is reported to it then. An agent is never
//     taken down by its control plane.
package backstop

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	pb "github.com/backstop-dev/backstop/clients/go/backstopv1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Mode says who takes the decisions right now.
type Mode string

const (
	// ModeRemote: Backstop answers; decisions are the fleet's.
	ModeRemote Mode = "remote"
	// ModeLocal: Backstop is unreachable; the local fail-safe decides.
	ModeLocal Mode = "local"
)

// Client talks to one Backstop server. It is safe for concurrent use: create
// one per process and share it.
type Client struct {
	addr string
	s    settings

	conn       *grpc.ClientConn
	dec        decisionTransport
	resilience pb.ResilienceClient
	admin      pb.AdminClient
	deferred   pb.DeferredClient
	events     pb.EventsClient
	health     healthpb.HealthClient

	local  *localEngine
	routes *routeMemory
	rec    *reconciler

	mu        sync.Mutex
	remote    int32 // 1 while decisions are remote (atomic)
	downSince time.Time
	connected sync.Once
	probing   int32
	closed    chan struct{}
	closeOnce sync.Once
	wg        sync.WaitGroup
}

// New creates a client for the Backstop gRPC listener at addr (host:port).
// It does not wait for the connection: the first decision waits for it up to
// the connect timeout, then decides locally if it is not up.
func New(addr string, opts ...Option) (*Client, error) {
	s := defaultSettings()
	for _, o := range opts {
		if o != nil {
			o(&s)
		}
	}
	if addr == "" {
		return nil, errors.New("backstop: empty address (want host:port of the gRPC listener)")
	}
	if s.timeout <= 0 || s.queueTimeout <= 0 || s.reconnectInterval <= 0 || s.connectTimeout <= 0 {
		return nil, errors.New("backstop: timeouts and the reconnect interval must be positive")
	}
	if s.policy != FailOpen && s.policy != FailClosed {
		return nil, fmt.Errorf("backstop: unknown policy %d", s.policy)
	}
	dial := []grpc.DialOption{
		// Reconnect quickly after an outage, so switching back is prompt
		// (gRPC's default backoff grows to two minutes).
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff: backoff.Config{
				BaseDelay:  s.reconnectInterval,
				Multiplier: 1.6,
				Jitter:     0.2,
				MaxDelay:   maxDur(s.reconnectInterval, 2*time.Second),
			},
			MinConnectTimeout: maxDur(s.connectTimeout, time.Second),
		}),
	}
	if s.creds != nil {
		dial = append(dial, grpc.WithTransportCredentials(s.creds))
	} else {
		dial = append(dial, grpc.WithInsecure())
	}
	if s.token != "" {
		dial = append(dial, grpc.WithPerRPCCredentials(bearer{token: s.token, secure: s.creds != nil}))
	}
	dial = append(dial, s.dialOptions...)
	conn, err := grpc.Dial(addr, dial...)
	if err != nil {
		return nil, fmt.Errorf("backstop: dial %s: %w", addr, err)
	}
	c := &Client{
		addr:       addr,
		s:          s,
		conn:       conn,
		resilience: pb.NewResilienceClient(conn),
		admin:      pb.NewAdminClient(conn),
		deferred:   pb.NewDeferredClient(conn),
		events:     pb.NewEventsClient(conn),
		health:     healthpb.NewHealthClient(conn),
		local:      newLocalEngine(s.local),
		routes:     newRouteMemory(s.localRoutes),
		remote:     1,
		closed:     make(chan struct{}),
	}
	if s.stream {
		c.dec = newStreamDecisions(c, unaryDecisions{c.resilience})
	} else {
		c.dec = unaryDecisions{c.resilience}
	}
	c.rec = newReconciler(c)
	return c, nil
}

func maxDur(a, b time.Duration) time.Duration {
	if a > b {
		return a
	}
	return b
}

// Close stops the background probe, ends the Decide stream and closes the
// connection. Decisions still in flight fail with CANCELED.
func (c *Client) Close() error {
	var err error
	c.closeOnce.Do(func() {
		close(c.closed)
		c.dec.close()
		err = c.conn.Close()
		c.wg.Wait()
	})
	return err
}

// Mode says whether decisions are the server's (ModeRemote) or the local
// fail-safe's (ModeLocal).
func (c *Client) Mode() Mode {
	if c.isRemote() {
		return ModeRemote
	}
	return ModeLocal
}

// Caller is the agent id sent with every call.
func (c *Client) Caller() string { return c.s.caller }

// Conn is the gRPC connection, for the generated stubs (package backstopv1).
func (c *Client) Conn() *grpc.ClientConn { return c.conn }

// PendingReports is how many locally decided outcomes wait to be reported.
func (c *Client) PendingReports() int { return c.rec.len() }

// bearer sends `authorization: Bearer <token>` with every call.
type bearer struct {
	token  string
	secure bool
}

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + b.token}, nil
}

// RequireTransportSecurity is false so a token also works against today's
// plaintext servers; with WithTLS it travels encrypted.
func (b bearer) RequireTransportSecurity() bool { return b.secure }

// decisionTransport carries the decision calls: the Decide stream by
// default (stream.go: one stream per client, answers matched to requests,
// unary as its fallback), or unary RPCs (WithoutStream, BACKSTOP_STREAM=0),
// picked in New. Both fail the way a unary call does (the same status
// codes), so everything above this interface (the fail-safe, Guard, Call,
// the Transport) is the same for both.
type decisionTransport interface {
	canProceed(context.Context, *pb.CanProceedRequest) (*pb.CanProceedResponse, error)
	recordOutcome(context.Context, *pb.RecordOutcomeRequest) (*pb.RecordOutcomeResponse, error)
	route(context.Context, *pb.RouteRequest) (*pb.RouteResponse, error)
	recordOutcomeBatch(context.Context, *pb.RecordOutcomeBatchRequest) (*pb.RecordOutcomeBatchResponse, error)
	close()
}

type unaryDecisions struct{ c pb.ResilienceClient }

func (unaryDecisions) close() {}

func (u unaryDecisions) canProceed(ctx context.Context, r *pb.CanProceedRequest) (*pb.CanProceedResponse, error) {
	return u.c.CanProceed(ctx, r)
}

func (u unaryDecisions) recordOutcome(ctx context.Context, r *pb.RecordOutcomeRequest) (*pb.RecordOutcomeResponse, error) {
	return u.c.RecordOutcome(ctx, r)
}

func (u unaryDecisions) route(ctx context.Context, r *pb.RouteRequest) (*pb.RouteResponse, error) {
	return u.c.Route(ctx, r)
}

func (u unaryDecisions) recordOutcomeBatch(ctx context.Context, r *pb.RecordOutcomeBatchRequest) (*pb.RecordOutcomeBatchResponse, error) {
	return u.c.RecordOutcomeBatch(ctx, r)
}

// --- the remote/local switch -------------------------------------------------

func (c *Client) isRemote() bool { return atomic.LoadInt32(&c.remote) == 1 }

func (c *Client) isClosed() bool {
	select {
	case <-c.closed:
		return true
	default:
		return false
	}
}

// waitConnected lets the very first decision wait for the connection (up to
// the connect timeout), so an agent starting next to its control plane does
// not begin in local mode only because the TCP handshake was not done yet.
func (c *Client) waitConnected() {
	ctx, cancel := context.WithTimeout(context.Background(), c.s.connectTimeout)
	defer cancel()
	for {
		st := c.conn.GetState()
		if st == connectivity.Ready {
			return
		}
		if st == connectivity.Shutdown || !c.conn.WaitForStateChange(ctx, st) {
			c.wentDown("connect", fmt.Errorf("not connected within %s", c.s.connectTimeout))
			return
		}
	}
}

// wentDown switches to local decisions, logged once per outage.
func (c *Client) wentDown(method string, err error) {
	c.mu.Lock()
	if !c.isRemote() || c.isClosed() {
		c.mu.Unlock()
		return
	}
	atomic.StoreInt32(&c.remote, 0)
	c.downSince = time.Now()
	c.mu.Unlock()
	c.s.logger.Printf("Backstop at %s is unreachable (%s: %v); deciding locally (%s) and reconnecting in the background",
		c.addr, method, err, c.s.policy)
	c.ensureProber()
}

func (c *Client) cameBack() {
	c.mu.Lock()
	if c.isRemote() {
		c.mu.Unlock()
		return
	}
	atomic.StoreInt32(&c.remote, 1)
	down := time.Since(c.downSince)
	c.mu.Unlock()
	c.s.logger.Printf("Backstop at %s is reachable again after %.1fs; using the fleet's decisions", c.addr, down.Seconds())
}

func (c *Client) ensureProber() {
	if c.isClosed() || c.isRemote() || !atomic.CompareAndSwapInt32(&c.probing, 0, 1) {
		return
	}
	c.wg.Add(1)
	go c.probe()
}

// probe health-checks Backstop until it serves again, reports what was
// decided locally meanwhile, then switches back to remote decisions.
func (c *Client) probe() {
	defer c.wg.Done()
	t := time.NewTicker(c.s.reconnectInterval)
	defer t.Stop()
	for {
		select {
		case <-c.closed:
			atomic.StoreInt32(&c.probing, 0)
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), maxDur(time.Second, c.s.timeout))
		resp, err := c.health.Check(ctx, &healthpb.HealthCheckRequest{Service: "backstop.v1.Resilience"}, grpc.WaitForReady(true))
		cancel()
		if err != nil && isOutageCode(status.Code(err)) {
			continue // still down
		}
		if err == nil && resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			continue // draining or starting
		}
		// Any other answer (SERVING, or no health service) means it is reachable.
		if ferr := c.rec.flush(); ferr != nil {
			continue
		}
		atomic.StoreInt32(&c.probing, 0)
		c.cameBack()
		c.rec.kick() // reports recorded while the flush ran
		return
	}
}

// decide runs a decision call with the fail-safe: remote when possible,
// local otherwise. A caller's cancelled context is returned as such, never
// taken for an outage.
func decide[T any](c *Client, ctx context.Context, method string, remote func(context.Context) (T, error), local func() T) (T, error) {
	var zero T
	if c.isRemote() {
		c.connected.Do(c.waitConnected)
	}
	if c.isRemote() {
		cctx, cancel := context.WithTimeout(ctx, c.s.timeout)
		v, err := remote(cctx)
		cancel()
		if err == nil {
			return v, nil
		}
		if ctx.Err() != nil {
			return zero, ctx.Err()
		}
		code := status.Code(err)
		if !isOutageCode(code) {
			return zero, &ControlPlaneError{Method: method, Code: code, Message: status.Convert(err).Message()}
		}
		c.wentDown(method, err)
	} else {
		c.ensureProber()
	}
	if err := ctx.Err(); err != nil {
		return zero, err
	}
	return local(), nil
}

// --- decisions -----------------------------------------------------------------

// CanProceed asks whether a call may go to target now. A refusal is not an
// error: it is Admission.Allowed == false with Reason and RetryAfter (Guard
// turns it into a typed error). Options: EstimatedTokens, Attempt, AtPriority,
// MaxOutputTokens (the fail-safe accepts and ignores the last two). Errors are a cancelled ctx or a
// *ControlPlaneError (the server rejected the request); an unreachable
// server is answered by the fail-safe.
func (c *Client) CanProceed(ctx context.Context, target string, opts ...CallOption) (Admission, error) {
	cs := applyCallOptions(opts)
	req := &pb.CanProceedRequest{
		Target:          target,
		Caller:          c.s.caller,
		EstimatedTokens: cs.estimatedTokens,
		Attempt:         uint32(max0(cs.attempt)),
		Priority:        pb.Priority(cs.priority),
		MaxOutputTokens: cs.maxOutputTokens,
		RequestId:       cs.requestID,
	}
	return decide(c, ctx, "CanProceed",
		func(ctx context.Context) (Admission, error) {
			r, err := c.dec.canProceed(ctx, req)
			if err != nil {
				return Admission{}, err
			}
			a := admissionOf(target, r)
			if !a.Allowed && a.Reason == ReasonCircuitOpen {
				c.local.seedOpen(target, a.RetryAfter)
			}
			return a, nil
		},
		func() Admission { return c.localAdmit(target) })
}

func (c *Client) localAdmit(target string) Admission {
	if c.s.policy == FailClosed {
		return Admission{Target: target, Reason: ReasonControlPlaneUnavailable, RetryAfter: c.s.reconnectInterval, Local: true}
	}
	return c.local.admit(target)
}

// Route asks which target of route (a configured route name, or "" with the
// Candidates option) should serve a request now; the chosen target comes
// admitted, with a permit. Options: EstimatedTokens, RequiredContextTokens,
// Exclude, Attempt, AtPriority, MaxOutputTokens, Strategy (overrides the
// route's own), ExpectedOutputTokens. The decision's Strategy and Reason say
// how and why the target was chosen. The fail-safe routes in list order.
func (c *Client) Route(ctx context.Context, route string, opts ...CallOption) (RouteDecision, error) {
	cs := applyCallOptions(opts)
	if route == "" && len(cs.candidates) == 0 {
		return RouteDecision{}, errors.New("backstop: Route needs a route name or the Candidates option")
	}
	req := &pb.RouteRequest{
		Route:                 route,
		Candidates:            cs.candidates,
		EstimatedTokens:       cs.estimatedTokens,
		RequiredContextTokens: cs.requiredContextTokens,
		Exclude:               cs.exclude,
		Caller:                c.s.caller,
		Attempt:               uint32(max0(cs.attempt)),
		Strategy:              pb.RouteStrategy(cs.strategy),
		ExpectedOutputTokens:  cs.expectedOutputTokens,
		Priority:              pb.Priority(cs.priority),
		MaxOutputTokens:       cs.maxOutputTokens,
		RequestId:             cs.requestID,
	}
	if route != "" {
		req.Candidates = nil
	}
	return decide(c, ctx, "Route",
		func(ctx context.Context) (RouteDecision, error) {
			r, err := c.dec.route(ctx, req)
			if err != nil {
				return RouteDecision{}, err
			}
			d := routeOf(r)
			if route != "" {
				c.routes.learn(route, d)
			}
			for _, s := range d.Skipped {
				if s.Reason == ReasonCircuitOpen {
					c.local.seedOpen(s.Target, s.RetryAfter)
				}
			}
			return d, nil
		},
		func() RouteDecision {
			cands := cs.candidates
			if route != "" {
				cands = c.routes.candidates(route)
			}
			if c.s.policy == FailClosed {
				d := RouteDecision{RetryAfter: c.s.reconnectInterval, Local: true}
				for _, t := range cands {
					d.Skipped = append(d.Skipped, Skip{Target: t, Reason: ReasonControlPlaneUnavailable, RetryAfter: c.s.reconnectInterval})
				}
				return d
			}
			return c.local.route(cands, cs.exclude, cs.strategy)
		})
}

// RecordOutcome reports what happened to a call (Guard and Call do it for
// you). Outcomes decided locally (a local permit, or Backstop unreachable)
// update the local breaker and are reported to Backstop, without the local
// permit, once it is back.
func (c *Client) RecordOutcome(ctx context.Context, rep OutcomeReport) (OutcomeResult, error) {
	if rep.Caller == "" {
		rep.Caller = c.s.caller
	}
	if isLocalPermit(rep.Permit) {
		res := c.local.record(rep)
		c.rec.add(rep)
		return res, nil
	}
	req := recordRequest(rep)
	return decide(c, ctx, "RecordOutcome",
		func(ctx context.Context) (OutcomeResult, error) {
			r, err := c.dec.recordOutcome(ctx, req)
			if err != nil {
				return OutcomeResult{}, err
			}
			return outcomeOf(rep.Target, r), nil
		},
		func() OutcomeResult {
			res := c.local.record(rep)
			c.rec.add(rep)
			return res
		})
}

// FinishRequest closes the user request requestID (the id sent with the
// RequestID option on its CanProceed / Route / RecordOutcome calls) as
// result: the server counts it in backstop_requests_total and measures its
// duration and attempts. o is the client's own measure, used only by a
// server that never saw the request. Finishing twice is harmless
// (Duplicate). Call and Guard do this on their own.
func (c *Client) FinishRequest(ctx context.Context, requestID string, result RequestResult, o FinishOptions) (FinishResult, error) {
	if requestID == "" {
		return FinishResult{}, errors.New("backstop: FinishRequest needs the request id of the request it closes")
	}
	if result != RequestCompleted && result != RequestDeferred && result != RequestFailed {
		return FinishResult{}, fmt.Errorf("backstop: a request finishes as completed, deferred or failed, not %v", result)
	}
	req := &pb.FinishRequestRequest{
		RequestId: requestID,
		Result:    pb.RequestResult(result),
		Route:     o.Route,
		Attempts:  uint32(max0(o.Attempts)),
	}
	if o.Elapsed > 0 {
		req.Elapsed = pbDur(o.Elapsed)
	}
	var r *pb.FinishRequestResponse
	err := c.unary(ctx, "FinishRequest", c.s.timeout, func(ctx context.Context) (err error) {
		r, err = c.resilience.FinishRequest(ctx, req)
		return
	})
	if err != nil {
		return FinishResult{}, err
	}
	return FinishResult{Tracked: r.GetTracked(), Duplicate: r.GetDuplicate(), Duration: r.GetDuration().AsDuration(),
		Attempts: int(r.GetAttempts()), Route: r.GetRoute()}, nil
}

// finishQuietly is FinishRequest for Call and Guard: skipped while the
// fail-safe decides, and never an error for the caller (the request then
// expires on the server). It runs even when ctx was cancelled.
func (c *Client) finishQuietly(ctx context.Context, requestID string, result RequestResult, o FinishOptions) {
	if requestID == "" || !c.isRemote() || c.isClosed() {
		return
	}
	if _, err := c.FinishRequest(detached{ctx}, requestID, result, o); err != nil && status.Code(err) != codes.Unimplemented {
		// (Unimplemented: a server older than FinishRequest; nothing to say every call.)
		c.s.logger.Printf("could not finish request %s on Backstop: %v", requestID, err)
	}
}

// newRequestID is a fresh id for one user request: 128 random bits as 32 hex digits.
func newRequestID() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return fmt.Sprintf("%x", time.Now().UnixNano())
	}
	return hex.EncodeToString(b[:])
}

func isLocalPermit(p string) bool {
	return len(p) >= len(localPermitPrefix) && p[:len(localPermitPrefix)] == localPermitPrefix
}

// --- calls without a local fallback (queue, admin) -----------------------------

// waitForReady lets queue and admin calls (which have no local fallback and
// a longer deadline) wait for a reconnecting connection instead of failing
// at once, e.g. right after the server restarted.
var waitForReady = grpc.WaitForReady(true)

func (c *Client) unary(ctx context.Context, method string, timeout time.Duration, call func(context.Context) error) error {
	cctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	err := call(cctx)
	if err == nil {
		return nil
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	st := status.Convert(err)
	return &ControlPlaneError{Method: method, Code: st.Code(), Message: st.Message()}
}

// Defer saves a request to queue (a route or target name) for a
// DeferredWorker. Acknowledged means durable. Options: Metadata,
// IdempotencyKey, NotBefore, MaxAttempts, EstimatedTokens, RequiredContextTokens.
func (c *Client) Defer(ctx context.Context, queue string, payload []byte, opts ...CallOption) (Deferred, error) {
	cs := applyCallOptions(opts)
	req := &pb.DeferRequest{
		Queue:                 queue,
		Payload:               payload,
		Metadata:              cs.metadata,
		IdempotencyKey:        cs.idempotencyKey,
		MaxAttempts:           uint32(max0(cs.maxAttempts)),
		EstimatedTokens:       cs.estimatedTokens,
		RequiredContextTokens: cs.requiredContextTokens,
	}
	if !cs.notBefore.IsZero() {
		req.NotBefore = timestamppb.New(cs.notBefore)
	}
	var r *pb.DeferResponse
	err := c.unary(ctx, "Defer", c.s.queueTimeout, func(ctx context.Context) (err error) {
		r, err = c.deferred.Defer(ctx, req, waitForReady)
		return
	})
	if err != nil {
		return Deferred{}, err
	}
	msg := r.GetMessage()
	if msg == "" {
		msg = "All models are busy right now; your request is saved and will be processed shortly."
	}
	return Deferred{ID: r.GetId(), Queue: queue, Message: msg, Duplicate: r.GetDuplicate(), Depth: r.GetDepth()}, nil
}

// ClaimOptions tunes Claim.
type ClaimOptions struct {
	// At most this many items (default 1, maximum 100).
	MaxItems int
	// How long the worker may hold each item before it is redelivered (server default 60 s).
	Lease time.Duration
	// Long-poll: wait up to this long for work (maximum 60 s); 0 = answer now.
	Wait time.Duration
	// Worker id recorded with the admissions (default: the client's caller).
	Worker string
	// The priority the deliveries are admitted at (unset = PriorityDefault):
	// a background drain that claims as PriorityBatch never uses what budgets
	// reserve for interactive calls.
	Priority Priority
}

// Claim takes up to MaxItems ready items of queue. Items come only while the
// queue's route or target admits a call, each already admitted.
func (c *Client) Claim(ctx context.Context, queue string, o ClaimOptions) (ClaimResult, error) {
	worker := o.Worker
	if worker == "" {
		worker = c.s.caller
	}
	req := &pb.ClaimRequest{Queue: queue, MaxItems: uint32(max0(o.MaxItems)), Lease: pbDur(o.Lease), Wait: pbDur(o.Wait), Worker: worker,
		Priority: pb.Priority(o.Priority)}
	var r *pb.ClaimResponse
	err := c.unary(ctx, "Claim", c.s.queueTimeout+o.Wait, func(ctx context.Context) (err error) {
		r, err = c.deferred.Claim(ctx, req, waitForReady)
		return
	})
	if err != nil {
		return ClaimResult{}, err
	}
	res := ClaimResult{BlockedReason: Reason(r.GetBlockedReason()), RetryAfter: durOf(r.GetRetryAfter())}
	for _, i := range r.GetItems() {
		res.Items = append(res.Items, itemOf(i))
	}
	return res, nil
}

// Ack marks a claimed item done.
func (c *Client) Ack(ctx context.Context, item *DeferredItem) error {
	return c.unary(ctx, "Ack", c.s.queueTimeout, func(ctx context.Context) error {
		_, err := c.deferred.Ack(ctx, &pb.AckRequest{Id: item.ID, LeaseToken: item.LeaseToken}, waitForReady)
		return err
	})
}

// Nack puts a claimed item back, claimable after delay; the server
// dead-letters it after its max attempts.
func (c *Client) Nack(ctx context.Context, item *DeferredItem, delay time.Duration, reason string) (NackResult, error) {
	var r *pb.NackResponse
	err := c.unary(ctx, "Nack", c.s.queueTimeout, func(ctx context.Context) (err error) {
		r, err = c.deferred.Nack(ctx, &pb.NackRequest{Id: item.ID, LeaseToken: item.LeaseToken, Delay: pbDur(delay), Reason: clip(reason, 1024)}, waitForReady)
		return
	})
	if err != nil {
		return NackResult{}, err
	}
	return NackResult{DeadLettered: r.GetDeadLettered(), Attempt: int(r.GetAttempt())}, nil
}

// QueueStats describes queue ("" = every queue).
func (c *Client) QueueStats(ctx context.Context, queue string) ([]QueueStat, error) {
	var r *pb.QueueStatsResponse
	err := c.unary(ctx, "QueueStats", c.s.queueTimeout, func(ctx context.Context) (err error) {
		r, err = c.deferred.QueueStats(ctx, &pb.QueueStatsRequest{Queue: queue}, waitForReady)
		return
	})
	if err != nil {
		return nil, err
	}
	var out []QueueStat
	for _, q := range r.GetQueues() {
		out = append(out, QueueStat{Queue: q.GetQueue(), Depth: q.GetDepth(), InFlight: q.GetInFlight(),
			DeadLetters: q.GetDeadLetters(), OldestAge: durOf(q.GetOldestAge()), Bytes: q.GetBytes()})
	}
	return out, nil
}

// DeadLetters lists the dead-lettered items of queue ("" = every queue), all pages.
func (c *Client) DeadLetters(ctx context.Context, queue string) ([]*DeferredItem, error) {
	var out []*DeferredItem
	token := ""
	for {
		var r *pb.ListDeadLettersResponse
		err := c.unary(ctx, "ListDeadLetters", c.s.queueTimeout, func(ctx context.Context) (err error) {
			r, err = c.deferred.ListDeadLetters(ctx, &pb.ListDeadLettersRequest{Queue: queue, PageSize: 1000, PageToken: token}, waitForReady)
			return
		})
		if err != nil {
			return nil, err
		}
		for _, i := range r.GetItems() {
			out = append(out, itemOf(i))
		}
		if token = r.GetNextPageToken(); token == "" {
			return out, nil
		}
	}
}

// Requeue moves a dead letter back to its queue with a fresh attempt count.
func (c *Client) Requeue(ctx context.Context, id string) error {
	return c.unary(ctx, "Requeue", c.s.queueTimeout, func(ctx context.Context) error {
		_, err := c.deferred.Requeue(ctx, &pb.RequeueRequest{Id: id}, waitForReady)
		return err
	})
}

// --- admin ----------------------------------------------------------------------

// GetTarget is everything Backstop knows about one target.
func (c *Client) GetTarget(ctx context.Context, target string) (*pb.TargetStatus, error) {
	var r *pb.TargetStatus
	err := c.unary(ctx, "GetTarget", c.s.queueTimeout, func(ctx context.Context) (err error) {
		r, err = c.admin.GetTarget(ctx, &pb.GetTargetRequest{Target: target}, waitForReady)
		return
	})
	return r, err
}

// ListTargets lists every target whose name starts with prefix, all pages.
func (c *Client) ListTargets(ctx context.Context, prefix string) ([]*pb.TargetSummary, error) {
	var out []*pb.TargetSummary
	token := ""
	for {
		var r *pb.ListTargetsResponse
		err := c.unary(ctx, "ListTargets", c.s.queueTimeout, func(ctx context.Context) (err error) {
			r, err = c.admin.ListTargets(ctx, &pb.ListTargetsRequest{Prefix: prefix, PageSize: 1000, PageToken: token}, waitForReady)
			return
		})
		if err != nil {
			return nil, err
		}
		out = append(out, r.GetTargets()...)
		if token = r.GetNextPageToken(); token == "" {
			return out, nil
		}
	}
}

// SetBreakerState forces a breaker open or closed, or hands it back to
// automatic control.
func (c *Client) SetBreakerState(ctx context.Context, target string, mode BreakerMode, reason string) (*pb.TargetStatus, error) {
	var r *pb.TargetStatus
	err := c.unary(ctx, "SetBreakerState", c.s.queueTimeout, func(ctx context.Context) (err error) {
		r, err = c.admin.SetBreakerState(ctx, &pb.SetBreakerStateRequest{Target: target, Mode: pb.BreakerMode(mode), Reason: reason}, waitForReady)
		return
	})
	return r, err
}

// ResetTarget gives target a fresh closed breaker.
func (c *Client) ResetTarget(ctx context.Context, target string) (*pb.TargetStatus, error) {
	var r *pb.TargetStatus
	err := c.unary(ctx, "ResetTarget", c.s.queueTimeout, func(ctx context.Context) (err error) {
		r, err = c.admin.ResetTarget(ctx, &pb.ResetTargetRequest{Target: target}, waitForReady)
		return
	})
	return r, err
}
