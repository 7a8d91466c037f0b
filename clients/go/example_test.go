package backstop_test

import (
	"os/exec"
	"strings"
	"testing"
)

// TestAgentFleetExample runs examples/agentfleet briefly: the fleet falls
// back during the primary's outage, defers while everything is down, and the
// worker drains every deferred request afterwards (the example exits non-zero otherwise).
func TestAgentFleetExample(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the example")
	}
	out, err := exec.Command("go", "run", "./examples/agentfleet", "-phase", "400ms", "-agents", "2").CombinedOutput()
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	text := string(out)
	for _, want := range []string{"anthropic/sonnet", "openai/gpt-4o", "fell back", "drained"} {
		if !strings.Contains(text, want) {
			t.Fatalf("output lacks %q:\n%s", want, text)
		}
	}
	if strings.Contains(text, "fell back 0,") || strings.Contains(text, "deferred 0,") {
		t.Fatalf("the outage phases had no effect:\n%s", text)
	}
}
