package backstop_test

// The Decide stream: decisions multiplexed over one stream per client, against
// the real server (its /metrics say which RPC answered) and against small
// in-test gRPC servers that answer out of order, late, with item errors, end
// the stream, or (an older server) do not implement Decide at all.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	backstop "github.com/backstop-dev/backstop/clients/go"
	"github.com/backstop-dev/backstop/clients/go/backstoptest"
	pb "github.com/backstop-dev/backstop/clients/go/backstopv1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/test/bufconn"
)

// rpcCounts reads backstop_rpc_duration_seconds_count by method from the
// server's /metrics.
func rpcCounts(t testing.TB, srv *backstoptest.Server) map[string]uint64 {
	t.Helper()
	resp, err := http.Get("http://" + srv.HTTPAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	out := map[string]uint64{}
	sc := bufio.NewScanner(resp.Body)
	const prefix = `backstop_rpc_duration_seconds_count{method="`
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, prefix) {
			continue
		}
		rest := line[len(prefix):]
		i := strings.Index(rest, `"}`)
		if i < 0 {
			continue
		}
		n, err := strconv.ParseFloat(strings.TrimSpace(rest[i+2:]), 64)
		if err != nil {
			t.Fatalf("metrics line %q: %v", line, err)
		}
		out[rest[:i]] = uint64(n)
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// decisions makes n Guards (CanProceed + RecordOutcome) and one Route.
func decisions(t testing.TB, bs *backstop.Client, n int) {
	t.Helper()
	ctx := ctxT(t)
	for i := 0; i < n; i++ {
		out, err := bs.Guard(ctx, sonnet, okFn)
		if err != nil || out.Local {
			t.Fatalf("guard %d: %+v %v", i, out, err)
		}
	}
	if d, err := bs.Route(ctx, "", backstop.Candidates(gpt)); err != nil || d.Target != gpt || d.Local {
		t.Fatalf("route: %+v %v", d, err)
	}
}

func TestDecisionsGoOverTheStreamByDefault(t *testing.T) {
	srv := startServer(t, fast)
	bs := newClient(t, srv.Addr)
	decisions(t, bs, 10)
	m := rpcCounts(t, srv)
	if m["Decide.CanProceed"] < 10 || m["Decide.RecordOutcome"] < 10 || m["Decide.Route"] < 1 {
		t.Fatalf("the stream answered: %v", m)
	}
	if m["CanProceed"] != 0 || m["RecordOutcome"] != 0 || m["Route"] != 0 {
		t.Fatalf("no unary decisions: %v", m)
	}
}

func TestStreamOptOut(t *testing.T) {
	for _, tc := range []struct {
		name string
		env  string
		opts []backstop.Option
	}{
		{"WithoutStream", "", []backstop.Option{backstop.WithoutStream()}},
		{"BACKSTOP_STREAM=0", "0", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("BACKSTOP_STREAM", tc.env)
			srv := startServer(t, fast)
			bs := newClient(t, srv.Addr, tc.opts...)
			decisions(t, bs, 5)
			m := rpcCounts(t, srv)
			if m["CanProceed"] < 5 || m["RecordOutcome"] < 5 || m["Route"] < 1 {
				t.Fatalf("unary calls answered: %v", m)
			}
			if m["Decide.CanProceed"] != 0 || m["Decide.RecordOutcome"] != 0 || m["Decide.Route"] != 0 {
				t.Fatalf("the stream is off: %v", m)
			}
		})
	}
}

