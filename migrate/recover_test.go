package migrate

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/ferry-cr/ferry/internal/job"
	"github.com/ferry-cr/ferry/internal/proc"
)

// A start that a starting serve finds under way (its serve dead, its shim
// alive) is recovered once it ends: here it finishes, as it may when the
// restore is done just as its serve dies, and the held copy it leaves is
// recorded in doubt, as Recover records one it finds held. Real processes
// stand in for the dead serve, the shim and the restored init.
func TestRecoverStartUnderWay(t *testing.T) {
	start := func(args ...string) (*exec.Cmd, uint64) {
		t.Helper()
		c := exec.Command(args[0], args[1:]...)
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Process.Kill(); _ = c.Wait() })
		st, err := proc.ReadStat(c.Process.Pid)
		if err != nil {
			t.Fatal(err)
		}
		return c, st.StartTime
	}
	serve, serveStart := start("true")
	_ = serve.Wait() // the dead serve
	shim, shimStart := start("sleep", "60")
	initProc, initStart := start("sleep", "60")

	s := &job.Registry{Root: t.TempDir()}
	if err := os.MkdirAll(filepath.Join(s.Root, "jobs"), 0o700); err != nil {
		t.Fatal(err)
	}
	rec := &job.Record{Name: "u", ID: job.NewID(), Status: job.Starting,
		OwnerPID: serve.Process.Pid, OwnerStart: serveStart, ShimPID: shim.Process.Pid, ShimStart: shimStart,
		Migration: &job.MigrationNote{Role: "destination", State: stateHeld, Owner: serve.Process.Pid, Peer: "198.18.0.1:1"}}
	if err := s.Create(rec); err != nil {
		t.Fatal(err)
	}
	sv := &Server{Store: s}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	did := sv.Recover(ctx)
	if len(did) != 1 {
		t.Fatalf("Recover did %q, want one line for the start under way", did)
	}
	if r, _ := s.Load("u"); r.Status != job.Starting || r.Migration.State != stateHeld {
		t.Fatalf("Recover touched a start under way: %+v", r)
	}
	// The shim finishes the start: the copy is held frozen.
	if _, err := s.Update("u", func(r *job.Record) error {
		r.Status, r.InitPID, r.InitStart = job.Running, initProc.Process.Pid, initStart
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		r, err := s.Load("u")
		if err == nil && r.Migration != nil && r.Migration.State == stateInDoubt {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the finished start was not recorded in doubt: %+v (%v)", r, err)
		}
	}
}
