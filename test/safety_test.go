package test

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// The job-safety tests: whatever happens to the ferry process that holds a
// job stopped (SIGKILL, SIGSTOP, a reader that stops reading), the job
// goes back to exactly the state it had, and one operation holds a job at
// a time (see internal/lease).

// frozenByCheckpoint says whether job name is frozen with an operation's
// lease on it.
func (e *env) frozenByCheckpoint(name string) bool {
	v := e.job(name)
	return v.State == "frozen" && v.Operation != ""
}

// assertRunsAgain checks that job name runs, free of any lease, and that
// its count advances again, with no number lost.
func (e *env) assertRunsAgain(name string) {
	e.t.Helper()
	eventually(e.t, 15*time.Second, name+" to be given back", func() bool {
		v := e.job(name)
		return v.State == "running" && v.Operation == ""
	})
	n := e.logLines(name)
	eventually(e.t, 10*time.Second, name+"'s count to advance again", func() bool { return e.logLines(name) > n+5 })
	assertConsecutive(e.t, numbers(e.t, e.must("logs", name)))
}

// spawn is how spawnFerry starts ferry: its stdin and stdout (nil:
// /dev/null for stdin, the returned buffer for stdout) and more
// environment.
type spawn struct {
	stdin  io.Reader
	stdout io.Writer
	env    []string
}

// spawnFerry starts ferry without waiting; its stderr (and stdout, unless
// given) goes to the returned buffer. The test's cleanup kills it, even
// stopped, if the test did not end it.
func (e *env) spawnFerry(s spawn, args ...string) (*exec.Cmd, *bytes.Buffer) {
	e.t.Helper()
	cmd := exec.Command(ferryBin, append([]string{"--root", e.root}, args...)...)
	cmd.Env = append(os.Environ(), s.env...)
	out := &bytes.Buffer{}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = s.stdin, cmp.Or[io.Writer](s.stdout, out), out
	cmd.WaitDelay = 5 * time.Second // a CRIU that outlives a killed ferry holds its output
	if err := cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() {
		if cmd.ProcessState == nil {
			_ = cmd.Process.Signal(syscall.SIGCONT)
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		}
	})
	return cmd, out
}

func exitCode(err error) int {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	if err != nil {
		return -1
	}
	return 0
}

// TestCheckpointKilledGivesJobBack: kill -9 of `ferry checkpoint` while
// it holds the job frozen, at several phases, leaves the job running
// again, and the next checkpoint of it works.
func TestCheckpointKilledGivesJobBack(t *testing.T) {
	requireCriu(t)
	e := newEnv(t)
	e.must("run", "--name", "k", "--", "sh", "-c", counter)
	eventually(t, 10*time.Second, "count", func() bool { return e.logLines("k") >= 10 })
	dir := t.TempDir()

	// While CRIU works (a CRIU that takes its time starting).
	slow := e.criuWrapper("sleep 3")
	cmd, _ := e.spawnFerry(spawn{}, "--criu", slow, "checkpoint", "-o", filepath.Join(dir, "a"), "k")
	eventually(t, 10*time.Second, "the checkpoint to freeze the job", func() bool { return e.frozenByCheckpoint("k") })
	if v := e.must("list"); !strings.Contains(v, "checkpointing, frozen") {
		t.Errorf("ferry list during the checkpoint says:\n%s", v)
	}
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	e.assertRunsAgain("k")

	// While the stream waits for a reader that never reads (-o - into a
	// pipe nobody drains).
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	cmd, _ = e.spawnFerry(spawn{stdout: w}, "checkpoint", "-o", "-", "k")
	w.Close()
	eventually(t, 20*time.Second, "the streamed checkpoint to freeze the job", func() bool { return e.frozenByCheckpoint("k") })
	time.Sleep(300 * time.Millisecond) // the pipe fills; ferry waits on it
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	e.assertRunsAgain("k")

	// The lease is free again: a checkpoint goes through and ends the job.
	out := filepath.Join(dir, "k.ferry")
	e.must("checkpoint", "-o", out, "k")
	if v := e.job("k"); v.State != "exited" || v.Exit == nil || v.Exit.Reason != "checkpointed" {
		t.Fatalf("job after the last checkpoint: %+v", v)
	}
	// What the killed checkpoints left was swept by the next command.
	if left, _ := filepath.Glob(filepath.Join(dir, ".ferry-scratch-*")); len(left) != 0 {
		t.Errorf("partial output left: %v", left)
	}
}