// Many goroutines share the stream; every answer reaches its own caller.
func TestConcurrentDecisionsShareTheStream(t *testing.T) {
	srv := startServer(t, fast)
	bs := newClient(t, srv.Addr)
	ctx := ctxT(t)
	const workers, each = 16, 25
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			target := fmt.Sprintf("x/worker-%d", w)
			for i := 0; i < each; i++ {
				d, err := bs.Route(ctx, "", backstop.Candidates(target))
				if err != nil || d.Target != target || d.Local || d.Permit == "" {
					errs <- fmt.Errorf("worker %d: %+v %v", w, d, err)
					return
				}
				out, err := bs.RecordOutcome(ctx, backstop.OutcomeReport{Target: target, Permit: d.Permit, Outcome: backstop.OutcomeSuccess})
				if err != nil || out.Local || out.StalePermit {
					errs <- fmt.Errorf("worker %d outcome: %+v %v", w, out, err)
					return
				}
			}
		}(w)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	m := rpcCounts(t, srv)
	if m["Decide.Route"] != workers*each || m["Decide.RecordOutcome"] != workers*each || m["Route"] != 0 {
		t.Fatalf("%v", m)
	}
	for w := 0; w < workers; w++ {
		if n := admitted(t, bs, fmt.Sprintf("x/worker-%d", w)); n != each {
			t.Fatalf("worker %d: admitted %d, want %d", w, n, each)
		}
	}
}

// The server is killed with decisions in flight, then restarted: the fail-safe
// decides meanwhile, and a new stream carries the decisions afterwards.
func TestStreamSurvivesAKillAndRestart(t *testing.T) {
	srv := startServer(t, fast)
	logs := &logRecorder{}
	bs := newClient(t, srv.Addr, backstop.WithTimeout(250*time.Millisecond), backstop.WithLocalPolicy(localFast),
		backstop.WithReconnectInterval(100*time.Millisecond), backstop.WithLogger(logs))
	var (
		stop            = make(chan struct{})
		wg              sync.WaitGroup
		calls, failures int64
		remote, local   int64
		firstErr        atomic.Value
	)
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				out, err := bs.Guard(context.Background(), sonnet, okFn)
				atomic.AddInt64(&calls, 1)
				switch {
				case err != nil:
					atomic.AddInt64(&failures, 1)
					firstErr.Store(err)
				case out.Local:
					atomic.AddInt64(&local, 1)
				default:
					atomic.AddInt64(&remote, 1)
				}
			}
		}()
	}
	defer func() { close(stop); wg.Wait() }()
	waitFor(t, 10*time.Second, "remote decisions", func() bool { return atomic.LoadInt64(&remote) >= 50 })
	srv.Kill()
	waitFor(t, 5*time.Second, "local decisions", func() bool { return bs.Mode() == backstop.ModeLocal })
	l := atomic.LoadInt64(&local)
	waitFor(t, 5*time.Second, "more local decisions", func() bool { return atomic.LoadInt64(&local) >= l+50 })
	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "reconnecting", func() bool { return bs.Mode() == backstop.ModeRemote })
	r := atomic.LoadInt64(&remote)
	waitFor(t, 10*time.Second, "remote decisions after the restart", func() bool { return atomic.LoadInt64(&remote) >= r+50 })
	if n := atomic.LoadInt64(&failures); n != 0 {
		t.Fatalf("%d of %d guarded calls failed across the outage, e.g. %v", n, atomic.LoadInt64(&calls), firstErr.Load())
	}
	m := rpcCounts(t, srv) // the restarted server's
	if m["Decide.CanProceed"] < 50 || m["CanProceed"] != 0 {
		t.Fatalf("a new stream carries the decisions: %v", m)
	}
	if logs.count("is unreachable") != 1 || logs.count("reachable again") != 1 {
		t.Fatalf("one log line per outage and recovery:\n%s", logs)
	}
}

