package backstop

// The Decide stream: every CanProceed, RecordOutcome and Route of a client
// goes over one long-lived bidirectional stream (backstop.v1.Resilience/Decide)
// instead of one unary RPC each, which is far cheaper for the server and the
// network. It is a decisionTransport like the unary one, so everything above
// it (the fail-safe, Guard, Call, the Transport) is unchanged:
//
//   - ids are allocated here; a map id → result channel (under a mutex) finds
//     the caller of each answer, which may come out of order; one goroutine
//     reads answers, one writes requests (gRPC allows one sender at a time,
//     and a stalled server must not block callers past their deadlines);
//   - each item carries what is left of the caller's deadline (the client's
//     50 ms fail-safe deadline, WithTimeout): the caller stops waiting then
//     and gets DEADLINE_EXCEEDED, the same fail-safe path as a unary timeout;
//   - a stream that answered nothing while an item waited out its whole
//     deadline is retired: new items go to a new stream, the old one is
//     half-closed (the server answers what it read, then ends it) and
//     cancelled if it does not end soon. A stuck stream is never reused;
//   - the stream is opened lazily and again after it broke. Items in flight
//     when it breaks fail like a unary UNAVAILABLE (they may have been
//     decided); items the server never answered because it ended the stream
//     cleanly (a drain) are sent once more on a new stream;
//   - a server without Decide (UNIMPLEMENTED: an older Backstop) is
//     remembered, and every decision goes unary from then on;
//   - past maxOutstanding items in flight, or when the server answers an item
//     RESOURCE_EXHAUSTED (its own bound), that item goes unary;
//   - item errors become the gRPC status the unary call would have returned,
//     so they map to the same typed errors.

import (
	"context"
	"errors"
	"io"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	pb "github.com/backstop-dev/backstop/clients/go/backstopv1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
)

// maxOutstanding is the server's bound on a stream's unanswered items
// (items past it would be refused RESOURCE_EXHAUSTED; they go unary instead).
const maxOutstanding = 1024

var (
	// errUseUnary: decide this item with the unary call instead.
	errUseUnary = errors.New("backstop: decide this item with a unary call")
	// errStreamEnded: the stream ended before the item was sent or read by
	// the server, so it can be sent again on a new stream.
	errStreamEnded = errors.New("backstop: the Decide stream ended before answering")
)

// streamEnabledByEnv reads BACKSTOP_STREAM: 0, false, off or no turns the
// stream off (as WithoutStream does).
func streamEnabledByEnv() bool {
	switch strings.ToLower(strings.TrimSpace(os.Getenv("BACKSTOP_STREAM"))) {
	case "0", "false", "off", "no":
		return false
	}
	return true
}

type streamDecisions struct {
	c     *Client
	unary unaryDecisions

	nextID      uint64 // atomic; ids are never reused within a client
	unsupported int32  // atomic; 1 once the server answered Decide with UNIMPLEMENTED

	ctx    context.Context // parent of every stream; cancelled by close
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu      sync.Mutex
	cur     *decideStream // the open stream, nil if none
	opening *streamOpen   // an open in progress, nil if none
	closed  bool
}

type streamOpen struct {
	done chan struct{}
	st   *decideStream
	err  error
}

// decideStream is one Decide call: requests go through sendq to the writer,
// answers come to the reader, which hands each to its caller.
type decideStream struct {
	sd     *streamDecisions
	stream pb.Resilience_DecideClient
	cancel context.CancelFunc
	sendq  chan *pb.DecideRequest
	done   chan struct{} // closed once the stream is over and every caller told

	lastRecv int64 // atomic: UnixNano of the last answer
	retired  chan struct{}
	retire1  sync.Once

	mu      sync.Mutex
	pending map[uint64]chan decideResult // includes items whose caller gave up: the server still counts them
	ended   bool
}

type decideResult struct {
	resp *pb.DecideResponse
	err  error
}

