package criu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// runScript runs the action script the way CRIU does (sh, no arguments,
// the action in CRTOOLS_SCRIPT_ACTION) and returns its exit code; it fails
// the test if the script is still running after a few seconds.
func runScript(t *testing.T, args []string, env []string, action string) int {
	t.Helper()
	if len(args) != 2 || args[0] != "--action-script" {
		t.Fatalf("hook arguments %q", args)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "/bin/sh", args[1])
	cmd.Env = append(append(os.Environ(), actionEnv+"="+action), env...)
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("the %s script hangs (output %q)", action, out)
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return 0
}

// TestPreDumpHook drives the generated script's pre-dump handshake with
// /bin/sh: ferry's verdict becomes the script's status, and a ferry that
// is gone fails the script instead of leaving it (and CRIU) waiting.
func TestPreDumpHook(t *testing.T) {
	bridge := func(t *testing.T, handle func(string) error) (*Actions, []string, []string) {
		t.Helper()
		a, err := BridgeActions(t.TempDir(), ActionPreDump)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = a.Close() })
		args, env, err := a.HookArgs()
		if err != nil {
			t.Fatal(err)
		}
		if len(env) != 0 {
			t.Errorf("pre-dump alone needs no environment, got %q", env)
		}
		if handle != nil {
			ctx, cancel := context.WithCancel(context.Background())
			t.Cleanup(cancel)
			go a.Serve(ctx, handle)
		}
		return a, args, env
	}

	t.Run("ok freezes and passes", func(t *testing.T) {
		var mu sync.Mutex
		var asked []string
		_, args, env := bridge(t, func(action string) error {
			mu.Lock()
			defer mu.Unlock()
			asked = append(asked, action)
			return nil
		})
		if code := runScript(t, args, env, ActionPreDump); code != 0 {
			t.Fatalf("pre-dump script exited %d with ferry saying ok", code)
		}
		// Actions that are not bridged pass without asking ferry; the
		// post-dump one must not run ferry when only pre-dump is bridged.
		for _, other := range []string{"network-lock", ActionPostDump, "status-ready"} {
			if code := runScript(t, args, env, other); code != 0 {
				t.Errorf("%s script exited %d", other, code)
			}
		}
		mu.Lock()
		defer mu.Unlock()
		if !slices.Equal(asked, []string{ActionPreDump}) {
			t.Errorf("ferry was asked %q", asked)
		}
	})

	t.Run("a failed freeze fails the script", func(t *testing.T) {
		_, args, env := bridge(t, func(string) error { return errors.New("cannot freeze") })
		if code := runScript(t, args, env, ActionPreDump); code == 0 {
			t.Fatal("pre-dump script passed though ferry said no")
		}
	})

	t.Run("ferry closed before the script ran", func(t *testing.T) {
		a, args, env := bridge(t, func(string) error { return nil })
		if err := a.Close(); err != nil {
			t.Fatal(err)
		}
		if code := runScript(t, args, env, ActionPreDump); code == 0 {
			t.Fatal("pre-dump script passed with nobody to answer")
		}
	})

	t.Run("ferry closes while the script waits", func(t *testing.T) {
		a, args, env := bridge(t, nil) // nobody answers
		done := make(chan int, 1)
		go func() { done <- runScript(t, args, env, ActionPreDump) }()
		waitAsked(t, a.dir, os.Getpid())
		_ = a.Close()
		if code := <-done; code == 0 {
			t.Fatal("pre-dump script passed with nobody to answer")
		}
	})

	t.Run("ferry dies while the script waits", func(t *testing.T) {
		dir, helper := deadFerry(t)
		done := make(chan int, 1)
		go func() {
			done <- runScript(t, []string{"--action-script", filepath.Join(dir, ActionScript)}, nil, ActionPreDump)
		}()
		waitAsked(t, dir, os.Getpid(), helper.Process.Pid)
		_ = helper.Process.Kill()
		if code := <-done; code == 0 {
			t.Fatal("pre-dump script passed after ferry died")
		}
	})

	t.Run("ferry died before the script ran", func(t *testing.T) {
		// The FIFOs are still there, with nobody holding them: opening
		// the answer FIFO for reading alone would wait for ever.
		dir, helper := deadFerry(t)
		_ = helper.Process.Kill()
		_ = helper.Wait()
		if code := runScript(t, []string{"--action-script", filepath.Join(dir, ActionScript)}, nil, ActionPreDump); code == 0 {
			t.Fatal("pre-dump script passed after ferry died")
		}
	})
}

// deadFerry starts a ferry that bridges pre-dump in a directory and
// never answers, in a process of its own for the test to kill.
func deadFerry(t *testing.T) (string, *exec.Cmd) {
	t.Helper()
	dir := t.TempDir()
	helper := exec.Command(os.Args[0], "-test.run=^TestPreDumpHookHelper$")
	helper.Env = append(os.Environ(), "FERRY_TEST_PRE_DUMP_DIR="+dir)
	stdout, err := helper.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := helper.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = helper.Process.Kill(); _ = helper.Wait() })
	var line [64]byte
	if n, _ := stdout.Read(line[:]); !strings.HasPrefix(string(line[:n]), "ready") {
		t.Fatalf("helper said %q", line[:n])
	}
	return dir, helper
}

// waitAsked waits until the script is waiting for its verdict: a process
// other than ferry's (pids) holds the answer FIFO of dir.
func waitAsked(t *testing.T, dir string, ferry ...int) {
	t.Helper()
	path := filepath.Join(dir, PreDumpAnswer)
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if heldByOther(path, ferry) {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatal("the script never opened the answer FIFO")
}

// heldByOther reports whether a process not in pids has path open.
func heldByOther(path string, pids []int) bool {
	procs, _ := filepath.Glob("/proc/[0-9]*")
	for _, p := range procs {
		if slices.Contains(pids, atoi(filepath.Base(p))) {
			continue
		}
		fds, _ := filepath.Glob(p + "/fd/*")
		for _, fd := range fds {
			if l, _ := os.Readlink(fd); l == path {
				return true
			}
		}
	}
	return false
}

func atoi(s string) int { n, _ := strconv.Atoi(s); return n }

// TestPreDumpHookHelper is the helper process of "ferry dies while the
// script waits": it bridges pre-dump and never answers.
func TestPreDumpHookHelper(t *testing.T) {
	dir := os.Getenv("FERRY_TEST_PRE_DUMP_DIR")
	if dir == "" {
		t.Skip("helper process only")
	}
	a, err := BridgeActions(dir, ActionPreDump)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := a.HookArgs(); err != nil {
		t.Fatal(err)
	}
	fmt.Println("ready")
	select {} // until killed
}

// TestPostDumpOnlyScript: with only post-dump bridged, pre-dump passes at
// once (other dumps keep their behaviour).
func TestPostDumpOnlyScript(t *testing.T) {
	a, err := ListenActions(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	args, env, err := a.HookArgs()
	if err != nil {
		t.Fatal(err)
	}
	if len(env) != 1 || !strings.HasPrefix(env[0], ActionSocketEnv+"=") {
		t.Fatalf("environment %q", env)
	}
	if code := runScript(t, args, env, ActionPreDump); code != 0 {
		t.Fatalf("pre-dump exited %d", code)
	}
	if _, err := os.Stat(filepath.Join(a.dir, PreDumpAsk)); err == nil {
		t.Error("pre-dump FIFO made though pre-dump is not bridged")
	}
}
