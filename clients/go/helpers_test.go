package backstop_test

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	backstop "github.com/backstop-dev/backstop/clients/go"
	"github.com/backstop-dev/backstop/clients/go/backstoptest"
)

// fast keeps the suite quick: a breaker opens after 2 consecutive failures,
// for 500 ms; retry delays are tens of milliseconds.
const fast = `
[defaults.breaker]
failure_threshold = 2
success_threshold = 1
open_duration = "500ms"
max_open_duration = "1s"
jitter = 0.0
persistent_open_duration = "30s"

[defaults.retry]
max_retries = 2
base_delay = "10ms"
max_delay = "40ms"
`

const chat = `
[routes.chat]
targets = ["anthropic/sonnet", "openai/gpt-4o", "anthropic/haiku"]
`

const (
	sonnet = "anthropic/sonnet"
	gpt    = "openai/gpt-4o"
	haiku  = "anthropic/haiku"
)

// localFast is the fail-safe's policy in tests: the same shape as fast.
var localFast = backstop.LocalPolicy{FailureThreshold: 2, SuccessThreshold: 1, OpenDuration: 500 * time.Millisecond,
	BaseDelay: 10 * time.Millisecond, MaxDelay: 40 * time.Millisecond, MaxRetries: 2}

// logRecorder captures the client's log lines.
type logRecorder struct {
	mu    sync.Mutex
	lines []string
}

func (l *logRecorder) Printf(format string, args ...interface{}) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lines = append(l.lines, fmt.Sprintf(format, args...))
}

func (l *logRecorder) count(substr string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, s := range l.lines {
		if strings.Contains(s, substr) {
			n++
		}
	}
	return n
}

func (l *logRecorder) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.lines, "\n")
}

// newClient makes a client closed after the test. Tests that are not about
// the fail-safe use a generous deadline (1 s) so a loaded machine cannot push
// them into local mode by accident.
func newClient(t testing.TB, addr string, opts ...backstop.Option) *backstop.Client {
	t.Helper()
	all := append([]backstop.Option{backstop.WithTimeout(time.Second), backstop.WithCaller("go-test"), backstop.WithLogger(nil)}, opts...)
	c, err := backstop.New(addr, all...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func startServer(t testing.TB, config string) *backstoptest.Server {
	return backstoptest.StartServer(t, config)
}

func newProvider(t testing.TB) *backstoptest.FakeProvider {
	p := backstoptest.NewFakeProvider()
	t.Cleanup(p.Close)
	return p
}

// waitFor polls cond every 10 ms for up to timeout.
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > timeout {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return time.Since(start)
}

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// admitted is how many admissions the server counted for target (0 if unknown).
func admitted(t testing.TB, c *backstop.Client, target string) uint64 {
	st, err := c.GetTarget(context.Background(), target)
	if err != nil {
		return 0
	}
	return st.GetCounters().GetAdmitted()
}

// completion calls the fake provider (through hc, nil = plain) as the guarded function.
func completion(p *backstoptest.FakeProvider, hc *http.Client, served *[]string) backstop.Func {
	var mu sync.Mutex
	return func(ctx context.Context, permit backstop.Permit) (backstop.Result, error) {
		mu.Lock()
		*served = append(*served, permit.Target)
		mu.Unlock()
		c, err := p.Complete(ctx, hc, permit.Target, "hello")
		if err != nil {
			return backstop.Result{}, err
		}
		return backstop.Result{InputTokens: c.InputTokens, OutputTokens: c.OutputTokens, Header: c.Header}, nil
	}
}
