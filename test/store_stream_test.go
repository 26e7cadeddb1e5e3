package test

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// TestStoreSnapshotStreamsWhenTmpfsIsFull: a snapshot of a job whose
// images tmpfs has no room for is streamed by CRIU straight into the
// store (nothing spooled to disk), and restores with its memory intact.
// The tmpfs here is one the test mounts, 4 MiB, named to ferry by
// FERRY_SCRATCH_TMPFS (and TMPDIR).
func TestStoreSnapshotStreamsWhenTmpfsIsFull(t *testing.T) {
	requireCriu(t)
	w := buildWorkload(t)
	e := newEnv(t)
	small := t.TempDir()
	if err := syscall.Mount("tmpfs", small, "tmpfs", 0, "size=4m"); err != nil {
		t.Skipf("mounting a tmpfs: %v", err)
	}
	t.Cleanup(func() { _ = syscall.Unmount(small, syscall.MNT_DETACH) })
	// The temporary directory, where the images would be spooled, is the
	// same 4 MiB: a spool fails there.
	env := []string{"FERRY_SCRATCH_TMPFS=" + small, "TMPDIR=" + small}

	e.must("run", "--name", "big", "--", w, "memory", "48")
	e.waitLines("big", "verify ", 1)
	sum := e.lines("big", "sum ")[0]
	st := filepath.Join(t.TempDir(), "store")
	r := e.ferryEnv(env, "checkpoint", "--store", st, "--leave-running", "--json", "big")
	if r.code != 0 {
		t.Fatalf("checkpoint --store with a full tmpfs: %s", r)
	}
	if !strings.Contains(r.stdout, `"snapshot"`) {
		t.Fatalf("no snapshot reported: %s", r.stdout)
	}
	if left, _ := os.ReadDir(small); len(left) != 0 {
		t.Errorf("%s holds %d entries after the snapshot", small, len(left))
	}
	before, _ := e.verifyLines("big")
	e.assertContinues("big", sum, before[len(before)-1]) // the job ran on
	e.must("kill", "big")
	e.must("restore", "--store", st, "--name", "big2", "big")
	e.assertContinues("big2", sum, 0)
}