func newStreamDecisions(c *Client, u unaryDecisions) *streamDecisions {
	ctx, cancel := context.WithCancel(context.Background())
	return &streamDecisions{c: c, unary: u, ctx: ctx, cancel: cancel}
}

func (sd *streamDecisions) canProceed(ctx context.Context, r *pb.CanProceedRequest) (*pb.CanProceedResponse, error) {
	resp, err := sd.do(ctx, &pb.DecideRequest{Request: &pb.DecideRequest_CanProceed{CanProceed: r}})
	if err == errUseUnary {
		return sd.unary.canProceed(ctx, r)
	}
	if err != nil {
		return nil, err
	}
	if a := resp.GetCanProceed(); a != nil {
		return a, nil
	}
	return nil, unexpectedAnswer(resp, "can_proceed")
}

func (sd *streamDecisions) recordOutcome(ctx context.Context, r *pb.RecordOutcomeRequest) (*pb.RecordOutcomeResponse, error) {
	resp, err := sd.do(ctx, &pb.DecideRequest{Request: &pb.DecideRequest_RecordOutcome{RecordOutcome: r}})
	if err == errUseUnary {
		return sd.unary.recordOutcome(ctx, r)
	}
	if err != nil {
		return nil, err
	}
	if a := resp.GetRecordOutcome(); a != nil {
		return a, nil
	}
	return nil, unexpectedAnswer(resp, "record_outcome")
}

func (sd *streamDecisions) route(ctx context.Context, r *pb.RouteRequest) (*pb.RouteResponse, error) {
	resp, err := sd.do(ctx, &pb.DecideRequest{Request: &pb.DecideRequest_Route{Route: r}})
	if err == errUseUnary {
		return sd.unary.route(ctx, r)
	}
	if err != nil {
		return nil, err
	}
	if a := resp.GetRoute(); a != nil {
		return a, nil
	}
	return nil, unexpectedAnswer(resp, "route")
}

// Reconciliation batches stay unary: they are rare, large and not latency-bound.
func (sd *streamDecisions) recordOutcomeBatch(ctx context.Context, r *pb.RecordOutcomeBatchRequest) (*pb.RecordOutcomeBatchResponse, error) {
	return sd.unary.recordOutcomeBatch(ctx, r)
}

// unexpectedAnswer: the server answered an item with another kind of answer
// (or one this build does not know).
func unexpectedAnswer(resp *pb.DecideResponse, want string) error {
	return status.Errorf(codes.Internal, "Decide answered item %d with %T, want %s", resp.GetId(), resp.GetResponse(), want)
}

// itemError is the status the unary call would have failed with.
func itemError(e *pb.ItemError) error {
	code := codes.Code(e.GetCode())
	if code == codes.OK {
		code = codes.Unknown
	}
	return status.Error(code, e.GetMessage())
}

// ctxStatus is a caller's expired or cancelled context as the status a
// unary call would return. ctx.Err() can still be nil when the deadline has
// just passed (the context's timer has not fired yet): that is a deadline too.
func ctxStatus(ctx context.Context) error {
	err := ctx.Err()
	if err == nil || err == context.DeadlineExceeded {
		return status.Error(codes.DeadlineExceeded, "Decide: no answer within the deadline")
	}
	return status.Error(codes.Canceled, "Decide: "+err.Error())
}

func (sd *streamDecisions) isUnsupported() bool { return atomic.LoadInt32(&sd.unsupported) == 1 }

// markUnsupported remembers that the server has no Decide (logged once).
func (sd *streamDecisions) markUnsupported(err error) {
	if atomic.CompareAndSwapInt32(&sd.unsupported, 0, 1) {
		sd.c.s.logger.Printf("Backstop at %s has no Decide stream (%s); using unary calls", sd.c.addr, status.Convert(err).Message())
	}
}

