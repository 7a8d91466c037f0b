package backstop

import (
	"context"
	"errors"
	"sync/atomic"
	"time"
)

// Handler processes one deferred item: call item.Target (already admitted)
// with the request in item.Payload, using item.KeySlot. Returning nil means
// done; an error means failed (classified like Guard's).
type Handler func(ctx context.Context, item *DeferredItem) (Result, error)

// WorkerStats counts what a DeferredWorker did.
type WorkerStats struct {
	Claimed, Acked, Nacked, DeadLettered int64
	// Claim, Ack or Nack calls that failed (e.g. while Backstop was unreachable).
	Errors int64
}

// DeferredWorker drains a deferred queue. Backstop hands out items only
// while the queue's route or target is admissible, each already admitted to a
// target with a permit; the worker runs the handler, reports the outcome with
// that permit, then acks on success or nacks with the server's retry delay
// on failure (the server dead-letters after max attempts). Delivery is
// at-least-once: a worker that dies mid-item leaves it to be redelivered when
// its lease expires, so handlers should be idempotent (item.ID is a stable key).
type DeferredWorker struct {
	Client  *Client
	Queue   string
	Handler Handler
	// Items per Claim (default 1).
	MaxItems int
	// How long the worker may hold an item before redelivery (default 60 s).
	Lease time.Duration
	// Long-poll wait of each Claim (default 5 s).
	Wait time.Duration
	// Nack delay when the outcome gave no retry advice (default 1 s).
	RetryDelay time.Duration
	// Pause after a failed Claim (default 500 ms).
	ErrorBackoff time.Duration
	// Recorded as the caller of the admissions (default: the client's caller).
	WorkerID string
	// The priority deliveries are admitted at (unset = PriorityDefault;
	// PriorityBatch leaves budgets' reserves for interactive calls).
	Priority Priority

	claimed, acked, nacked, deadLettered, errs int64
}

// NewDeferredWorker creates a worker with the defaults.
func NewDeferredWorker(c *Client, queue string, h Handler) *DeferredWorker {
	return &DeferredWorker{Client: c, Queue: queue, Handler: h}
}

// Stats returns the counters so far.
func (w *DeferredWorker) Stats() WorkerStats {
	return WorkerStats{
		Claimed:      atomic.LoadInt64(&w.claimed),
		Acked:        atomic.LoadInt64(&w.acked),
		Nacked:       atomic.LoadInt64(&w.nacked),
		DeadLettered: atomic.LoadInt64(&w.deadLettered),
		Errors:       atomic.LoadInt64(&w.errs),
	}
}

func orDefault(d, def time.Duration) time.Duration {
	if d > 0 {
		return d
	}
	return def
}

// Run claims and processes items until ctx is done (then it returns nil,
// after acking or nacking the item in hand).
func (w *DeferredWorker) Run(ctx context.Context) error { return w.run(ctx, false) }

// RunUntilEmpty is Run that also returns once the queue has nothing waiting
// or in flight.
func (w *DeferredWorker) RunUntilEmpty(ctx context.Context) error { return w.run(ctx, true) }

func (w *DeferredWorker) run(ctx context.Context, untilEmpty bool) error {
	if w.Client == nil || w.Handler == nil || w.Queue == "" {
		return errors.New("backstop: DeferredWorker needs a Client, a Queue and a Handler")
	}
	wait := orDefault(w.Wait, 5*time.Second)
	failing := false
	for ctx.Err() == nil {
		if untilEmpty {
			empty, err := w.empty(ctx)
			if err == nil && empty {
				return nil
			}
		}
		started := time.Now()
		res, err := w.Client.Claim(ctx, w.Queue, ClaimOptions{
			MaxItems: w.MaxItems, Lease: orDefault(w.Lease, 60*time.Second), Wait: wait, Worker: w.WorkerID,
			Priority: w.Priority,
		})
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			atomic.AddInt64(&w.errs, 1)
			if !failing {
				w.Client.s.logger.Printf("deferred worker for %s: %v; retrying", w.Queue, err)
			}
			failing = true
			_ = sleepCtx(ctx, orDefault(w.ErrorBackoff, 500*time.Millisecond))
			continue
		}
		failing = false
		for _, item := range res.Items {
			atomic.AddInt64(&w.claimed, 1)
			w.process(ctx, item)
		}
		if len(res.Items) == 0 {
			// The server long-polls, also while blocked; sleep only for what it did not.
			want := wait
			if want > 250*time.Millisecond {
				want = 250 * time.Millisecond
			}
			if res.BlockedReason != ReasonUnspecified {
				want = orDefault(res.RetryAfter, orDefault(w.ErrorBackoff, 500*time.Millisecond))
				if want < 10*time.Millisecond {
					want = 10 * time.Millisecond
				}
				if want > wait {
					want = wait
				}
			}
			_ = sleepCtx(ctx, want-time.Since(started))
		}
	}
	return nil
}

func (w *DeferredWorker) empty(ctx context.Context) (bool, error) {
	stats, err := w.Client.QueueStats(ctx, w.Queue)
	if err != nil {
		return false, err
	}
	for _, q := range stats {
		if q.Queue == w.Queue && (q.Depth > 0 || q.InFlight > 0) {
			return false, nil
		}
	}
	return true, nil
}

func (w *DeferredWorker) process(ctx context.Context, item *DeferredItem) {
	c := w.Client
	p := Permit{Target: item.Target, Token: item.Permit, KeySlot: item.KeySlot, Attempt: max0(item.Attempt - 1)}
	var out OutcomeResult
	var ferr error
	if item.Target != "" {
		var obs observed
		var latency time.Duration
		obs, ferr, latency = c.invoke(ctx, func(ctx context.Context, _ Permit) (Result, error) { return w.Handler(ctx, item) }, p)
		var rerr error
		out, rerr = c.report(ctx, p, obs, latency, RequestResultUnspecified)
		if rerr != nil {
			c.s.logger.Printf("deferred item %s: could not report the outcome: %v", item.ID, rerr)
		}
	} else {
		_, ferr = w.Handler(ctx, item)
	}
	// Ack / Nack even when ctx was cancelled mid-item: the item in hand is settled.
	settle := detached{ctx}
	if ferr == nil {
		if err := c.Ack(settle, item); err != nil {
			atomic.AddInt64(&w.errs, 1)
			c.s.logger.Printf("deferred item %s: %v; it will be redelivered when its lease expires", item.ID, err)
			return
		}
		atomic.AddInt64(&w.acked, 1)
		return
	}
	delay := orDefault(w.RetryDelay, time.Second)
	if out.Retry.Retry {
		delay = out.Retry.Delay
	}
	nack, err := c.Nack(settle, item, delay, ferr.Error())
	if err != nil {
		atomic.AddInt64(&w.errs, 1)
		c.s.logger.Printf("deferred item %s: %v; it will be redelivered when its lease expires", item.ID, err)
		return
	}
	atomic.AddInt64(&w.nacked, 1)
	if nack.DeadLettered {
		atomic.AddInt64(&w.deadLettered, 1)
	}
}
