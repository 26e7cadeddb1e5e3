package test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Reading a checkpoint from a pipe or FIFO honours Ctrl-C, SIGTERM and
// --timeout: a writer that never comes, or stalls halfway, cannot hold a
// restore (or verify, or inspect) forever, and nothing is left behind.

// startFerry starts ferry with stdin (nil: /dev/null) without waiting.
func (e *env) startFerry(stdin io.Reader, args ...string) (*exec.Cmd, *bytes.Buffer) {
	e.t.Helper()
	return e.spawnFerry(spawn{stdin: stdin}, args...)
}

// waitExit waits (60s at most: a hang is the bug) for cmd and returns its
// exit status.
func waitExit(t *testing.T, cmd *exec.Cmd) int {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return ee.ExitCode()
		}
		if err != nil {
			t.Fatal(err)
		}
		return 0
	case <-time.After(60 * time.Second):
		t.Fatalf("%v did not end within 60s", cmd.Args)
		return -1
	}
}

// signalExit sends sig to cmd once it has had a moment to block, and
// returns its exit status.
func signalExit(t *testing.T, cmd *exec.Cmd, sig unix.Signal) int {
	t.Helper()
	time.Sleep(500 * time.Millisecond)
	if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", cmd.Process.Pid)); err != nil || strings.Contains(string(st), ") Z ") {
		code := waitExit(t, cmd)
		t.Fatalf("%v ended (exit %d) before %v: it did not wait for its input", cmd.Args, code, sig)
	}
	if err := cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
	return waitExit(t, cmd)
}

// inputCheckpoint checkpoints a counter job (left running) to a .ferry
// file and returns the file's bytes.
func (e *env) inputCheckpoint(name string) []byte {
	e.t.Helper()
	e.must("run", "--name", name, "--", "sh", "-c", counter)
	eventually(e.t, 10*time.Second, "count to reach 20", func() bool { return e.logLines(name) >= 20 })
	path := filepath.Join(e.t.TempDir(), name+".ferry")
	e.must("checkpoint", "--leave-running", "--compress", "none", "-o", path, name)
	b, err := os.ReadFile(path)
	if err != nil {
		e.t.Fatal(err)
	}
	return b
}

// assertNothingRestored checks that only the jobs in want exist, that no
// cgroup of a job named restored exists and that no served directory is
// left.
func (e *env) assertNothingRestored(restored string, want ...string) {
	e.t.Helper()
	jobs := e.list()
	if len(jobs) != len(want) {
		e.t.Errorf("jobs after the interrupted restore: %v, want only %v", jobs, want)
	}
	if _, ok := jobs[restored]; ok {
		e.t.Errorf("the interrupted restore left a record of %s", restored)
	}
	assertNoJobCgroups(e.t, restored)
	if left, _ := os.ReadDir(filepath.Join(e.root, "serve")); len(left) != 0 {
		e.t.Errorf("the interrupted restore left %v in %s", left, filepath.Join(e.root, "serve"))
	}
}