// TestCheckpointStoppedHolderLosesLease: a ferry that is itself stopped
// (Ctrl-Z, SIGSTOP) while it holds a job frozen loses its lease when it
// runs out: the job runs again, and once continued the checkpoint fails
// for that reason (not for what CRIU then made of a tree that ran on),
// and leaves nothing behind, since the job ran on after it. CRIU either
// works on meanwhile or fails meanwhile (the guard thawed what it froze:
// seen in CI as a CRIU freeze timeout).
func TestCheckpointStoppedHolderLosesLease(t *testing.T) {
	requireCriu(t)
	for _, c := range []struct{ name, criu string }{
		{"criu works on", "sleep 2"},
		{"criu fails meanwhile", `case " $* " in *" swrk "*) sleep 2; echo "criu: made to fail" >&2; exit 1;; esac`},
	} {
		t.Run(c.name, func(t *testing.T) {
			e := newEnv(t)
			e.must("run", "--name", "s", "--", "sh", "-c", counter)
			eventually(t, 10*time.Second, "count", func() bool { return e.logLines("s") >= 10 })
			out := filepath.Join(t.TempDir(), "s.ckpt")
			cmd, stderr := e.spawnFerry(spawn{env: []string{"FERRY_LEASE_TTL=1s"}}, "--criu", e.criuWrapper(c.criu), "checkpoint", "-o", out, "s")
			eventually(t, 10*time.Second, "the checkpoint to freeze the job", func() bool { return e.frozenByCheckpoint("s") })
			if err := cmd.Process.Signal(syscall.SIGSTOP); err != nil {
				t.Fatal(err)
			}
			stopped := time.Now()
			e.assertRunsAgain("s")
			t.Logf("given back %s after the holder stopped", time.Since(stopped).Round(time.Millisecond))
			if err := cmd.Process.Signal(syscall.SIGCONT); err != nil {
				t.Fatal(err)
			}
			code := exitCode(cmd.Wait())
			if code != 12 || !strings.Contains(stderr.String(), "lease ran out") || strings.Count(strings.TrimSpace(stderr.String()), "\n") != 0 {
				t.Fatalf("the continued checkpoint: exit %d, want 12 and one line saying the lease ran out: %s", code, stderr)
			}
			if _, err := os.Stat(out); !os.IsNotExist(err) {
				t.Errorf("a checkpoint of a job that ran on after it was left at %s", out)
			}
			e.assertRunsAgain("s")
		})
	}
}

// TestOneOperationAtATime: a second checkpoint, a migration, a freeze or a
// thaw of a job that a checkpoint holds is refused at once with exit 27,
// and the first checkpoint completes.
func TestOneOperationAtATime(t *testing.T) {
	requireCriu(t)
	e := newEnv(t)
	e.must("run", "--name", "b", "--", "sh", "-c", counter)
	eventually(t, 10*time.Second, "count", func() bool { return e.logLines("b") >= 10 })
	dir := t.TempDir()
	slow := e.criuWrapper("sleep 3")
	first, stderr := e.spawnFerry(spawn{}, "--criu", slow, "checkpoint", "-o", filepath.Join(dir, "1"), "b")
	eventually(t, 10*time.Second, "the first checkpoint to freeze the job", func() bool { return e.frozenByCheckpoint("b") })
	for _, args := range [][]string{
		{"checkpoint", "-o", filepath.Join(dir, "2"), "b"},
		{"checkpoint", "--leave-running", "-o", filepath.Join(dir, "3"), "b"},
		{"thaw", "b"},
		{"freeze", "b"},
	} {
		t0 := time.Now()
		r := e.ferry(args...)
		took := time.Since(t0)
		if r.code != 27 || !strings.Contains(r.stderr, "another ferry operation holds the job") || strings.Count(strings.TrimSpace(r.stderr), "\n") != 0 {
			t.Errorf("ferry %v while a checkpoint holds the job: %s", args, r)
		}
		if took > 5*time.Second {
			t.Errorf("ferry %v took %s to be refused", args, took)
		}
	}
	if code := exitCode(first.Wait()); code != 0 {
		t.Fatalf("the first checkpoint: exit %d: %s", code, stderr)
	}
	if v := e.job("b"); v.State != "exited" || v.Exit == nil || v.Exit.Reason != "checkpointed" {
		t.Fatalf("job after the first checkpoint: %+v", v)
	}
	for _, n := range []string{"2", "3"} {
		if _, err := os.Stat(filepath.Join(dir, n)); !os.IsNotExist(err) {
			t.Errorf("a refused checkpoint wrote %s", n)
		}
	}
}

