package test

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// A job is ended only once its checkpoint is whole where it was sent: a
// reader that quits, a closed standard output, a full disk each fail the
// checkpoint with one line and a distinct status, and the job runs on.

// assertRunsOn checks that job name is running, not frozen, and that its
// counter advances: a checkpoint that failed must not have cost the job.
func (e *env) assertRunsOn(name string) {
	e.t.Helper()
	if v := e.job(name); v.State != "running" {
		e.t.Fatalf("job %s after the failed checkpoint: state %q, want running", name, v.State)
	}
	n := e.logLines(name)
	eventually(e.t, 20*time.Second, name+"'s count to advance (thawed)", func() bool { return e.logLines(name) >= n+5 })
	assertConsecutive(e.t, numbers(e.t, e.must("logs", name)))
}

// assertOneLine checks that a failure said one line on stderr, naming want.
func assertOneLine(t *testing.T, r result, want string) {
	t.Helper()
	msg := strings.TrimSpace(r.stderr)
	if !strings.HasPrefix(msg, "ferry: ") || strings.Contains(msg, "\n") || !strings.Contains(msg, want) {
		t.Fatalf("stderr %q: want one line \"ferry: ...\" naming %q", r.stderr, want)
	}
}

// ferryTo runs ferry with its standard output set to stdout (nil: as
// os/exec gives it, /dev/null).
func (e *env) ferryTo(stdout *os.File, args ...string) result {
	e.t.Helper()
	cmd := exec.Command(ferryBin, append([]string{"--root", e.root}, args...)...)
	var errb bytes.Buffer
	if stdout != nil {
		cmd.Stdout = stdout
	}
	cmd.Stderr = &errb
	err := cmd.Run()
	r := result{stderr: errb.String()}
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		r.code = ee.ExitCode()
		if r.code < 0 {
			e.t.Fatalf("ferry %v: %v (stderr %q)", args, ee, r.stderr)
		}
	case err != nil:
		e.t.Fatalf("running ferry %v: %v", args, err)
	}
	return r
}

// TestCheckpointReaderQuits: `ferry checkpoint J -o - | head -c 1000`. The
// reader quits after 1000 bytes; ferry must not die of SIGPIPE holding the
// job frozen: exit 28, one line, and the job runs on.
func TestCheckpointReaderQuits(t *testing.T) {
	e := newEnv(t)
	requireCriu(t)
	e.must("run", "--name", "rq", "--", "sh", "-c", counter)
	eventually(t, 10*time.Second, "count to reach 20", func() bool { return e.logLines("rq") >= 20 })

	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	head := exec.Command("head", "-c", "1000")
	var got bytes.Buffer
	head.Stdin, head.Stdout = pr, &got
	if err := head.Start(); err != nil {
		t.Fatal(err)
	}
	pr.Close()
	// Uncompressed, the stream is far more than a pipe holds: ferry is
	// still writing when head quits.
	r := e.ferryTo(pw, "checkpoint", "--compress", "none", "rq", "-o", "-")
	pw.Close()
	if err := head.Wait(); err != nil {
		t.Fatalf("head: %v", err)
	}
	if got.Len() != 1000 || !strings.HasPrefix(got.String(), "FERRYIMG") {
		t.Fatalf("head read %d bytes starting %q, want the first 1000 of a stream", got.Len(), got.String()[:min(8, got.Len())])
	}
	if r.code != 28 {
		t.Fatalf("checkpoint to a reader that quit: %s\nwant exit 28", r)
	}
	assertOneLine(t, r, "broken pipe")
	e.assertRunsOn("rq")
}

// TestCheckpointClosedStdout: with standard output closed (>&-) the Go
// runtime hands ferry /dev/null there; a checkpoint to it would vanish
// and the job be ended for it. Refused before anything is frozen (exit
// 17), as is an explicit /dev/null; with --leave-running nothing is lost
// and it is allowed.
func TestCheckpointClosedStdout(t *testing.T) {
	e := newEnv(t)
	requireCriu(t)
	e.must("run", "--name", "cs", "--", "sh", "-c", counter)
	eventually(t, 10*time.Second, "count to reach 20", func() bool { return e.logLines("cs") >= 20 })

	cmd := exec.Command("sh", "-c", `exec "$0" --root "$1" checkpoint "$2" -o - >&-`, ferryBin, e.root, "cs")
	var errb bytes.Buffer
	cmd.Stderr = &errb
	err := cmd.Run()
	r := result{stderr: errb.String()}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		r.code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	if r.code != 17 {
		t.Fatalf("checkpoint -o - with stdout closed: %s\nwant exit 17", r)
	}
	assertOneLine(t, r, "standard output")
	e.assertRunsOn("cs")

	r = e.ferryTo(nil, "checkpoint", "cs", "-o", "-")
	if r.code != 17 {
		t.Fatalf("checkpoint -o - to /dev/null: %s\nwant exit 17", r)
	}
	assertOneLine(t, r, "/dev/null")
	e.assertRunsOn("cs")

	if r = e.ferryTo(nil, "checkpoint", "--leave-running", "cs", "-o", "-"); r.code != 0 {
		t.Fatalf("checkpoint --leave-running -o - to /dev/null: %s\nwant exit 0", r)
	}
	e.assertRunsOn("cs")
}