// do sends one item and waits for its answer; errUseUnary says to make the
// unary call instead.
func (sd *streamDecisions) do(ctx context.Context, req *pb.DecideRequest) (*pb.DecideResponse, error) {
	for attempt := 0; ; attempt++ {
		if sd.isUnsupported() {
			return nil, errUseUnary
		}
		st, err := sd.stream(ctx)
		if err != nil {
			return nil, err
		}
		resp, err := st.call(ctx, req)
		if err != errStreamEnded {
			return resp, err
		}
		if attempt > 0 {
			return nil, status.Error(codes.Unavailable, "the Decide stream ended twice before answering")
		}
	}
}

// stream returns the open stream, opening one if there is none. One
// goroutine opens it (with a context that outlives the call); callers wait
// for it no longer than their own deadline.
func (sd *streamDecisions) stream(ctx context.Context) (*decideStream, error) {
	sd.mu.Lock()
	if sd.closed {
		sd.mu.Unlock()
		return nil, errClientClosed
	}
	if st := sd.cur; st != nil {
		sd.mu.Unlock()
		return st, nil
	}
	op := sd.opening
	if op == nil {
		op = &streamOpen{done: make(chan struct{})}
		sd.opening = op
		sd.wg.Add(1)
		go sd.open(op)
	}
	sd.mu.Unlock()
	select {
	case <-op.done:
		return op.st, op.err
	case <-ctx.Done():
		return nil, ctxStatus(ctx)
	}
}

var errClientClosed = status.Error(codes.Canceled, "backstop: the client is closed")

func (sd *streamDecisions) open(op *streamOpen) {
	defer sd.wg.Done()
	ctx, cancel := context.WithCancel(sd.ctx)
	s, err := sd.unary.c.Decide(ctx)
	sd.mu.Lock()
	switch {
	case err != nil:
		cancel()
		if status.Code(err) == codes.Unimplemented {
			sd.markUnsupported(err)
			err = errUseUnary
		}
		op.err = err
	case sd.closed:
		cancel()
		op.err = errClientClosed
	default:
		st := &decideStream{sd: sd, stream: s, cancel: cancel, sendq: make(chan *pb.DecideRequest, 256),
			done: make(chan struct{}), retired: make(chan struct{}), pending: make(map[uint64]chan decideResult)}
		sd.cur = st
		op.st = st
		sd.wg.Add(2)
		go st.read()
		go st.write()
	}
	sd.opening = nil
	sd.mu.Unlock()
	close(op.done)
}

// close ends the stream (in-flight callers get CANCELED, like unary calls on
// a closed connection) and waits for its goroutines.
func (sd *streamDecisions) close() {
	sd.mu.Lock()
	sd.closed = true
	sd.mu.Unlock()
	sd.cancel()
	sd.wg.Wait()
}

// call sends one item on st and waits for the answer or ctx.
func (st *decideStream) call(ctx context.Context, item *pb.DecideRequest) (*pb.DecideResponse, error) {
	req := &pb.DecideRequest{Id: atomic.AddUint64(&st.sd.nextID, 1), Request: item.Request}
	if dl, ok := ctx.Deadline(); ok {
		left := time.Until(dl)
		if left <= 0 {
			return nil, ctxStatus(ctx)
		}
		req.Deadline = durationpb.New(left)
	}
	ch := make(chan decideResult, 1)
	sentAt := time.Now().UnixNano()
	st.mu.Lock()
	if st.ended || st.isRetired() {
		st.mu.Unlock()
		return nil, errStreamEnded // nothing was sent
	}
	if len(st.pending) >= maxOutstanding {
		st.mu.Unlock()
		return nil, errUseUnary
	}
	st.pending[req.Id] = ch
	st.mu.Unlock()
	select {
	case st.sendq <- req:
	case <-st.done: // the reader has answered ch
	case <-ctx.Done():
		st.mu.Lock()
		_, unsent := st.pending[req.Id]
		delete(st.pending, req.Id)
		st.mu.Unlock()
		if unsent {
			st.timedOut(ctx, sentAt)
			return nil, ctxStatus(ctx)
		}
		// the stream ended meanwhile and answered ch: take that answer
	}
	select {
	case res := <-ch:
		return res.resp, res.err
	case <-ctx.Done():
		// The item stays pending until answered: the server counts it.
		st.timedOut(ctx, sentAt)
		return nil, ctxStatus(ctx)
	}
}

