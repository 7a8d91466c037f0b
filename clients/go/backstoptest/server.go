// Package backstoptest runs the real Backstop server and a scripted fake LLM
// provider for tests: test an agent's resilience against the real control
// plane and a provider that fails on cue, without network access or API keys.
//
//	srv := backstoptest.StartServer(t, config)          // the real binary, free port
//	prov := backstoptest.NewFakeProvider()              // OpenAI- and Anthropic-shaped API
//	prov.Script("anthropic/claude-sonnet", backstoptest.Overloaded(), backstoptest.Overloaded())
//	srv.Kill(); srv.Restart()                           // a crash, then the same port again
package backstoptest

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Binary finds the backstop binary: $BACKSTOP_BIN, else
// ROOT/target/debug/backstop where ROOT is the repository containing the
// working directory.
func Binary() (string, error) {
	if b := os.Getenv("BACKSTOP_BIN"); b != "" {
		if st, err := os.Stat(b); err == nil && !st.IsDir() {
			return b, nil
		}
		return "", fmt.Errorf("BACKSTOP_BIN=%s: no such file", b)
	}
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	b := filepath.Join(root, "target", "debug", "backstop")
	if _, err := os.Stat(b); err != nil {
		return "", fmt.Errorf("no backstop binary at %s: build it (cargo build) or set BACKSTOP_BIN", b)
	}
	return b, nil
}

// RepoRoot is the Backstop repository containing the working directory
// (symbolic links resolved, so it also works from a GOPATH link).
func RepoRoot() (string, error) {
	wd, err := os.Getwd()
	if err != nil {
		return "", err
	}
	if real, err := filepath.EvalSymlinks(wd); err == nil {
		wd = real
	}
	for dir := wd; ; dir = filepath.Dir(dir) {
		if _, err := os.Stat(filepath.Join(dir, "proto", "backstop", "v1", "resilience.proto")); err == nil {
			return dir, nil
		}
		if filepath.Dir(dir) == dir {
			return "", fmt.Errorf("no Backstop repository above %s", wd)
		}
	}
}

// Server is a running `backstop serve`.
type Server struct {
	// Addr is host:port of the gRPC listener; HTTPAddr of the HTTP one.
	Addr     string
	HTTPAddr string

	bin     string
	dir     string
	config  string
	port    string
	mu      sync.Mutex
	cmd     *exec.Cmd
	exited  chan struct{}
	logPath string
}

// Start runs the binary with config (TOML text) on a free loopback port,
// with its state in a fresh temporary directory (kept across Restart).
func Start(config string) (*Server, error) { return StartAt(config, "127.0.0.1:0") }

// StartAt is Start on a given loopback address ("127.0.0.1:PORT").
func StartAt(config, addr string) (*Server, error) {
	i := strings.LastIndexByte(addr, ':')
	if i < 0 {
		return nil, fmt.Errorf("backstoptest: address %q has no port", addr)
	}
	bin, err := Binary()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "backstop-go-test-")
	if err != nil {
		return nil, err
	}
	s := &Server{bin: bin, dir: dir, config: filepath.Join(dir, "backstop.toml"), port: addr[i+1:], logPath: filepath.Join(dir, "backstop.log")}
	if err := os.WriteFile(s.config, []byte(config), 0o644); err != nil {
		return nil, err
	}
	if err := s.start(); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	return s, nil
}

// StartServer is Start for tests: it fails the test on error and closes
// the server when the test ends.
func StartServer(t testing.TB, config string) *Server {
	t.Helper()
	s, err := Start(config)
	if err != nil {
		t.Fatalf("backstoptest: %v", err)
	}
	t.Cleanup(s.Close)
	return s
}

func (s *Server) start() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	cmd := exec.Command(s.bin, "serve", "--config", s.config,
		"--listen", "127.0.0.1:"+s.port, "--http", "127.0.0.1:0",
		"--data-dir", filepath.Join(s.dir, "data"))
	cmd.Dir = s.dir
	cmd.Env = append(os.Environ(), "RUST_LOG="+envOr("RUST_LOG", "warn"))
	logf, err := os.OpenFile(s.logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd.Stderr = logf
	out, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	exited := make(chan struct{})
	found := make(chan map[string]string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		sent := false
		for sc.Scan() {
			line := strings.TrimSpace(sc.Text())
			if !sent && strings.HasPrefix(line, "backstop listening") {
				fields := map[string]string{}
				for _, kv := range strings.Fields(line)[2:] {
					if k, v, ok := strings.Cut(kv, "="); ok {
						fields[k] = v
					}
				}
				found <- fields
				sent = true
			}
		}
		_, _ = io.Copy(io.Discard, out)
		_ = cmd.Wait()
		close(exited)
	}()
	select {
	case f := <-found:
		s.Addr, s.HTTPAddr = f["grpc"], f["http"]
		if i := strings.LastIndexByte(s.Addr, ':'); i >= 0 {
			s.port = s.Addr[i+1:]
		}
		s.cmd, s.exited = cmd, exited
		return nil
	case <-exited:
		return fmt.Errorf("backstop exited at startup; its log:\n%s", s.Logs())
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill()
		return fmt.Errorf("backstop did not start within 30s; its log:\n%s", s.Logs())
	}
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

// Logs returns what the server wrote to stderr so far.
func (s *Server) Logs() string {
	b, _ := os.ReadFile(s.logPath)
	return string(b)
}

// Kill is a crash: SIGKILL, then wait for the process to be gone.
func (s *Server) Kill() {
	s.mu.Lock()
	cmd, exited := s.cmd, s.exited
	s.cmd = nil
	s.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Kill()
	<-exited
}

// Pause stops the process (SIGSTOP): it accepts connections but never
// answers. It returns once the kernel reports the process stopped (a signal
// is delivered asynchronously; a server thread could otherwise still answer).
func (s *Server) Pause() error {
	if err := s.signal(syscall.SIGSTOP); err != nil {
		return err
	}
	s.mu.Lock()
	pid := s.cmd.Process.Pid
	s.mu.Unlock()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(2 * time.Millisecond) {
		if allThreadsStopped(pid) {
			return nil
		}
	}
	return errors.New("backstoptest: the server did not stop after SIGSTOP")
}

// allThreadsStopped reports whether every thread of pid is stopped. The
// process's own stat shows only its main thread; a worker thread on another
// core takes the signal a moment later. Without procfs it answers true (best
// effort).
func allThreadsStopped(pid int) bool {
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return true
	}
	for _, t := range tasks {
		stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/stat", pid, t.Name()))
		if err != nil {
			continue // the thread exited meanwhile
		}
		// "tid (comm) STATE ...": the state follows the last ')'.
		i := strings.LastIndexByte(string(stat), ')')
		if i < 0 || i+2 >= len(stat) || (stat[i+2] != 'T' && stat[i+2] != 't') {
			return false
		}
	}
	return true
}

// Resume continues a paused process (SIGCONT).
func (s *Server) Resume() error { return s.signal(syscall.SIGCONT) }

func (s *Server) signal(sig os.Signal) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil {
		return errors.New("backstoptest: server not running")
	}
	return s.cmd.Process.Signal(sig)
}

// Restart starts the server again on the same port and data directory
// (killing it first if it runs). The port may take a moment to be free.
func (s *Server) Restart() error {
	s.Kill()
	var err error
	for i := 0; i < 50; i++ {
		if err = s.start(); err == nil {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("backstop did not restart on port %s: %w", s.port, err)
}

// Close kills the server and removes its directory.
func (s *Server) Close() {
	s.Kill()
	os.RemoveAll(s.dir)
}