// TestUserFrozenJobStaysFrozen: a job its user froze stays frozen after a
// --leave-running checkpoint and after a failed one.
func TestUserFrozenJobStaysFrozen(t *testing.T) {
	requireCriu(t)
	e := newEnv(t)
	e.must("run", "--name", "f", "--", "sh", "-c", counter)
	eventually(t, 10*time.Second, "count", func() bool { return e.logLines("f") >= 10 })
	// A freeze can catch the shell in a vfork, waiting (D) for a child
	// frozen before it exec'd: no CRIU can seize that tree until it is
	// thawed, and ferry leaves a user's freeze alone (it failed the
	// checkpoint, exit 12, about once in 25 runs). The user here freezes
	// again until the tree is dumpable.
	for i := 0; ; i++ {
		e.must("freeze", "f")
		if !inVfork(e.job("f").Cgroup) || i == 20 {
			break
		}
		e.must("thaw", "f")
		time.Sleep(30 * time.Millisecond)
	}
	n := e.logLines("f")
	dir := t.TempDir()
	e.must("checkpoint", "--leave-running", "-o", filepath.Join(dir, "lr"), "f")
	bad := fakeCriu(t, `echo "Error (criu/cr-dump.c:1): simulated failure" >&2; exit 1`)
	if r := e.ferry("--criu", bad, "checkpoint", "-o", filepath.Join(dir, "bad"), "f"); r.code != 12 {
		t.Fatalf("checkpoint with a failing CRIU: %s", r)
	}
	time.Sleep(300 * time.Millisecond)
	if v := e.job("f"); v.State != "frozen" || v.Operation != "" {
		t.Fatalf("the user's frozen job is %q (operation %q) after two checkpoints", v.State, v.Operation)
	}
	if m := e.logLines("f"); m != n {
		t.Fatalf("the frozen job counted on: %d -> %d lines", n, m)
	}
	e.must("thaw", "f")
	e.assertRunsAgain("f")
	// The --leave-running checkpoint is of the frozen state, whole.
	e.must("kill", "f")
	e.must("restore", "--name", "f2", filepath.Join(dir, "lr"))
	eventually(t, 10*time.Second, "the restored copy to count", func() bool { return e.logLines("f2") >= 10 })
	if got := numbers(t, e.must("logs", "f2")); got[0] != n+1 {
		t.Fatalf("the restored copy starts at %d, want %d", got[0], n+1)
	}
}

// traceStop attaches to pid with ptrace from a thread of its own, which
// leaves pid stopped under the trace; detach lets it go.
func traceStop(t *testing.T, pid int) (detach func()) {
	t.Helper()
	attached, release, done := make(chan error), make(chan struct{}), make(chan struct{})
	go func() {
		runtime.LockOSThread() // ptrace requests come from the tracing thread
		defer close(done)
		if err := syscall.PtraceAttach(pid); err != nil {
			attached <- err
			return
		}
		var ws syscall.WaitStatus
		_, err := syscall.Wait4(pid, &ws, syscall.WALL, nil)
		attached <- err
		<-release
		_ = syscall.PtraceDetach(pid)
	}()
	if err := <-attached; err != nil {
		t.Fatalf("ptrace attach %d: %v", pid, err)
	}
	once := sync.OnceFunc(func() { close(release); <-done })
	t.Cleanup(once)
	return once
}

func taskState(t *testing.T, pid int) byte {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	return s[strings.LastIndexByte(s, ')')+2]
}