func TestItemErrorsAreTheUnaryErrors(t *testing.T) {
	srv := startServer(t, fast)
	bs := newClient(t, srv.Addr)
	ctx := ctxT(t)
	var cpe *backstop.ControlPlaneError
	_, err := bs.CanProceed(ctx, "")
	if !errors.As(err, &cpe) || cpe.Code != codes.InvalidArgument || cpe.Method != "CanProceed" || cpe.Unavailable() {
		t.Fatalf("empty target: %v", err)
	}
	_, err = bs.Route(ctx, "no-such-route")
	if !errors.As(err, &cpe) || cpe.Code != codes.NotFound || errors.Is(err, backstop.ErrUnavailable) {
		t.Fatalf("unknown route: %v", err)
	}
	_, err = bs.RecordOutcome(ctx, backstop.OutcomeReport{})
	if !errors.As(err, &cpe) || cpe.Code != codes.InvalidArgument {
		t.Fatalf("empty outcome: %v", err)
	}
	if bs.Mode() != backstop.ModeRemote {
		t.Fatal("item errors are not outages")
	}
	// The stream goes on after item errors.
	if a, err := bs.CanProceed(ctx, sonnet); err != nil || !a.Allowed || a.Local {
		t.Fatalf("%+v %v", a, err)
	}
	m := rpcCounts(t, srv)
	if m["Decide.CanProceed"] != 2 || m["Decide.Route"] != 1 || m["CanProceed"] != 0 || m["Route"] != 0 {
		t.Fatalf("answered on the stream: %v", m)
	}
}

// --- in-test servers -------------------------------------------------------------

// decideServer is a Resilience server for one test: Decide answers with
// answer (nil = never); reverse > 0 holds that many items, then answers
// them last first; endAfter > 0 ends each of the first endAfter streams
// after reading one item, without answering it. The unary methods answer too
// (counted), for the fallbacks.
type decideServer struct {
	pb.UnimplementedResilienceServer
	answer   func(*pb.DecideRequest) *pb.DecideResponse
	reverse  int
	endAfter int

	mu      sync.Mutex
	streams int
	items   []*pb.DecideRequest
	unary   int
}

func (f *decideServer) Decide(s pb.Resilience_DecideServer) error {
	f.mu.Lock()
	f.streams++
	n := f.streams
	f.mu.Unlock()
	var held []*pb.DecideRequest
	for {
		r, err := s.Recv()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		f.mu.Lock()
		f.items = append(f.items, r)
		f.mu.Unlock()
		if n <= f.endAfter {
			return nil // a drain: the stream ends, this item unanswered
		}
		if f.reverse > 0 {
			held = append(held, r)
			if len(held) < f.reverse {
				continue
			}
			for i := len(held) - 1; i >= 0; i-- {
				if err := s.Send(f.answerOf(held[i])); err != nil {
					return err
				}
			}
			held = nil
			continue
		}
		if resp := f.answerOf(r); resp != nil {
			if err := s.Send(resp); err != nil {
				return err
			}
		}
	}
}

func (f *decideServer) answerOf(r *pb.DecideRequest) *pb.DecideResponse {
	if f.answer != nil {
		return f.answer(r)
	}
	return okAnswer(r)
}

// okAnswer admits with a permit naming the target, so a mismatched answer shows.
func okAnswer(r *pb.DecideRequest) *pb.DecideResponse {
	switch q := r.Request.(type) {
	case *pb.DecideRequest_CanProceed:
		return &pb.DecideResponse{Id: r.Id, Response: &pb.DecideResponse_CanProceed{CanProceed: canProceedAnswer(q.CanProceed)}}
	case *pb.DecideRequest_RecordOutcome:
		return &pb.DecideResponse{Id: r.Id, Response: &pb.DecideResponse_RecordOutcome{RecordOutcome: &pb.RecordOutcomeResponse{}}}
	case *pb.DecideRequest_Route:
		return &pb.DecideResponse{Id: r.Id, Response: &pb.DecideResponse_Route{Route: routeAnswer(q.Route)}}
	}
	return &pb.DecideResponse{Id: r.Id, Response: &pb.DecideResponse_Error{Error: &pb.ItemError{Code: int32(codes.InvalidArgument), Message: "empty item"}}}
}

func canProceedAnswer(q *pb.CanProceedRequest) *pb.CanProceedResponse {
	return &pb.CanProceedResponse{Allowed: true, Reason: pb.Reason_REASON_ALLOWED, Permit: "permit:" + q.GetTarget()}
}

