package test

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

func requireCriu(t *testing.T) {
	t.Helper()
	if r := exec1(t, ferryBin, "doctor"); r != 0 {
		t.Skip("ferry doctor says this host cannot checkpoint (run make deps)")
	}
}

// counter keeps its count only in the shell's memory.
const counter = `i=0; while :; do i=$((i+1)); echo "$i"; sleep 0.02; done`

// numbers parses a log of one integer per line.
func numbers(t *testing.T, log string) []int {
	t.Helper()
	var out []int
	for _, l := range strings.Split(strings.TrimSpace(log), "\n") {
		n, err := strconv.Atoi(strings.TrimSpace(l))
		if err != nil {
			t.Fatalf("log line %q is not a number", l)
		}
		out = append(out, n)
	}
	return out
}

// assertConsecutive checks that nums counts up by one from its first value.
func assertConsecutive(t *testing.T, nums []int) {
	t.Helper()
	for i := 1; i < len(nums); i++ {
		if nums[i] != nums[i-1]+1 {
			t.Fatalf("count jumps from %d to %d at line %d: state lost or repeated", nums[i-1], nums[i], i+1)
		}
	}
}

func TestCheckpointRestoreCounter(t *testing.T) {
	e := newEnv(t)
	requireCriu(t)
	e.must("run", "--name", "c1", "--", "sh", "-c", counter)
	eventually(t, 10*time.Second, "count to reach 20", func() bool { return e.logLines("c1") >= 20 })
	orig := e.job("c1")
	eventually(t, 5*time.Second, "main pid", func() bool { orig = e.job("c1"); return orig.MainPID > 0 })
	origMainNS := nspid(t, orig.MainPID)

	ckpt := filepath.Join(t.TempDir(), "c1.ckpt")
	e.must("checkpoint", "-o", ckpt, "c1")
	v := e.job("c1")
	if v.State != "exited" || v.Exit == nil || v.Exit.Reason != "checkpointed" {
		t.Fatalf("job after checkpoint: state %q exit %+v", v.State, v.Exit)
	}
	atCheckpoint := numbers(t, e.must("logs", "c1"))
	last := atCheckpoint[len(atCheckpoint)-1]
	time.Sleep(200 * time.Millisecond)
	if n := numbers(t, e.must("logs", "c1")); n[len(n)-1] != last {
		t.Fatalf("job still counting after checkpoint: %d -> %d", last, n[len(n)-1])
	}
	if st, err := os.Stat(ckpt); err != nil || st.Mode().Perm() != 0o700 {
		t.Fatalf("checkpoint %s: %v, mode %v; want a 0700 directory", ckpt, err, st.Mode())
	}

	if out := e.must("restore", ckpt); strings.TrimSpace(out) != "c1" {
		t.Fatalf("restore printed %q, want c1", out)
	}
	r := e.job("c1")
	if r.State != "running" || r.InitPID == orig.InitPID {
		t.Fatalf("restored job: %+v", r)
	}
	eventually(t, 10*time.Second, "count to continue", func() bool { return e.logLines("c1") >= len(atCheckpoint)+20 })
	nums := numbers(t, e.must("logs", "c1"))
	assertConsecutive(t, nums)
	if nums[0] != 1 {
		t.Fatalf("log starts at %d", nums[0])
	}
	// Same pids inside the namespace as before.
	eventually(t, 5*time.Second, "main pid", func() bool { r = e.job("c1"); return r.MainPID > 0 })
	if got := nspid(t, r.MainPID); got[len(got)-1] != origMainNS[len(origMainNS)-1] || got[0] == got[len(got)-1] {
		t.Errorf("restored main NSpid = %v, want %d inside a namespace of its own", got, origMainNS[len(origMainNS)-1])
	}
	if got := nspid(t, r.InitPID); got[len(got)-1] != 1 {
		t.Errorf("restored init NSpid = %v, want 1 inside", got)
	}

	// A clone: the same checkpoint again, side by side, continues from the
	// same count.
	e.must("restore", "--name", "c2", ckpt)
	eventually(t, 10*time.Second, "clone to count", func() bool { return e.logLines("c2") >= 10 })
	clone := numbers(t, e.must("logs", "c2"))
	if clone[0] != last+1 {
		t.Fatalf("clone starts at %d, want %d", clone[0], last+1)
	}
	assertConsecutive(t, clone)

	// Checkpoint, restore, checkpoint, restore.
	ckpt2 := filepath.Join(t.TempDir(), "c1-again.ckpt")
	e.must("checkpoint", "-o", ckpt2, "c1")
	e.must("restore", ckpt2)
	before := e.logLines("c1")
	eventually(t, 10*time.Second, "second restore to count", func() bool { return e.logLines("c1") >= before+10 })
	assertConsecutive(t, numbers(t, e.must("logs", "c1")))
}
