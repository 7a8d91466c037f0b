package backstop_test

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/backstop-dev/backstop/clients/go/backstoptest"
)

// versionLines are the generator versions in the stubs' headers: a
// different protoc patch release that generates the same code is not stale.
var versionLines = regexp.MustCompile(`(?m)^// \tprotoc(-gen-go)?\s+v?\S+$`)

// TestStubsAreUpToDate regenerates the stubs into a temporary directory with
// scripts/gen.sh and compares them with the checked-in ones.
func TestStubsAreUpToDate(t *testing.T) {
	for _, tool := range []string{"protoc", "protoc-gen-go", "protoc-gen-go-grpc"} {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("BACKSTOP_REQUIRE_PROTOC") != "" {
				t.Fatalf("%s is not installed (scripts/test.sh installs it)", tool)
			}
			t.Skipf("%s is not installed; scripts/test.sh installs it and runs this check", tool)
		}
	}
	root, err := backstoptest.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	pkg := filepath.Join(root, "clients", "go")
	out := t.TempDir()
	cmd := exec.Command("bash", filepath.Join(pkg, "scripts", "gen.sh"), out)
	if msg, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("gen.sh: %v\n%s", err, msg)
	}
	fresh, _ := filepath.Glob(filepath.Join(out, "backstopv1", "*.go"))
	checked, _ := filepath.Glob(filepath.Join(pkg, "backstopv1", "*.go"))
	if len(fresh) == 0 {
		t.Fatal("gen.sh generated nothing")
	}
	names := func(paths []string) string {
		var n []string
		for _, p := range paths {
			n = append(n, filepath.Base(p))
		}
		return strings.Join(n, " ")
	}
	if names(fresh) != names(checked) {
		t.Fatalf("generated files %s, checked in %s: run clients/go/scripts/gen.sh", names(fresh), names(checked))
	}
	for _, f := range fresh {
		want, _ := os.ReadFile(f)
		got, _ := os.ReadFile(filepath.Join(pkg, "backstopv1", filepath.Base(f)))
		if !bytes.Equal(versionLines.ReplaceAll(want, nil), versionLines.ReplaceAll(got, nil)) {
			t.Errorf("backstopv1/%s is stale: run clients/go/scripts/gen.sh", filepath.Base(f))
		}
	}
}