func routeAnswer(q *pb.RouteRequest) *pb.RouteResponse {
	t := "x/default"
	if len(q.GetCandidates()) > 0 {
		t = q.GetCandidates()[0]
	}
	return &pb.RouteResponse{Target: t, Permit: "permit:" + t}
}

func itemErr(id uint64, code codes.Code, msg string) *pb.DecideResponse {
	return &pb.DecideResponse{Id: id, Response: &pb.DecideResponse_Error{Error: &pb.ItemError{Code: int32(code), Message: msg}}}
}

func (f *decideServer) CanProceed(_ context.Context, q *pb.CanProceedRequest) (*pb.CanProceedResponse, error) {
	f.mu.Lock()
	f.unary++
	f.mu.Unlock()
	return canProceedAnswer(q), nil
}

func (f *decideServer) RecordOutcome(context.Context, *pb.RecordOutcomeRequest) (*pb.RecordOutcomeResponse, error) {
	f.mu.Lock()
	f.unary++
	f.mu.Unlock()
	return &pb.RecordOutcomeResponse{}, nil
}

func (f *decideServer) Route(_ context.Context, q *pb.RouteRequest) (*pb.RouteResponse, error) {
	f.mu.Lock()
	f.unary++
	f.mu.Unlock()
	return routeAnswer(q), nil
}

func (f *decideServer) counts() (streams, items, unary int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.streams, len(f.items), f.unary
}

// serveInTest serves srv (a grpc-go Resilience server) in memory and returns
// the client options that reach it.
func serveInTest(t testing.TB, srv pb.ResilienceServer, opts ...grpc.ServerOption) []backstop.Option {
	lis := bufconn.Listen(1 << 20)
	s := grpc.NewServer(opts...)
	pb.RegisterResilienceServer(s, srv)
	go func() { _ = s.Serve(lis) }()
	t.Cleanup(s.Stop)
	return []backstop.Option{backstop.WithDialOptions(grpc.WithContextDialer(func(context.Context, string) (net.Conn, error) { return lis.Dial() }))}
}

