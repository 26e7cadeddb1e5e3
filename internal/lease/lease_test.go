package lease

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// fakeJob records what the guard does to it.
type fakeJob struct {
	mu       sync.Mutex
	frozen   bool
	events   []string
	notes    []string
	changed  chan struct{}
	frozeErr error
}

func newFakeJob() *fakeJob { return &fakeJob{changed: make(chan struct{}, 16)} }

func (j *fakeJob) Frozen() (bool, error) {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.frozen, j.frozeErr
}

func (j *fakeJob) IsFrozen() (bool, error) {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.frozen, j.frozeErr
}

func (j *fakeJob) GiveBack(_ context.Context, wasFrozen bool) error {
	j.mu.Lock()
	j.frozen = wasFrozen
	j.events = append(j.events, "giveback")
	j.mu.Unlock()
	j.changed <- struct{}{}
	return nil
}

func (j *fakeJob) End(_ context.Context, reason string) error {
	j.mu.Lock()
	j.events = append(j.events, "end:"+reason)
	j.mu.Unlock()
	j.changed <- struct{}{}
	return nil
}

func (j *fakeJob) Note(op, kept string) {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.notes = append(j.notes, op+"|"+kept)
}

func (j *fakeJob) freeze() {
	j.mu.Lock()
	j.frozen = true
	j.mu.Unlock()
}

func (j *fakeJob) state() (bool, []string) {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.frozen, append([]string(nil), j.events...)
}

func (j *fakeJob) wait(t *testing.T) {
	t.Helper()
	select {
	case <-j.changed:
	case <-time.After(10 * time.Second):
		t.Fatal("the guard did nothing within 10 s")
	}
}

func guard(t *testing.T) (*fakeJob, string) {
	t.Helper()
	j := newFakeJob()
	// A deep directory: the socket's path is longer than sun_path holds.
	dir := filepath.Join(t.TempDir(), strings.Repeat("d", 60), strings.Repeat("e", 60))
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, SocketName)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	if err := NewGuard(j, nil).Listen(ctx, path); err != nil {
		t.Fatal(err)
	}
	return j, path
}

func TestHolderVanishesUncommitted(t *testing.T) {
	j, path := guard(t)
	l, err := Take(context.Background(), path, "checkpoint")
	if err != nil {
		t.Fatal(err)
	}
	if l.WasFrozen() {
		t.Fatal("a running job was reported frozen")
	}
	j.freeze() // the holder freezes the job, then dies
	l.Close()
	j.wait(t)
	if frozen, ev := j.state(); frozen || len(ev) != 1 || ev[0] != "giveback" {
		t.Fatalf("after the holder vanished: frozen=%v events=%v, want thawed by one giveback", frozen, ev)
	}
}

func TestUserFrozenJobStaysFrozen(t *testing.T) {
	j, path := guard(t)
	j.freeze() // the user froze it before the checkpoint
	l, err := Take(context.Background(), path, "checkpoint")
	if err != nil {
		t.Fatal(err)
	}
	if !l.WasFrozen() {
		t.Fatal("a frozen job was reported running")
	}
	l.Close()
	j.wait(t)
	if frozen, _ := j.state(); !frozen {
		t.Fatal("the guard thawed a job its user had frozen")
	}
}

func TestOneLeaseAtATime(t *testing.T) {
	j, path := guard(t)
	l, err := Take(context.Background(), path, "migrate")
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	_, err = Take(context.Background(), path, "checkpoint")
	var busy *BusyError
	if !errors.As(err, &busy) || !errors.Is(err, ErrBusy) || busy.Op != "migrate" || busy.PID != os.Getpid() {
		t.Fatalf("second take: %v, want busy with migrate by this pid", err)
	}
	if d := time.Since(t0); d > 5*time.Second {
		t.Fatalf("busy answer took %s", d)
	}
	if err := l.Release(); err != nil {
		t.Fatal(err)
	}
	j.wait(t)
	l2, err := Take(context.Background(), path, "checkpoint")
	if err != nil {
		t.Fatalf("take after release: %v", err)
	}
	l2.Close()
}

func TestCommitEndSurvivesHolder(t *testing.T) {
	j, path := guard(t)
	l, err := Take(context.Background(), path, "checkpoint")
	if err != nil {
		t.Fatal(err)
	}
	j.freeze()
	if err := l.Commit(End, "checkpointed"); err != nil {
		t.Fatal(err)
	}
	l.Close() // died before it ended the job
	j.wait(t)
	if _, ev := j.state(); len(ev) != 1 || ev[0] != "end:checkpointed" {
		t.Fatalf("events %v, want the guard to end the job", ev)
	}
}

