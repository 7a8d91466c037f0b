package backstop

import (
	"context"
	"io"
	"time"

	pb "github.com/backstop-dev/backstop/clients/go/backstopv1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Event is one entry of Backstop's event stream. Details are in Raw (e.g.
// Raw.GetBreakerTransition()); kinds a newer server adds arrive with
// Kind = EVENT_KIND_UNSPECIFIED and are still delivered.
type Event struct {
	Seq    uint64
	At     time.Time
	Target string
	Kind   pb.EventKind
	Raw    *pb.Event
	// Set only on the last event before the channel closes: why it closed
	// (ctx's error, or a *ControlPlaneError the stream cannot recover from).
	Err error
}

// WatchOptions filters and positions a Watch.
type WatchOptions struct {
	// Resume after this seq (0: start with a Snapshot).
	SinceSeq uint64
	// Only these targets (and routes / queues); empty = all.
	Targets []string
	// Only these kinds; empty = all. Snapshot and Gap always come.
	Kinds []pb.EventKind
}

func kindOf(e *pb.Event) pb.EventKind {
	switch e.GetKind().(type) {
	case *pb.Event_Snapshot:
		return pb.EventKind_EVENT_KIND_SNAPSHOT
	case *pb.Event_BreakerTransition:
		return pb.EventKind_EVENT_KIND_BREAKER_TRANSITION
	case *pb.Event_ProbeExpired:
		return pb.EventKind_EVENT_KIND_PROBE_EXPIRED
	case *pb.Event_TargetForced:
		return pb.EventKind_EVENT_KIND_TARGET_FORCED
	case *pb.Event_RateLimited:
		return pb.EventKind_EVENT_KIND_RATE_LIMITED
	case *pb.Event_BudgetRestored:
		return pb.EventKind_EVENT_KIND_BUDGET_RESTORED
	case *pb.Event_FallbackActivated:
		return pb.EventKind_EVENT_KIND_FALLBACK_ACTIVATED
	case *pb.Event_RouteExhausted:
		return pb.EventKind_EVENT_KIND_ROUTE_EXHAUSTED
	case *pb.Event_Gap:
		return pb.EventKind_EVENT_KIND_GAP
	case *pb.Event_KeySlotDisabled:
		return pb.EventKind_EVENT_KIND_KEY_SLOT_DISABLED
	case *pb.Event_TargetReset:
		return pb.EventKind_EVENT_KIND_TARGET_RESET
	case *pb.Event_Deferred:
		return pb.EventKind_EVENT_KIND_DEFERRED
	case *pb.Event_Drained:
		return pb.EventKind_EVENT_KIND_DRAINED
	case *pb.Event_DeadLettered:
		return pb.EventKind_EVENT_KIND_DEAD_LETTERED
	}
	return pb.EventKind_EVENT_KIND_UNSPECIFIED
}

// Watch streams Backstop's events on the returned channel until ctx is done.
// A dropped stream (server restart, network) is resumed after the last seq
// received, so nothing retained by the server is lost; when the server no
// longer has those events it sends a Gap and a fresh Snapshot. The channel is
// closed at the end, after an event whose Err says why. Read it promptly: a
// slow reader holds the stream (the server then answers with Gap + Snapshot).
func (c *Client) Watch(ctx context.Context, o WatchOptions) <-chan Event {
	ch := make(chan Event, 64)
	go func() {
		defer close(ch)
		since := o.SinceSeq
		delay := c.s.reconnectInterval
		for {
			err := c.watchOnce(ctx, o, &since, ch)
			if ctx.Err() != nil {
				ch <- Event{Err: ctx.Err()}
				return
			}
			code := status.Code(err)
			if err != nil && err != io.EOF && !isOutageCode(code) && code != codes.ResourceExhausted && code != codes.Canceled {
				ch <- Event{Err: &ControlPlaneError{Method: "Watch", Code: code, Message: status.Convert(err).Message()}}
				return
			}
			if sleepCtx(ctx, delay) != nil {
				ch <- Event{Err: ctx.Err()}
				return
			}
		}
	}()
	return ch
}

func (c *Client) watchOnce(ctx context.Context, o WatchOptions, since *uint64, ch chan<- Event) error {
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := c.events.Watch(sctx, &pb.WatchRequest{SinceSeq: *since, Targets: o.Targets, Kinds: o.Kinds}, waitForReady)
	if err != nil {
		return err
	}
	for {
		e, err := stream.Recv()
		if err != nil {
			return err
		}
		if e.GetSeq() > *since {
			*since = e.GetSeq()
		}
		ev := Event{Seq: e.GetSeq(), At: timeOf(e.GetAt()), Target: e.GetTarget(), Kind: kindOf(e), Raw: e}
		select {
		case ch <- ev:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}
