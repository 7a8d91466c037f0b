package backstop

// Reconciliation: outcomes decided while Backstop was unreachable are
// reported to it once it is back, so the fleet's counters, failure-rate
// windows and dashboards include what happened during the outage.
//
// Local permits mean nothing to the server, so those reports go without a
// permit (a closed-state report: counted and applied to a closed breaker,
// never to a half-open one). Server permits issued before the outage are
// passed back verbatim: they still release the budget and probe slot they
// hold, and a stale one is only tallied.

import (
	"context"
	"sync"

	pb "github.com/backstop-dev/backstop/clients/go/backstopv1"
	"google.golang.org/grpc/status"
)

// The server's bound on RecordOutcomeBatch items.
const maxBatch = 1000

type reconciler struct {
	c        *Client
	mu       sync.Mutex
	pending  []OutcomeReport
	dropped  int
	flushing bool
}

func newReconciler(c *Client) *reconciler { return &reconciler{c: c} }

func (r *reconciler) len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.pending)
}

func (r *reconciler) add(rep OutcomeReport) {
	if isLocalPermit(rep.Permit) {
		rep.Permit = ""
	}
	r.mu.Lock()
	r.pending = append(r.pending, rep)
	if over := len(r.pending) - r.c.s.reconcileLimit; over > 0 {
		if r.dropped == 0 {
			r.c.s.logger.Printf("more than %d outcomes decided locally; dropping the oldest (they will not reach Backstop)", r.c.s.reconcileLimit)
		}
		r.dropped += over
		r.pending = append([]OutcomeReport(nil), r.pending[over:]...)
	}
	r.mu.Unlock()
	if r.c.isRemote() {
		r.kick()
	}
}

// kick flushes in the background (when remote and not already flushing).
func (r *reconciler) kick() {
	r.mu.Lock()
	if r.flushing || len(r.pending) == 0 || r.c.isClosed() {
		r.mu.Unlock()
		return
	}
	r.mu.Unlock()
	r.c.wg.Add(1)
	go func() {
		defer r.c.wg.Done()
		if r.flush() == nil && r.c.isRemote() {
			r.kick() // reports added while it ran
		}
	}()
}

// flush sends the reports pending when it starts, in batches (reports added
// meanwhile wait for the next flush, so agents busy deciding locally cannot
// keep the probe from switching back). It stops at the first outage (the
// rest stay pending); items the server rejects are dropped with a log line.
func (r *reconciler) flush() error {
	r.mu.Lock()
	if r.flushing {
		r.mu.Unlock()
		return nil
	}
	r.flushing = true
	budget := len(r.pending)
	r.mu.Unlock()
	defer func() {
		r.mu.Lock()
		r.flushing = false
		r.mu.Unlock()
	}()
	sent, rejected := 0, 0
	for {
		r.mu.Lock()
		n := len(r.pending)
		if n > maxBatch {
			n = maxBatch
		}
		if n > budget {
			n = budget
		}
		budget -= n
		batch := append([]OutcomeReport(nil), r.pending[:n]...)
		r.mu.Unlock()
		if n == 0 || r.c.isClosed() {
			break
		}
		req := &pb.RecordOutcomeBatchRequest{}
		for _, rep := range batch {
			// The server never saw the requests these outcomes served
			// (they were decided locally): no request id, no finish.
			rep.RequestID, rep.Finish = "", RequestResultUnspecified
			req.Items = append(req.Items, recordRequest(rep))
		}
		ctx, cancel := context.WithTimeout(context.Background(), r.c.s.queueTimeout)
		resp, err := r.c.dec.recordOutcomeBatch(ctx, req)
		cancel()
		if err != nil && isOutageCode(status.Code(err)) {
			return err
		}
		r.mu.Lock()
		r.pending = r.pending[n:]
		r.mu.Unlock()
		if err != nil {
			rejected += n
			r.c.s.logger.Printf("Backstop rejected %d locally decided outcome(s): %v", n, err)
			continue
		}
		for _, item := range resp.GetItems() {
			if item.GetError() != nil {
				rejected++
			} else {
				sent++
			}
		}
	}
	r.mu.Lock()
	dropped := r.dropped
	r.dropped = 0
	r.mu.Unlock()
	if sent+rejected+dropped > 0 {
		r.c.s.logger.Printf("reported %d outcome(s) decided locally during the outage (%d rejected, %d dropped)", sent, rejected, dropped)
	}
	return nil
}
