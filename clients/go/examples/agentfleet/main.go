// Command agentfleet runs a small fleet of agents against one Backstop: a
// three-model route, a fake provider with injected outages, a deferred-queue
// worker, and a summary of what every model served.
//
//	BACKSTOP_BIN=target/debug/backstop go run ./examples/agentfleet
//	go run ./examples/agentfleet -addr 127.0.0.1:50051   # an already running server with a "chat" route
//
// Phase 1: every model is healthy. Phase 2: the primary overloads (529): its
// breaker opens for the whole fleet after a few failures and traffic falls
// back. Phase 3: every model is down: requests are deferred to the durable
// queue. Phase 4: service returns and the worker drains the queue.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"net/http"
	"os"
	"sort"
	"sync"
	"time"

	backstop "github.com/backstop-dev/backstop/clients/go"
	"github.com/backstop-dev/backstop/clients/go/backstoptest"
)

const config = `
[defaults.breaker]
failure_threshold = 3
success_threshold = 1
open_duration = "1s"
jitter = 0.0

[defaults.retry]
max_retries = 2
base_delay = "20ms"
max_delay = "100ms"

[routes.chat]
targets = ["anthropic/sonnet", "openai/gpt-4o", "anthropic/haiku"]
`

var models = []string{"anthropic/sonnet", "openai/gpt-4o", "anthropic/haiku"}

type tally struct {
	mu                                  sync.Mutex
	served                              map[string]int
	fellBack, deferred, failed, drained int
}

func (t *tally) add(f func(t *tally)) {
	t.mu.Lock()
	defer t.mu.Unlock()
	f(t)
}

func main() {
	addr := flag.String("addr", "", "a running Backstop (default: start $BACKSTOP_BIN)")
	agents := flag.Int("agents", 4, "concurrent agents")
	perPhase := flag.Duration("phase", 2*time.Second, "length of each phase")
	flag.Parse()

	if *addr == "" {
		srv, err := backstoptest.Start(config)
		if err != nil {
			log.Fatalf("starting backstop: %v", err)
		}
		defer srv.Close()
		*addr = srv.Addr
	}
	prov := backstoptest.NewFakeProvider()
	defer prov.Close()

	bs, err := backstop.New(*addr, backstop.WithCaller("agentfleet"),
		backstop.WithLocalRoutes(map[string][]string{"chat": models}))
	if err != nil {
		log.Fatal(err)
	}
	defer bs.Close()
	// The provider "SDK" talks HTTP through the Backstop Transport: inside
	// Call it hands status, headers and usage to the guard.
	hc := &http.Client{Transport: &backstop.Transport{Client: bs}, Timeout: 5 * time.Second}
	ask := func(ctx context.Context, p backstop.Permit) (backstop.Result, error) {
		_, err := prov.Complete(ctx, hc, p.Target, "summarise my inbox")
		return backstop.Result{}, err
	}

	t := &tally{served: map[string]int{}}
	run := func(phase string, d time.Duration) {
		fmt.Printf("-- %s\n", phase)
		ctx, cancel := context.WithTimeout(context.Background(), d)
		defer cancel()
		var wg sync.WaitGroup
		for i := 0; i < *agents; i++ {
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				for n := 0; ctx.Err() == nil; n++ {
					res, err := bs.Call(ctx, "chat", ask, backstop.EstimatedTokens(500),
						backstop.DeferTo("", []byte(fmt.Sprintf(`{"agent":%d,"request":%d}`, i, n))))
					var de *backstop.DeferredError
					switch {
					case err == nil:
						t.add(func(t *tally) {
							t.served[res.Target]++
							if res.FallbackDepth > 0 {
								t.fellBack++
							}
						})
					case errors.As(err, &de):
						t.add(func(t *tally) { t.deferred++ })
					case ctx.Err() != nil:
						return
					default:
						t.add(func(t *tally) { t.failed++ })
					}
					time.Sleep(20 * time.Millisecond)
				}
			}(i)
		}
		wg.Wait()
	}

	run("phase 1: all models healthy", *perPhase)
	overloaded := backstoptest.Overloaded()
	prov.SetDefault(models[0], &overloaded)
	run("phase 2: anthropic/sonnet overloaded (529)", *perPhase)
	for _, m := range models {
		prov.SetDefault(m, &overloaded)
	}
	run("phase 3: every model down", *perPhase)
	for _, m := range models {
		prov.SetDefault(m, nil)
	}
	fmt.Println("-- phase 4: service restored, draining the deferred queue")
	w := backstop.NewDeferredWorker(bs, "chat", func(ctx context.Context, item *backstop.DeferredItem) (backstop.Result, error) {
		_, err := prov.Complete(ctx, nil, item.Target, string(item.Payload))
		if err == nil {
			t.add(func(t *tally) { t.drained++ })
		}
		return backstop.Result{}, err
	})
	w.Wait = 500 * time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := w.RunUntilEmpty(ctx); err != nil {
		log.Fatal(err)
	}

	fmt.Println()
	names := make([]string, 0, len(t.served))
	for m := range t.served {
		names = append(names, m)
	}
	sort.Strings(names)
	for _, m := range names {
		fmt.Printf("%-18s served %5d   provider calls %5d\n", m, t.served[m], prov.Calls(m))
	}
	fmt.Printf("fell back %d, deferred %d, drained %d, failed %d\n", t.fellBack, t.deferred, t.drained, t.failed)
	// A request deferred just as a phase ended may be saved although its
	// Call returned the phase's cancellation: drained can exceed deferred.
	if t.drained < t.deferred {
		fmt.Fprintln(os.Stderr, "not every deferred request was drained")
		os.Exit(1)
	}
}