func mkfifo(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "in.ferry")
	if err := unix.Mkfifo(p, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// halfWriter opens fifo for writing (once ferry opens it to read), writes
// the first half of b and stalls, holding it open until the test ends.
func halfWriter(t *testing.T, fifo string, b []byte) {
	t.Helper()
	opened := make(chan *os.File, 1)
	go func() {
		f, err := os.OpenFile(fifo, os.O_WRONLY, 0)
		if err != nil {
			opened <- nil
			return
		}
		opened <- f
		_, _ = f.Write(b[:len(b)/2])
	}()
	t.Cleanup(func() {
		select {
		case f := <-opened:
			if f != nil {
				f.Close()
			}
		case <-time.After(time.Second):
			// Never opened: unblock the open by opening the read side.
			if r, err := os.OpenFile(fifo, os.O_RDONLY|unix.O_NONBLOCK, 0); err == nil {
				if f := <-opened; f != nil {
					f.Close()
				}
				r.Close()
			}
		}
	})
}

// TestRestoreFIFONoWriter: `ferry restore FIFO` with no writer ends on
// SIGTERM with 130, on --timeout with 13 and a line naming the timeout,
// and leaves nothing behind; verify and inspect of such a FIFO end on
// SIGINT with 130.
func TestRestoreFIFONoWriter(t *testing.T) {
	e := newEnv(t)
	requireCriu(t)
	fifo := mkfifo(t)

	cmd, out := e.startFerry(nil, "restore", "--name", "nw", fifo)
	if code := signalExit(t, cmd, unix.SIGTERM); code != 130 {
		t.Fatalf("restore of a FIFO without a writer, sent SIGTERM: exit %d, %s; want 130", code, out)
	}
	e.assertNothingRestored("nw")

	cmd, out = e.startFerry(nil, "restore", "--timeout", "2s", "--name", "nw", fifo)
	if code := waitExit(t, cmd); code != 13 {
		t.Fatalf("restore --timeout 2s of a FIFO without a writer: exit %d, %s; want 13", code, out)
	}
	assertOneLine(t, result{stderr: out.String()}, "--timeout 2s")
	e.assertNothingRestored("nw")

	for _, verb := range []string{"verify", "inspect"} {
		cmd, out = e.startFerry(nil, verb, fifo)
		if code := signalExit(t, cmd, unix.SIGINT); code != 130 {
			t.Fatalf("%s of a FIFO without a writer, sent SIGINT: exit %d, %s; want 130", verb, code, out)
		}
	}
}

// TestRestoreStalledWriter: a writer that sends half a checkpoint and
// goes silent, through a FIFO or a pipe on standard input, cannot hold a
// restore: SIGTERM, SIGINT and --timeout end it, leaving nothing behind;
// the whole checkpoint through the same FIFO restores with the count
// continued.
func TestRestoreStalledWriter(t *testing.T) {
	e := newEnv(t)
	requireCriu(t)
	ckpt := e.inputCheckpoint("sw")

	fifo := mkfifo(t)
	halfWriter(t, fifo, ckpt)
	cmd, out := e.startFerry(nil, "restore", "--name", "sw2", fifo)
	if code := signalExit(t, cmd, unix.SIGTERM); code != 130 {
		t.Fatalf("restore of half a checkpoint through a FIFO, sent SIGTERM: exit %d, %s; want 130", code, out)
	}
	e.assertNothingRestored("sw2", "sw")

	fifo = mkfifo(t)
	halfWriter(t, fifo, ckpt)
	cmd, out = e.startFerry(nil, "restore", "--timeout", "3s", "--name", "sw2", fifo)
	if code := waitExit(t, cmd); code != 13 || !strings.Contains(out.String(), "--timeout 3s") {
		t.Fatalf("restore --timeout 3s of half a checkpoint: exit %d, %s; want 13 naming the timeout", code, out)
	}
	e.assertNothingRestored("sw2", "sw")

	// Standard input: a pipe whose writer stalls halfway.
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pw.Close() })
	cmd, out = e.startFerry(pr, "restore", "--name", "sw2", "-")
	pr.Close()
	go func() { _, _ = pw.Write(ckpt[:len(ckpt)/2]) }()
	if code := signalExit(t, cmd, unix.SIGINT); code != 130 {
		t.Fatalf("restore - of half a checkpoint, sent SIGINT: exit %d, %s; want 130", code, out)
	}
	e.assertNothingRestored("sw2", "sw")

	// verify of the stalled FIFO likewise.
	fifo = mkfifo(t)
	halfWriter(t, fifo, ckpt)
	cmd, out = e.startFerry(nil, "verify", fifo)
	if code := signalExit(t, cmd, unix.SIGINT); code != 130 {
		t.Fatalf("verify of half a checkpoint through a FIFO, sent SIGINT: exit %d, %s; want 130", code, out)
	}

	// The whole checkpoint through a FIFO restores, counting on.
	fifo = mkfifo(t)
	go func() {
		if f, err := os.OpenFile(fifo, os.O_WRONLY, 0); err == nil {
			_, _ = f.Write(ckpt)
			f.Close()
		}
	}()
	e.must("restore", "--timeout", "2m", "--name", "sw3", fifo)
	eventually(t, 20*time.Second, "the restored count to advance", func() bool { return e.logLines("sw3") >= 5 })
	assertConsecutive(t, numbers(t, e.must("logs", "sw3")))
}