func (st *decideStream) isRetired() bool {
	select {
	case <-st.retired:
		return true
	default:
		return false
	}
}

// timedOut retires the stream when an item waited out its deadline while
// the stream answered nothing at all (a hung server or a stuck stream);
// a slow item on a stream that keeps answering is only that item's problem.
func (st *decideStream) timedOut(ctx context.Context, sentAt int64) {
	if ctx.Err() == context.DeadlineExceeded && atomic.LoadInt64(&st.lastRecv) < sentAt {
		st.retire()
	}
}

// retire sends new items to a new stream and half-closes this one: the
// server answers what it read, then ends it (items it never read are sent
// again on the new stream). If it does not end soon, it is cancelled.
func (st *decideStream) retire() {
	sd := st.sd
	sd.mu.Lock()
	if sd.cur == st {
		sd.cur = nil
	}
	sd.mu.Unlock()
	st.retire1.Do(func() {
		st.mu.Lock()
		close(st.retired)
		st.mu.Unlock()
		time.AfterFunc(maxDur(time.Second, 10*sd.c.s.timeout), st.cancel)
	})
}

// write sends queued items, one at a time (gRPC allows one sender).
func (st *decideStream) write() {
	defer st.sd.wg.Done()
	for {
		select {
		case req := <-st.sendq:
			if err := st.stream.Send(req); err != nil {
				if err != io.EOF {
					st.cancel() // broken locally; the reader sees it
				}
				// io.EOF: the server ended the stream; the reader gets its status.
				return
			}
		case <-st.retired:
			_ = st.stream.CloseSend()
			return
		case <-st.done:
			return
		}
	}
}

// read hands each answer to its caller until the stream ends.
func (st *decideStream) read() {
	defer st.sd.wg.Done()
	for {
		resp, err := st.stream.Recv()
		if err != nil {
			st.finish(err)
			return
		}
		st.mu.Lock()
		ch, ok := st.pending[resp.GetId()]
		delete(st.pending, resp.GetId())
		st.mu.Unlock()
		atomic.StoreInt64(&st.lastRecv, time.Now().UnixNano())
		if !ok {
			continue // not an id of ours
		}
		res := decideResult{resp: resp}
		if e := resp.GetError(); e != nil {
			res = decideResult{err: itemError(e)}
			if codes.Code(e.GetCode()) == codes.ResourceExhausted {
				res.err = errUseUnary // the stream is full: this one goes unary
			}
		}
		ch <- res // buffered, one answer per entry
	}
}

// finish tells every caller still waiting why the stream ended, and lets
// the next decision open a new one.
func (st *decideStream) finish(err error) {
	sd := st.sd
	sd.mu.Lock()
	if sd.cur == st {
		sd.cur = nil
	}
	sd.mu.Unlock()
	st.mu.Lock()
	st.ended = true
	pending := st.pending
	st.pending = map[uint64]chan decideResult{}
	st.mu.Unlock()

	var res error
	code := status.Code(err)
	switch {
	case sd.ctx.Err() != nil:
		res = errClientClosed
	case err == io.EOF:
		// Ended cleanly (the server drains): it answers everything it read
		// before ending, so what is left was never decided.
		res = errStreamEnded
	case code == codes.Unimplemented:
		sd.markUnsupported(err)
		res = errUseUnary
	case code == codes.Unauthenticated || code == codes.PermissionDenied:
		res = err // the stream was refused, as the unary call would be
	default:
		// The stream broke (connection lost, reset, server crash): like a
		// unary call that failed UNAVAILABLE; the fail-safe takes over.
		res = status.Errorf(codes.Unavailable, "the Decide stream broke: %s: %s", code, status.Convert(err).Message())
	}
	for _, ch := range pending {
		ch <- decideResult{err: res}
	}
	st.cancel()
	close(st.done)
}