func TestKeepThenRelease(t *testing.T) {
	j, path := guard(t)
	l, err := Take(context.Background(), path, "migrate")
	if err != nil {
		t.Fatal(err)
	}
	j.freeze()
	if err := l.Commit(Keep, "post-copy"); err != nil {
		t.Fatal(err)
	}
	// The destination confirmed its copy is gone: the holder gives the
	// job back after all.
	if err := l.Release(); err != nil {
		t.Fatal(err)
	}
	j.wait(t)
	if frozen, _ := j.state(); frozen {
		t.Fatal("released after a Keep, the job stayed frozen")
	}
}

func TestKeptJobStaysFrozen(t *testing.T) {
	j, path := guard(t)
	l, err := Take(context.Background(), path, "migrate")
	if err != nil {
		t.Fatal(err)
	}
	j.freeze()
	if err := l.Commit(Keep, "in doubt"); err != nil {
		t.Fatal(err)
	}
	l.Close() // waits until the guard is done with the lease
	frozen, ev := j.state()
	if !frozen || len(ev) != 0 {
		t.Fatalf("kept job: frozen=%v events=%v, want frozen and untouched", frozen, ev)
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	if !strings.Contains(strings.Join(j.notes, ";"), "|in doubt") {
		t.Fatalf("notes %v lack the kept note", j.notes)
	}
}

// A holder that stops renewing (here: a child process that takes the
// lease, then is stopped) loses it after the TTL: once continued it can
// tell (Lost) before it commits, and its late commit is refused.
func TestLeaseRunsOut(t *testing.T) {
	if os.Getenv("LEASE_CHILD") != "" {
		l, err := Take(context.Background(), os.Getenv("LEASE_CHILD"), "checkpoint")
		if err != nil {
			os.Exit(3)
		}
		if l.Lost() {
			os.Exit(8) // a lease just taken reads as lost
		}
		// The take's read deadline long past (a CRIU that worked longer
		// than it) says nothing of the lease.
		_ = l.c.SetReadDeadline(time.Now().Add(-time.Second))
		if l.Lost() {
			os.Exit(10)
		}
		os.Stdout.WriteString("taken\n")
		time.Sleep(2 * time.Second) // stopped meanwhile by the parent
		if !l.Lost() {
			os.Exit(9) // the guard gave the job back, and the holder cannot tell
		}
		if err := l.Commit(End, "checkpointed"); errors.Is(err, ErrExpired) {
			os.Exit(7)
		}
		os.Exit(0)
	}
	j, path := guard(t)
	cmd := exec.Command(os.Args[0], "-test.run=^TestLeaseRunsOut$")
	cmd.Env = append(os.Environ(), "LEASE_CHILD="+path, "FERRY_LEASE_TTL=400ms")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 6)
	if _, err := out.Read(buf); err != nil || string(buf) != "taken\n" {
		t.Fatalf("child: %q %v", buf, err)
	}
	j.freeze()
	_ = cmd.Process.Signal(os.Signal(stopSignal))
	j.wait(t) // the TTL ran out
	_ = cmd.Process.Signal(os.Signal(contSignal))
	err = cmd.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 7 {
		t.Fatalf("child: %v, want exit 7 (its late commit refused)", err)
	}
	if frozen, ev := j.state(); frozen || len(ev) != 1 || ev[0] != "giveback" {
		t.Fatalf("frozen=%v events=%v, want given back once", frozen, ev)
	}
}

var (
	stopSignal = syscall.SIGSTOP
	contSignal = syscall.SIGCONT
)

// A CRIU that outlives the holder freezes the job again when it lets go
// (it puts back the state it found): the guard gives it back again.
func TestGuardGivesBackARefrozenJob(t *testing.T) {
	j, path := guard(t)
	l, err := Take(context.Background(), path, "checkpoint")
	if err != nil {
		t.Fatal(err)
	}
	j.freeze()
	l.Close() // died
	j.wait(t)
	j.freeze() // CRIU, letting go, puts back the frozen state it found
	j.wait(t)
	if frozen, ev := j.state(); frozen || len(ev) != 2 {
		t.Fatalf("frozen=%v events=%v, want given back twice", frozen, ev)
	}
}
