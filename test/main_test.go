// Package test holds ferry's integration tests: they drive the built binary
// as a user would, against real processes, the real kernel, real cgroups and
// real CRIU. Most need root; they skip with a reason otherwise.
package test

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// ferryBin is the binary under test: $FERRY_BIN (make test sets it), or
// one built by TestMain.
var ferryBin string

func TestMain(m *testing.M) {
	os.Exit(testMain(m))
}

func testMain(m *testing.M) int {
	// What ferry learns of each CRIU (and of each test's CRIU wrapper) is
	// remembered in a directory of this run's, not in /run.
	facts, err := os.MkdirTemp("", "ferry-test-criu-facts-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(facts)
	os.Setenv("FERRY_CRIU_FACTS", facts)

	ferryBin = os.Getenv("FERRY_BIN")
	if ferryBin == "" {
		dir, err := os.MkdirTemp("", "ferry-test-bin-")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(dir)
		ferryBin = filepath.Join(dir, "ferry")
		cmd := exec.Command("go", "build", "-o", ferryBin, "../cmd/ferry")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			fmt.Fprintln(os.Stderr, "building ferry:", err)
			return 1
		}
	}
	return m.Run()
}

func requireRoot(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("integration test: skipped with -short")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root: it creates namespaces and cgroups")
	}
}

// env is one ferry state directory with its own jobs; its cleanup kills
// every job still running in it and checks that no cgroup is left.
type env struct {
	t    *testing.T
	root string
	// vars are set in the environment of every ferry this env runs (a
	// cgroup root of the test's own, say).
	vars []string
}

func newEnv(t *testing.T) *env {
	t.Helper()
	requireRoot(t)
	e := &env{t: t, root: t.TempDir()}
	t.Cleanup(e.cleanup)
	return e
}

// result is one run of the ferry binary.
type result struct {
	stdout, stderr string
	code           int
}

func (r result) String() string {
	return fmt.Sprintf("exit %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
}

// ferry runs the binary with this env's state directory.
func (e *env) ferry(args ...string) result {
	e.t.Helper()
	return e.ferryEnv(nil, args...)
}

func (e *env) ferryEnv(extraEnv []string, args ...string) result {
	e.t.Helper()
	return e.runFerry(nil, extraEnv, args...)
}

// runFerry runs the binary behind wrapper (e.g. nsenter), if any.
func (e *env) runFerry(wrapper, extraEnv []string, args ...string) result {
	e.t.Helper()
	argv := append(append(append([]string{}, wrapper...), ferryBin, "--root", e.root), args...)
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(append(os.Environ(), e.vars...), extraEnv...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	r := result{stdout: out.String(), stderr: errb.String()}
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		r.code = ee.ExitCode()
	case err != nil:
		e.t.Fatalf("running ferry %v: %v", args, err)
	}
	return r
}

// must runs ferry and fails the test unless it exits 0.
func (e *env) must(args ...string) string {
	e.t.Helper()
	r := e.ferry(args...)
	if r.code != 0 {
		e.t.Fatalf("ferry %s: %s", strings.Join(args, " "), r)
	}
	return r.stdout
}

// jobView mirrors the fields of `ferry list --json` the tests use.
type jobView struct {
	Name          string   `json:"name"`
	State         string   `json:"state"`
	Status        string   `json:"status"`
	InitPID       int      `json:"initPid"`
	MainPID       int      `json:"mainPid"`
	Cgroup        string   `json:"cgroup"`
	CgroupVersion int      `json:"cgroupVersion"`
	RSS           int64    `json:"rssBytes"`
	Tasks         int      `json:"tasks"`
	Command       []string `json:"command"`
	Operation     string   `json:"operation"`
	Exit          *struct {
		Code   int    `json:"code"`
		Signal string `json:"signal"`
		Reason string `json:"reason"`
	} `json:"exit"`
	Migration *struct {
		Role    string `json:"role"`
		State   string `json:"state"`
		Owner   int    `json:"owner"`
		Note    string `json:"note"`
		Resolve string `json:"resolve"`
	} `json:"migration"`
}

func (e *env) list() map[string]jobView {
	e.t.Helper()
	var views []jobView
	if err := json.Unmarshal([]byte(e.must("list", "--json")), &views); err != nil {
		e.t.Fatalf("decoding ferry list --json: %v", err)
	}
	m := make(map[string]jobView, len(views))
	for _, v := range views {
		m[v.Name] = v
	}
	return m
}

func (e *env) job(name string) jobView {
	e.t.Helper()
	v, ok := e.list()[name]
	if !ok {
		e.t.Fatalf("job %q not in ferry list", name)
	}
	return v
}

func (e *env) cleanup() {
	var views []jobView
	cmd := exec.Command(ferryBin, "--root", e.root, "list", "--json")
	cmd.Env = append(os.Environ(), e.vars...)
	out, err := cmd.Output()
	if err == nil {
		_ = json.Unmarshal(out, &views)
	}
	for _, v := range views {
		if v.State != "exited" {
			kill := exec.Command(ferryBin, "--root", e.root, "kill", "--grace", "1s", v.Name)
			kill.Env = append(os.Environ(), e.vars...)
			_ = kill.Run()
		}
	}
	// Every cgroup this env's jobs had must be gone by now.
	for _, v := range views {
		if v.Cgroup == "" {
			continue
		}
		if _, err := os.Stat(v.Cgroup); err == nil {
			e.t.Errorf("cgroup %s of job %s left behind", v.Cgroup, v.Name)
		}
	}
}

// eventually polls cond every 20ms until it holds or d passes.
func eventually(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// exec1 runs a command and returns its exit status.
func exec1(t *testing.T, name string, args ...string) int {
	t.Helper()
	err := exec.Command(name, args...).Run()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	if err != nil {
		t.Fatalf("running %s: %v", name, err)
	}
	return 0
}