// TestFailedDumpLeavesTaskStates: a checkpoint of a tree ferry did not
// start leaves every task as it was when it fails: refused up front for
// a task that another tracer holds (which stays traced and stopped), or
// failed in CRIU (the task its user stopped stays stopped; the rest run
// on).
func TestFailedDumpLeavesTaskStates(t *testing.T) {
	requireCriu(t)
	requireRoot(t)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	cmd := exec.Command("sh", "-c", `sleep 1000 & echo $!; sleep 1000 & echo $!; exec >/dev/null; `+counter)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	cmd.Stdout = w
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w.Close()
	t.Cleanup(func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGCONT)
		_ = cmd.Wait()
	})
	var stoppedPid, tracedPid int
	if _, err := fmt.Fscan(r, &stoppedPid, &tracedPid); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(stoppedPid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "the user's stop", func() bool { return taskState(t, stoppedPid) == 'T' })
	detach := traceStop(t, tracedPid)

	e := newEnv(t)
	// A traced task is refused up front: CRIU cannot seize it.
	res := e.ferry("checkpoint", "--pid", fmt.Sprint(cmd.Process.Pid), "-o", filepath.Join(t.TempDir(), "x"))
	if res.code != 16 || !strings.Contains(res.stderr, "traced") {
		t.Fatalf("checkpoint of a tree with a traced task: %s, want exit 16 naming the tracer", res)
	}
	if st := taskState(t, tracedPid); st != 't' {
		t.Errorf("the traced task is %q after the refusal, want t", st)
	}
	detach()
	// A dump that fails (here a CRIU that fails after ferry let it start)
	// signals no task it did not stop: the user's stopped one stays so.
	bad := fakeCriu(t, `echo "Error (criu/cr-dump.c:1): simulated failure" >&2; exit 1`)
	res = e.ferry("--criu", bad, "checkpoint", "--pid", fmt.Sprint(cmd.Process.Pid), "-o", filepath.Join(t.TempDir(), "y"))
	if res.code != 12 {
		t.Fatalf("checkpoint with a failing CRIU: %s, want exit 12", res)
	}
	time.Sleep(200 * time.Millisecond)
	if st := taskState(t, stoppedPid); st != 'T' {
		t.Errorf("the task its user stopped is %q after the failed checkpoint, want T (stopped)", st)
	}
	if st := taskState(t, cmd.Process.Pid); st == 'T' || st == 't' {
		t.Errorf("the tree's root is %q after the failed checkpoint, want it running", st)
	}
	// The rest runs on: the shell keeps starting a new sleep each round.
	first := readFile(t, fmt.Sprintf("/proc/%d/task/%d/children", cmd.Process.Pid, cmd.Process.Pid))
	eventually(t, 5*time.Second, "the tree's shell to go on", func() bool {
		return readFile(t, fmt.Sprintf("/proc/%d/task/%d/children", cmd.Process.Pid, cmd.Process.Pid)) != first
	})
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestMigrateSourceKilled: kill -9 of the source `ferry migrate` in the
// middle of the transfer. Stop-copy: the job runs on at the source and the
// destination drops what it started. Post-copy (the destination's copy
// may already run): the source's copy stays frozen, its record saying so
// and how to settle it, and the destination, cut from the job's memory,
// drops its copy; settled, the job continues where it stopped.
func TestMigrateSourceKilled(t *testing.T) {
	eachMidMigration(t, "kj", 7120, func(t *testing.T, m *midMigration) {
		_ = m.cmd.Process.Kill()
		_ = m.cmd.Wait()
		m.destinationDrops(t) // the link goes down with the source
		src := m.src
		if m.mode == "stop-copy" {
			eventually(t, 15*time.Second, "the source job to run again", func() bool {
				v := src.job("kj")
				return v.State == "running" && v.Operation == ""
			})
			assertKeptHere(t, src, m.dst, "kj", m.sum, m.before)
			return
		}
		v := src.job("kj")
		if v.State != "frozen" || !strings.Contains(v.Operation, "must never run again") {
			t.Fatalf("post-copy source after its ferry was killed: state %q, operation %q", v.State, v.Operation)
		}
		if l := src.must("list"); !strings.Contains(l, "post-copy migration") {
			t.Errorf("ferry list does not say why the job is frozen:\n%s", l)
		}
		n, _ := src.verifyLines("kj")
		time.Sleep(300 * time.Millisecond)
		if now, _ := src.verifyLines("kj"); len(now) != len(n) {
			t.Fatalf("the kept copy ran: %d verify lines, then %d", len(n), len(now))
		}
		// Settled from the source: the destination dropped its copy, so
		// the source's, whole, goes on.
		if r := src.ferryIn(m.h.a, "migrate", "kj", "--to", m.listen, "--token-file", m.token); r.code != 0 || !strings.Contains(r.stdout, "runs on here") {
			t.Fatalf("settling the migration: %s", r)
		}
		src.assertContinues("kj", m.sum, m.before[len(m.before)-1]+1)
		if v := src.job("kj"); v.Operation != "" {
			t.Errorf("the note outlived the thaw: %q", v.Operation)
		}
	})
}

