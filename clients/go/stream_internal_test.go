package backstop

import (
	"context"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// lateContext is a context whose deadline has passed but whose timer has not
// fired yet: Deadline is in the past and Err is still nil, the window the
// agent-fleet example once hit (a nil dereference in ctxStatus).
type lateContext struct{ context.Context }

func (lateContext) Deadline() (time.Time, bool) { return time.Now().Add(-time.Millisecond), true }
func (lateContext) Err() error                  { return nil }

func TestCtxStatusTreatsAPassedDeadlineAsDeadlineExceeded(t *testing.T) {
	err := ctxStatus(lateContext{context.Background()})
	if status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("got %v, want DEADLINE_EXCEEDED", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if got := status.Code(ctxStatus(ctx)); got != codes.Canceled {
		t.Fatalf("cancelled context: got %v, want CANCELED", got)
	}
}
