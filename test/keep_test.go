package test

import (
	"encoding/json"
	"errors"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// --keep N holds after every snapshot, final ones included.

// awaitSnapshots waits until at least n distinct snapshots of job name
// have been seen in store dir (older ones may be pruned meanwhile).
func (e *env) awaitSnapshots(dir, name string, n int) {
	e.t.Helper()
	seen := map[string]bool{}
	eventually(e.t, 90*time.Second, "periodic snapshots", func() bool {
		var list []snapshotInfo
		if r := e.ferry("snapshots", "--store", dir, "--json", name); r.code == 0 {
			_ = jsonUnmarshal(r.stdout, &list)
		}
		for _, sn := range list {
			seen[sn.ID] = true
		}
		time.Sleep(100 * time.Millisecond)
		return len(seen) >= n
	})
}

// TestKeepAfterFinalSnapshot: a job run with --checkpoint-every 1s --keep
// 2 --checkpoint-on-term takes several snapshots; SIGTERM to the
// foreground ferry takes the final one and ends the job (exit 26). The
// store then holds exactly 2 snapshots of the job, and the newest, the
// final one, restores with the count continued.
func TestKeepAfterFinalSnapshot(t *testing.T) {
	e := newEnv(t)
	requireCriu(t)
	st := filepath.Join(t.TempDir(), "store")
	cmd, out := e.spawnFerry(spawn{}, "run", "--name", "kp", "--store", st,
		"--checkpoint-every", "1s", "--keep", "2", "--checkpoint-on-term", "--", "sh", "-c", counter)
	eventually(t, 20*time.Second, "ferry run to start the job", func() bool {
		_, ok := e.list()["kp"]
		return ok
	})
	e.awaitSnapshots(st, "kp", 3)
	if err := cmd.Process.Signal(unix.SIGTERM); err != nil {
		t.Fatal(err)
	}
	var ee *exec.ExitError
	if err := cmd.Wait(); !errors.As(err, &ee) || ee.ExitCode() != 26 {
		t.Fatalf("ferry run --checkpoint-on-term after SIGTERM: %v (want exit 26)\n%s", err, out)
	}
	if v := e.job("kp"); v.State != "exited" {
		t.Fatalf("job after its final snapshot: %s", v.State)
	}
	atEnd := numbers(t, e.must("logs", "kp"))
	// A periodic snapshot in flight when the job ended finishes (or
	// fails) on its own: give it time to, then count.
	time.Sleep(3 * time.Second)
	if got := e.snapshots(st, "kp"); len(got) != 2 {
		t.Fatalf("%d snapshots of kp after the final one, want 2 (--keep 2): %+v", len(got), got)
	}
	e.must("restore", "--store", st, "kp")
	last := atEnd[len(atEnd)-1]
	eventually(t, 20*time.Second, "the restored count to go on", func() bool { return e.logLines("kp") >= len(atEnd)+10 })
	// The log goes on from where the final snapshot ended it: no number
	// repeated (an older snapshot) or skipped.
	all := numbers(t, e.must("logs", "kp"))
	assertConsecutive(t, all)
	if all[len(atEnd)] != last+1 {
		t.Fatalf("restored count starts at %d, the job ended at %d", all[len(atEnd)], last)
	}
	e.must("kill", "kp")
}

// TestKeepAfterKill: `ferry kill` of a job taking periodic snapshots with
// --keep 2 leaves 2, whatever snapshot was in flight.
func TestKeepAfterKill(t *testing.T) {
	e := newEnv(t)
	requireCriu(t)
	st := filepath.Join(t.TempDir(), "store")
	e.must("run", "--name", "kk", "--store", st, "--checkpoint-every", "1s", "--keep", "2", "--", "sh", "-c", counter)
	e.awaitSnapshots(st, "kk", 3)
	e.must("kill", "kk")
	time.Sleep(3 * time.Second)
	if got := e.snapshots(st, "kk"); len(got) != 2 {
		t.Fatalf("%d snapshots of kk after ferry kill, want 2 (--keep 2): %+v", len(got), got)
	}
}

func jsonUnmarshal(s string, v any) error { return json.Unmarshal([]byte(s), v) }
