package backstop_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	backstop "github.com/backstop-dev/backstop/clients/go"
	"github.com/backstop-dev/backstop/clients/go/backstoptest"
)

// Open long enough that starting the other processes cannot outlast it.
const sharedConfig = chat + `
[defaults.breaker]
failure_threshold = 2
success_threshold = 1
open_duration = "2s"
jitter = 0.0
`

type agentLine struct {
	OK      bool   `json:"ok"`
	Status  int    `json:"status,omitempty"`
	State   string `json:"state,omitempty"`
	Refused string `json:"refused,omitempty"`
	Target  string `json:"target,omitempty"`
	Mode    string `json:"mode,omitempty"`
}

// TestAgentProcess is not a test: it is the agent the cross-process test
// starts in separate processes (this test binary, re-executed).
func TestAgentProcess(t *testing.T) {
	if os.Getenv("BACKSTOP_AGENT_PROCESS") != "1" {
		t.Skip("run by TestFailuresInOneProcessOpenTheBreakerForOthers")
	}
	args := strings.Split(os.Getenv("BACKSTOP_AGENT_ARGS"), " ")
	addr, providerURL, mode, name := args[0], args[1], args[2], args[3]
	n, _ := strconv.Atoi(args[4])
	bs, err := backstop.New(addr, backstop.WithTimeout(2*time.Second), backstop.WithCaller(fmt.Sprintf("agent-%d", os.Getpid())))
	if err != nil {
		t.Fatal(err)
	}
	defer bs.Close()
	ctx := context.Background()
	fn := func(ctx context.Context, p backstop.Permit) (backstop.Result, error) {
		_, err := backstoptest.Complete(ctx, nil, providerURL, p.Target, "hello")
		return backstop.Result{}, err
	}
	for i := 0; i < n; i++ {
		var line agentLine
		if mode == "guard" {
			out, err := bs.Guard(ctx, name, fn)
			var he *backstop.HTTPError
			var refused backstop.RefusedError
			switch {
			case errors.As(err, &he):
				line = agentLine{Status: he.StatusCode, State: out.State.String()}
			case errors.As(err, &refused):
				line = agentLine{Refused: refused.Details().Reason.String()}
			case err != nil:
				t.Fatal(err)
			default:
				line = agentLine{OK: true, State: out.State.String()}
			}
		} else {
			res, err := bs.Call(ctx, name, fn)
			line = agentLine{OK: err == nil, Target: res.Target, Mode: string(bs.Mode())}
		}
		b, _ := json.Marshal(line)
		fmt.Println("AGENT " + string(b))
	}
}

func runAgent(t *testing.T, srv *backstoptest.Server, prov *backstoptest.FakeProvider, mode, name string, n int) []agentLine {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestAgentProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(), "BACKSTOP_AGENT_PROCESS=1",
		fmt.Sprintf("BACKSTOP_AGENT_ARGS=%s %s %s %s %d", srv.Addr, prov.URL, mode, name, n))
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("agent process: %v\n%s", err, out)
	}
	var lines []agentLine
	for _, l := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(l, "AGENT ") {
			var a agentLine
			if err := json.Unmarshal([]byte(l[len("AGENT "):]), &a); err != nil {
				t.Fatal(err)
			}
			lines = append(lines, a)
		}
	}
	if len(lines) != n {
		t.Fatalf("agent printed %d lines, want %d:\n%s", len(lines), n, out)
	}
	return lines
}

func TestFailuresInOneProcessOpenTheBreakerForOthers(t *testing.T) {
	srv := startServer(t, sharedConfig)
	prov := newProvider(t)
	bs := newClient(t, srv.Addr)
	ctx := ctxT(t)
	prov.SetDefault(sonnet, ptr(backstoptest.Overloaded()))

	// Process A: two 529s open Sonnet's breaker (failure_threshold = 2).
	a := runAgent(t, srv, prov, "guard", sonnet, 2)
	if a[0] != (agentLine{Status: 529, State: "CLOSED"}) || a[1] != (agentLine{Status: 529, State: "OPEN"}) {
		t.Fatalf("process A: %+v", a)
	}
	// Process B never saw a failure, yet routes straight past Sonnet.
	b := runAgent(t, srv, prov, "call", "chat", 3)
	for _, l := range b {
		if !l.OK || l.Target != gpt || l.Mode != "remote" {
			t.Fatalf("process B: %+v", b)
		}
	}
	if prov.Calls(sonnet) != 2 {
		t.Fatalf("no other process called the open target: %d calls", prov.Calls(sonnet))
	}
	// And this (third) client is refused too, without calling the provider.
	adm, err := bs.CanProceed(ctx, sonnet)
	if err != nil || adm.Allowed || adm.Reason != backstop.ReasonCircuitOpen || adm.Local || adm.RetryAfter <= 0 || adm.RetryAfter > 2*time.Second {
		t.Fatalf("%+v %v", adm, err)
	}
	st, _ := bs.GetTarget(ctx, sonnet)
	if !strings.Contains(st.GetLastCause(), "529") {
		t.Fatalf("last cause %q", st.GetLastCause())
	}
	// Recovery is shared as well: after open_duration one process's probe closes it for all.
	prov.SetDefault(sonnet, nil)
	time.Sleep(adm.RetryAfter + 50*time.Millisecond)
	probe := runAgent(t, srv, prov, "guard", sonnet, 1)
	if probe[0] != (agentLine{OK: true, State: "CLOSED"}) {
		t.Fatalf("probe: %+v", probe)
	}
	if c := runAgent(t, srv, prov, "call", "chat", 1); c[0].Target != sonnet {
		t.Fatalf("after recovery: %+v", c)
	}
}