// TestCheckpointFullDisk: a stream checkpoint to a file on a filesystem
// that fills up, named by -o or as redirected standard output: exit 28,
// one line, nothing of the stream left there, and the job runs on.
func TestCheckpointFullDisk(t *testing.T) {
	e := newEnv(t)
	requireCriu(t)
	small := filepath.Join(t.TempDir(), "small")
	if err := os.Mkdir(small, 0o700); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", small).CombinedOutput(); err != nil {
		t.Skipf("cannot mount a small tmpfs: %v %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("umount", small).Run() })
	e.must("run", "--name", "fd", "--", "sh", "-c", counter)
	eventually(t, 10*time.Second, "count to reach 20", func() bool { return e.logLines("fd") >= 20 })

	// Uncompressed the counter's checkpoint is some 200 KiB (a shell and
	// the small init): over 64k.
	r := e.ferry("checkpoint", "--compress", "none", "fd", "-o", filepath.Join(small, "fd.ferry"))
	if r.code != 28 {
		t.Fatalf("checkpoint -o FILE into a full filesystem: %s\nwant exit 28", r)
	}
	assertOneLine(t, r, "no space left on device")
	if left, _ := os.ReadDir(small); len(left) != 0 {
		t.Errorf("failed checkpoint left %v on the full filesystem", left)
	}
	e.assertRunsOn("fd")

	// -o - > small/x, and >> after a line of its own: x is cut back to
	// what it held, freeing the space.
	for _, prior := range []string{"", "kept\n"} {
		x := filepath.Join(small, "x")
		if err := os.WriteFile(x, []byte(prior), 0o600); err != nil {
			t.Fatal(err)
		}
		f, err := os.OpenFile(x, os.O_WRONLY|os.O_APPEND, 0)
		if err != nil {
			t.Fatal(err)
		}
		r = e.ferryTo(f, "checkpoint", "--compress", "none", "fd", "-o", "-")
		f.Close()
		if r.code != 28 {
			t.Fatalf("checkpoint -o - into a file on a full filesystem: %s\nwant exit 28", r)
		}
		assertOneLine(t, r, "no space left on device")
		if b, _ := os.ReadFile(x); string(b) != prior {
			t.Errorf("after the failed checkpoint %s holds %d bytes, want only the %q it held before", x, len(b), prior)
		}
		e.assertRunsOn("fd")
		os.Remove(x)
	}
}

// TestCheckpointStdoutToFile: -o - redirected to a regular file is a
// whole checkpoint (fsynced before the job ends) that verifies and
// restores with the count continued.
func TestCheckpointStdoutToFile(t *testing.T) {
	e := newEnv(t)
	requireCriu(t)
	e.must("run", "--name", "sf", "--", "sh", "-c", counter)
	eventually(t, 10*time.Second, "count to reach 20", func() bool { return e.logLines("sf") >= 20 })
	path := filepath.Join(t.TempDir(), "sf.ferry")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	r := e.ferryTo(f, "checkpoint", "sf", "-o", "-")
	f.Close()
	if r.code != 0 {
		t.Fatalf("checkpoint -o - > file: %s", r)
	}
	if v := e.job("sf"); v.State != "exited" {
		t.Fatalf("job after checkpoint: %q, want exited", v.State)
	}
	before := numbers(t, e.must("logs", "sf"))
	e.must("verify", path)
	e.must("restore", "--name", "sf2", path)
	eventually(t, 20*time.Second, "the restored count to advance", func() bool { return e.logLines("sf2") >= 5 })
	after := numbers(t, e.must("logs", "sf2"))
	if after[0] != before[len(before)-1]+1 {
		t.Fatalf("restored count starts at %d, checkpointed at %d", after[0], before[len(before)-1])
	}
	assertConsecutive(t, after)
}

// TestCheckpointReaderStalls: `ferry checkpoint J -o - | R` where R stops
// reading: ferry blocks on the full pipe with the job frozen; Ctrl-C
// (exit 130) and --timeout (exit 12, as any checkpoint --timeout) must
// still end it, and the job runs on.
func TestCheckpointReaderStalls(t *testing.T) {
	e := newEnv(t)
	requireCriu(t)
	e.must("run", "--name", "rs", "--", "sh", "-c", counter)
	eventually(t, 10*time.Second, "count to reach 20", func() bool { return e.logLines("rs") >= 20 })
	for _, tc := range []struct {
		flags []string
		sig   bool
		want  int
	}{
		{nil, true, 130},
		{[]string{"--timeout", "3s"}, false, 12},
	} {
		pr, pw, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		args := append([]string{"--root", e.root, "checkpoint", "--compress", "none", "rs", "-o", "-"}, tc.flags...)
		cmd := exec.Command(ferryBin, args...)
		var errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = pw, &errb
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		pw.Close()
		// Read nothing: the pipe fills and ferry's writes block.
		var code int
		if tc.sig {
			code = signalExit(t, cmd, unix.SIGINT)
		} else {
			code = waitExit(t, cmd)
		}
		pr.Close()
		if code != tc.want {
			t.Fatalf("checkpoint %v to a reader that stopped reading: exit %d, stderr %q; want %d", tc.flags, code, errb.String(), tc.want)
		}
		assertOneLine(t, result{stderr: errb.String()}, "rs")
		e.assertRunsOn("rs")
	}
}
