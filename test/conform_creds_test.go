package test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// hostHasCapSysResource reads CAP_SYS_RESOURCE (bit 24) from this test's
// own effective capabilities, which ferry run from it shares.
func hostHasCapSysResource(t *testing.T) bool {
	t.Helper()
	return capSysResourceIn(t, "CapEff")
}

// capSysResourceIn reads CAP_SYS_RESOURCE from one of this test's
// capability sets (CapEff, CapBnd...).
func capSysResourceIn(t *testing.T, set string) bool {
	t.Helper()
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, set+":"); ok {
			set, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			if err != nil {
				t.Fatal(err)
			}
			return set&(1<<24) != 0
		}
	}
	t.Fatalf("no %s in /proc/self/status", set)
	return false
}

// TestOtherUserTask: a job whose child runs as nobody. ferry doctor says
// whether this host has CAP_SYS_RESOURCE (and, where even the bounding
// set lacks it, that nothing started here can have it); without it the plan refuses the
// tree up front (16, naming the capability) and the job runs on; with it
// the job checkpoints and restores, still counting as nobody.
func TestOtherUserTask(t *testing.T) {
	e := newEnv(t)
	requireCriu(t)
	w := buildWorkload(t)
	has := hostHasCapSysResource(t)
	var doc struct {
		Ready          bool `json:"ready"`
		CapSysResource bool `json:"capSysResource"`
	}
	if err := json.Unmarshal([]byte(e.must("doctor", "--json")), &doc); err != nil {
		t.Fatal(err)
	}
	if doc.CapSysResource != has {
		t.Errorf("doctor says capSysResource=%v; this host's CapEff says %v", doc.CapSysResource, has)
	}
	table := e.must("doctor")
	if !strings.Contains(table, "CAP_SYS_RESOURCE") {
		t.Errorf("doctor's table does not mention CAP_SYS_RESOURCE:\n%s", table)
	}
	// Where the bounding set lacks it too (this test VM), nothing started
	// here can have it, and doctor says so rather than leave the plan's
	// "give ferry CAP_SYS_RESOURCE" looking like an option.
	if bounded := !has && !capSysResourceIn(t, "CapBnd"); bounded != strings.Contains(table, "bounding set lacks it") {
		t.Errorf("the bounding set lacks CAP_SYS_RESOURCE: %v; doctor says:\n%s", bounded, table)
	}

	e.must("run", "--name", "nobody", "--", w, "nobody")
	e.waitLines("nobody", "nobody ", 3)
	if f := e.lastInts("nobody", "nobody "); f[1] != 65534 {
		t.Fatalf("child runs as uid %d, want 65534", f[1])
	}
	ckpt := filepath.Join(t.TempDir(), "nobody.ferry")
	if !has {
		d := e.ferry("checkpoint", "--dry-run", "nobody")
		if !strings.Contains(d.stdout, "checkpointable: no") || !strings.Contains(d.stdout, "CAP_SYS_RESOURCE") {
			t.Errorf("dry run without CAP_SYS_RESOURCE: %s", d)
		}
		r := e.ferry("checkpoint", "-o", ckpt, "nobody")
		if r.code != 16 || !strings.Contains(r.stderr, "CAP_SYS_RESOURCE") || strings.Count(strings.TrimSpace(r.stderr), "\n") != 0 {
			t.Fatalf("checkpoint of another user's task without CAP_SYS_RESOURCE: want one line and exit 16, got %s", r)
		}
		if _, err := os.Stat(ckpt); err == nil {
			t.Errorf("refused checkpoint left %s", ckpt)
		}
		n := len(e.lines("nobody", "nobody "))
		e.waitLines("nobody", "nobody ", n+5)
		return
	}
	at := e.checkpointRestore("nobody", "nobody ")
	e.waitLines("nobody", "nobody ", at+5)
	if f := e.lastInts("nobody", "nobody "); f[1] != 65534 || f[0] <= at {
		t.Fatalf("restored child: count %d uid %d; want past %d as 65534", f[0], f[1], at)
	}
}