// silencingProxy forwards everything from client to target, and from
// target to client only until limit bytes have gone from client to
// target: from then on the target seems to have gone silent, while it
// still hears the client.
func silencingProxy(t *testing.T, ns, listen, target string, limit int64) func() {
	t.Helper()
	return proxy(t, ns, listen, target, func(c, d net.Conn) {
		var sent atomic.Int64
		go pump(d, c, func(int) bool { return sent.Load() < limit })
		pump(c, d, func(n int) bool { sent.Add(int64(n)); return true })
		c.Close()
		d.Close()
	})
}

// TestMigrateSilentDestination: a destination that goes silent once the
// job's stream is on its way (here: its answers stop reaching the source)
// does not hold the source's job frozen for long: after the silence bound
// (30 s; 3 s here) the source gives up, the job runs on at the source, and
// the destination, told so, drops its copy.
func TestMigrateSilentDestination(t *testing.T) {
	requireCriu(t)
	w := buildWorkload(t)
	h := newHosts(t)
	src, dst := newEnv(t), newEnv(t)
	token := writeToken(t, "correct horse battery staple 42")
	listen := net.JoinHostPort(h.addrB, "7140")
	dst.serve(h.b, listen, token)
	if r := src.ferryIn(h.a, "run", "--name", "sd", "--", w, "memory", "64"); r.code != 0 {
		t.Fatalf("run: %s", r)
	}
	src.waitLines("sd", "verify ", 1)
	sum := src.lines("sd", "sum ")[0]
	before, _ := src.verifyLines("sd")
	via := net.JoinHostPort(h.addrB, "7141")
	defer silencingProxy(t, h.b, via, listen, 32<<20)()

	// Bounded: the bug was a source frozen for the 10 minutes of a restore.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "nsenter", "--net=/run/netns/"+h.a, ferryBin, "--root", src.root,
		"migrate", "sd", "--to", via, "--token-file", token, "--mode", "stop-copy")
	cmd.Env = append(os.Environ(), "FERRY_PEER_SILENCE=3s")
	t0 := time.Now()
	out, err := cmd.CombinedOutput()
	took := time.Since(t0)
	if code := exitCode(err); code != 19 || !strings.Contains(string(out), "silent") {
		t.Fatalf("migrate to a destination gone silent: exit %d after %s\n%s", code, took, out)
	}
	t.Logf("gave up after %s: %s", took.Round(time.Millisecond), strings.TrimSpace(string(out)))
	eventually(t, 30*time.Second, "the destination to drop its copy", func() bool {
		for _, v := range dst.list() {
			if v.State != "exited" {
				return false
			}
		}
		return true
	})
	assertKeptHere(t, src, dst, "sd", sum, before)
}

// inVfork says whether a task of the cgroup at path waits uninterruptibly
// (state D): a vfork parent whose child has not exec'd yet.
func inVfork(path string) bool {
	b, _ := os.ReadFile(filepath.Join(path, "cgroup.procs"))
	for _, pid := range strings.Fields(string(b)) {
		tasks, _ := filepath.Glob(filepath.Join("/proc", pid, "task", "*", "stat"))
		for _, st := range tasks {
			b, _ := os.ReadFile(st)
			if i := strings.LastIndexByte(string(b), ')'); i >= 0 && i+2 < len(b) && b[i+2] == 'D' {
				return true
			}
		}
	}
	return false
}