func TestOutOfOrderAnswersReachTheirCallers(t *testing.T) {
	const n = 20
	f := &decideServer{reverse: n} // holds n items, answers them last first
	bs := newClient(t, "bufconn", serveInTest(t, f)...)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			target := fmt.Sprintf("x/m%d", i)
			if i%2 == 0 {
				a, err := bs.CanProceed(ctxT(t), target)
				if err != nil || a.Local || a.Permit != "permit:"+target {
					errs <- fmt.Errorf("%s: %+v %v", target, a, err)
				}
				return
			}
			d, err := bs.Route(ctxT(t), "", backstop.Candidates(target))
			if err != nil || d.Local || d.Target != target || d.Permit != "permit:"+target {
				errs <- fmt.Errorf("%s: %+v %v", target, d, err)
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	streams, items, unary := f.counts()
	if streams != 1 || items != n || unary != 0 {
		t.Fatalf("one stream, %d items, no unary calls: got %d streams, %d items, %d unary", n, streams, items, unary)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	seen := map[uint64]bool{}
	for _, r := range f.items {
		if seen[r.Id] {
			t.Fatalf("id %d used twice", r.Id)
		}
		seen[r.Id] = true
	}
}

func TestItemDeadlineFallsBackToTheFailSafe(t *testing.T) {
	f := &decideServer{answer: func(r *pb.DecideRequest) *pb.DecideResponse {
		switch r.GetCanProceed().GetTarget() {
		case "x/never":
			return nil // a decision that hangs
		case "x/late":
			return itemErr(r.Id, codes.DeadlineExceeded, "not decided within the item's deadline")
		}
		return okAnswer(r)
	}}
	logs := &logRecorder{}
	opts := append(serveInTest(t, f), backstop.WithTimeout(100*time.Millisecond), backstop.WithReconnectInterval(50*time.Millisecond), backstop.WithLogger(logs))
	bs := newClient(t, "bufconn", opts...)
	ctx := ctxT(t)
	if a, err := bs.CanProceed(ctx, "x/ok"); err != nil || a.Local || a.Permit != "permit:x/ok" {
		t.Fatalf("%+v %v", a, err)
	}
	start := time.Now()
	a, err := bs.CanProceed(ctx, "x/never")
	if took := time.Since(start); err != nil || !a.Local || !a.Allowed || took > time.Second {
		t.Fatalf("a hung item is decided locally after the 100 ms deadline: %+v %v after %s", a, err, took)
	}
	f.mu.Lock()
	dl := f.items[len(f.items)-1].GetDeadline().AsDuration()
	f.mu.Unlock()
	if dl <= 0 || dl > 100*time.Millisecond {
		t.Fatalf("the item carries what is left of the deadline: %s", dl)
	}
	if logs.count("is unreachable") != 1 {
		t.Fatalf("the same fail-safe path as a unary timeout:\n%s", logs)
	}
	// The probe finds the server (it has no health service: reachable) and
	// the decisions go back to the same stream.
	waitFor(t, 5*time.Second, "remote again", func() bool { return bs.Mode() == backstop.ModeRemote })
	if a, err := bs.CanProceed(ctx, "x/late"); err != nil || !a.Local {
		t.Fatalf("an item DEADLINE_EXCEEDED by the server is decided locally: %+v %v", a, err)
	}
	waitFor(t, 5*time.Second, "remote again", func() bool { return bs.Mode() == backstop.ModeRemote })
	if a, err := bs.CanProceed(ctx, "x/ok"); err != nil || a.Local {
		t.Fatalf("%+v %v", a, err)
	}
	// The stream that answered nothing while x/never waited was replaced;
	// an item error on a stream that answers does not replace it.
	if streams, _, unary := f.counts(); streams != 2 || unary != 0 {
		t.Fatalf("want 2 streams and no unary calls, got %d streams, %d unary calls", streams, unary)
	}
}

func TestAFullStreamSendsTheItemUnary(t *testing.T) {
	f := &decideServer{answer: func(r *pb.DecideRequest) *pb.DecideResponse {
		if r.GetCanProceed().GetTarget() == "x/busy" {
			return itemErr(r.Id, codes.ResourceExhausted, "this stream already has 1024 requests outstanding")
		}
		return okAnswer(r)
	}}
	bs := newClient(t, "bufconn", serveInTest(t, f)...)
	a, err := bs.CanProceed(ctxT(t), "x/busy")
	if err != nil || a.Local || a.Permit != "permit:x/busy" {
		t.Fatalf("%+v %v", a, err)
	}
	if _, items, unary := f.counts(); items != 1 || unary != 1 {
		t.Fatalf("refused on the stream, answered unary: %d items, %d unary", items, unary)
	}
	if a, err := bs.CanProceed(ctxT(t), "x/ok"); err != nil || a.Local {
		t.Fatalf("%+v %v", a, err)
	}
	if _, items, unary := f.counts(); items != 2 || unary != 1 {
		t.Fatalf("the next item uses the stream again: %d items, %d unary", items, unary)
	}
}

func TestItemsUnansweredAtAStreamsCleanEndAreSentAgain(t *testing.T) {
	f := &decideServer{endAfter: 1} // the first stream ends (a drain) with its item unanswered
	logs := &logRecorder{}
	bs := newClient(t, "bufconn", append(serveInTest(t, f), backstop.WithLogger(logs))...)
	a, err := bs.CanProceed(ctxT(t), "x/m")
	if err != nil || a.Local || a.Permit != "permit:x/m" {
		t.Fatalf("%+v %v", a, err)
	}
	if streams, items, unary := f.counts(); streams != 2 || items != 2 || unary != 0 {
		t.Fatalf("sent again on a new stream: %d streams, %d items, %d unary", streams, items, unary)
	}
	if bs.Mode() != backstop.ModeRemote || logs.count("unreachable") != 0 {
		t.Fatalf("a drain is not an outage:\n%s", logs)
	}
}

// olderServer is a Backstop without Decide: only the unary methods.
type olderServer struct {
	pb.UnimplementedResilienceServer
	unary int64
}

func (s *olderServer) CanProceed(_ context.Context, q *pb.CanProceedRequest) (*pb.CanProceedResponse, error) {
	atomic.AddInt64(&s.unary, 1)
	return canProceedAnswer(q), nil
}

func (s *olderServer) RecordOutcome(context.Context, *pb.RecordOutcomeRequest) (*pb.RecordOutcomeResponse, error) {
	atomic.AddInt64(&s.unary, 1)
	return &pb.RecordOutcomeResponse{}, nil
}

func (s *olderServer) Route(_ context.Context, q *pb.RouteRequest) (*pb.RouteResponse, error) {
	atomic.AddInt64(&s.unary, 1)
	return routeAnswer(q), nil
}

func TestFallbackToUnaryOnAnOlderServerIsRemembered(t *testing.T) {
	older := &olderServer{}
	var decideCalls int64
	count := grpc.StreamInterceptor(func(srv interface{}, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
		if info.FullMethod == "/backstop.v1.Resilience/Decide" {
			atomic.AddInt64(&decideCalls, 1)
		}
		return h(srv, ss)
	})
	logs := &logRecorder{}
	bs := newClient(t, "bufconn", append(serveInTest(t, older, count), backstop.WithLogger(logs))...)
	ctx := ctxT(t)
	// The first decisions race to the stream together; all are answered.
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			target := fmt.Sprintf("x/m%d", i)
			a, err := bs.CanProceed(ctx, target)
			if err != nil || a.Local || a.Permit != "permit:"+target {
				errs <- fmt.Errorf("%s: %+v %v", target, a, err)
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	for i := 0; i < 5; i++ {
		out, err := bs.Guard(ctx, "x/guarded", okFn)
		if err != nil || out.Local {
			t.Fatalf("%+v %v", out, err)
		}
	}
	if d, err := bs.Route(ctx, "", backstop.Candidates(gpt)); err != nil || d.Local || d.Target != gpt {
		t.Fatalf("%+v %v", d, err)
	}
	if n := atomic.LoadInt64(&decideCalls); n != 1 {
		t.Fatalf("Decide tried %d times, want once (then remembered)", n)
	}
	if n := atomic.LoadInt64(&older.unary); n != 8+10+1 {
		t.Fatalf("unary decisions: %d, want 19", n)
	}
	if logs.count("has no Decide stream") != 1 || bs.Mode() != backstop.ModeRemote || logs.count("unreachable") != 0 {
		t.Fatalf("one log line, no outage:\n%s", logs)
	}
}

// Close ends the stream: a decision waiting on it returns at once, and no
// goroutine is left behind.
func TestCloseEndsDecisionsInFlight(t *testing.T) {
	f := &decideServer{answer: func(*pb.DecideRequest) *pb.DecideResponse { return nil }} // never answers
	bs := newClient(t, "bufconn", serveInTest(t, f)...)
	errc := make(chan error, 1)
	go func() {
		_, err := bs.CanProceed(context.Background(), "x/m") // 1 s deadline (newClient)
		errc <- err
	}()
	waitFor(t, 5*time.Second, "the item on the stream", func() bool { _, items, _ := f.counts(); return items == 1 })
	start := time.Now()
	if err := bs.Close(); err != nil {
		t.Fatal(err)
	}
	err := <-errc
	var cpe *backstop.ControlPlaneError
	if !errors.As(err, &cpe) || cpe.Code != codes.Canceled || time.Since(start) > 500*time.Millisecond {
		t.Fatalf("want CANCELED at once, got %v after %s", err, time.Since(start))
	}
}
