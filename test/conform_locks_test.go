package test

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// childOf returns the one child of pid, waiting for it to appear.
func childOf(t *testing.T, pid int) int {
	t.Helper()
	var kid int
	eventually(t, 10*time.Second, "a child", func() bool {
		data, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid))
		f := strings.Fields(string(data))
		if len(f) == 0 {
			return false
		}
		kid, _ = strconv.Atoi(f[0])
		return true
	})
	return kid
}

// TestInheritedFlockRefused: a tree whose flock lock was taken by its
// parent outside it (`flock FILE sh -c ...`; /proc/locks names the
// parent) is refused by the plan (16, naming --file-locks) before anything
// is frozen, and with --file-locks it checkpoints and restores, the
// restored tree holding the lock again.
func TestInheritedFlockRefused(t *testing.T) {
	e := newEnv(t)
	requireCriu(t)
	lock := filepath.Join(t.TempDir(), "lock")
	pid, read := foreignTreeRun(t, nil, "flock", lock, "sh", "-c", counter)
	tree := strconv.Itoa(childOf(t, pid))
	eventually(t, 10*time.Second, "counter", func() bool { return len(read()) >= 5 })

	var d struct {
		Inventory struct {
			Locks int `json:"fileLocks"`
		} `json:"inventory"`
	}
	if err := json.Unmarshal([]byte(e.must("checkpoint", "--pid", tree, "--dry-run", "--json")), &d); err != nil {
		t.Fatal(err)
	}
	if d.Inventory.Locks != 1 {
		t.Errorf("walk counted %d file locks, want the 1 inherited flock", d.Inventory.Locks)
	}
	ckpt := filepath.Join(t.TempDir(), "locked.ferry")
	r := e.ferry("checkpoint", "--pid", tree, "-o", ckpt)
	if r.code != 16 || !strings.Contains(r.stderr, "--file-locks") {
		t.Fatalf("checkpoint of a tree holding an inherited flock: want exit 16 naming --file-locks, got %s", r)
	}
	if _, err := os.Stat(ckpt); err == nil {
		t.Errorf("refused checkpoint left %s", ckpt)
	}
	n := len(read())
	eventually(t, 10*time.Second, "the refused tree to go on counting", func() bool { return len(read()) > n+3 })

	// The hint works: the lock travels with the tree.
	e.must("checkpoint", "--pid", tree, "--file-locks", "-o", ckpt)
	last := read()
	// flock, which holds the lock too, exits once its child (the tree)
	// has ended: then the lock is free for the restore.
	eventually(t, 10*time.Second, "flock to exit", func() bool {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		return err != nil || strings.Contains(string(b), ") Z ")
	})
	name := strings.TrimSpace(e.must("restore", "--name", "locked", ckpt))
	eventually(t, 10*time.Second, "restored counter", func() bool { return e.logLines(name) >= 5 })
	got := numbers(t, e.must("logs", name))
	assertConsecutive(t, got)
	if got[0] < last[len(last)-1] || got[0] > last[len(last)-1]+1 {
		t.Errorf("restored count starts at %d; the tree was at %d", got[0], last[len(last)-1])
	}
	if code := exec1(t, "flock", "-n", lock, "true"); code == 0 {
		t.Errorf("the restored tree does not hold its flock lock")
	}
}
