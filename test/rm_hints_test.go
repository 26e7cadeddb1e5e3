package test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestRmHints follows what ferry rm says when it refuses: a running job
// ("ferry kill NAME first") and a job still starting ("wait, or ferry kill
// NAME"). Each refusal is one line, leaves the job as it was (the running
// one goes on counting), and doing what it says lets rm forget the job.
func TestRmHints(t *testing.T) {
	requireCriu(t)
	e := newEnv(t)
	w := buildWorkload(t)
	if r := e.ferry("run", "--name", "rh", "--", w, "demo", "8"); r.code != 0 {
		t.Fatalf("run: %s", r)
	}
	e.waitLines("rh", "count ", 2)
	r := e.ferry("rm", "rh")
	if r.code == 0 {
		t.Fatalf("rm of a running job succeeded: %s", r)
	}
	oneLine(t, "rm of a running job", r, "ferry kill rh first")
	n := len(e.counts("rh"))
	e.waitLines("rh", "count ", n+1) // it runs on
	e.must("kill", "rh")
	e.must("rm", "rh")
	if _, ok := e.list()["rh"]; ok {
		t.Fatalf("rh is still listed after kill and rm")
	}

	// A job still starting: a restore whose CRIU takes its time.
	if r := e.ferry("run", "--name", "rs", "--", w, "demo", "8"); r.code != 0 {
		t.Fatalf("run: %s", r)
	}
	e.waitLines("rs", "count ", 2)
	img := filepath.Join(t.TempDir(), "rs.ferry")
	e.must("checkpoint", "rs", "-o", img)
	e.must("rm", "rs")
	mark := filepath.Join(t.TempDir(), "criu-restoring")
	slow := e.criuWrapper(`if [ "$1" = restore ]; then touch ` + mark + `; sleep 30; fi`)
	restore, out := e.spawnFerry(spawn{env: []string{"FERRY_CRIU=" + slow}}, "restore", img)
	eventually(t, 60*time.Second, "the restore's CRIU to start", func() bool {
		_, err := os.Stat(mark)
		return err == nil
	})
	r = e.ferry("rm", "rs")
	if r.code == 0 {
		t.Fatalf("rm of a starting job succeeded: %s", r)
	}
	oneLine(t, "rm of a starting job", r, "wait, or ferry kill rs")
	e.must("kill", "rs")
	if code := waitExit(t, restore); code == 0 {
		t.Fatalf("the restore whose job was killed while it started succeeded:\n%s", out)
	}
	if r := e.ferry("rm", "rs"); r.code != 0 && !strings.Contains(r.stderr, "no such job") {
		t.Fatalf("rm after kill: %s", r)
	}
	if v, ok := e.list()["rs"]; ok {
		t.Fatalf("rs is still listed after kill and rm: %s", v.State)
	}
}

// TestMPTCPHint: a Go program listens with MPTCP by default (Go >= 1.24),
// which CRIU cannot checkpoint. The failed checkpoint says, in one line,
// to run the job with GODEBUG=multipathtcp=0, and the job runs on; run so,
// it checkpoints and restores, and its listener answers after the restore.
func TestMPTCPHint(t *testing.T) {
	requireCriu(t)
	if b, err := os.ReadFile("/proc/sys/net/mptcp/enabled"); err != nil || strings.TrimSpace(string(b)) != "1" {
		t.Skip("this kernel has no MPTCP: Go listens with plain TCP")
	}
	e := newEnv(t)
	w := buildWorkload(t)
	port := freePort(t, "tcp4")
	if r := e.ferry("run", "--name", "mp", "--", w, "gotcp", port); r.code != 0 {
		t.Fatalf("run: %s", r)
	}
	e.waitLines("mp", "count ", 2)
	r := e.ferry("checkpoint", "mp", "-o", filepath.Join(t.TempDir(), "mp.ferry"))
	if r.code == 0 {
		t.Fatalf("checkpoint of an MPTCP listener succeeded: %s", r)
	}
	oneLine(t, "checkpoint of an MPTCP listener", r, "GODEBUG=multipathtcp=0")
	n := len(e.counts("mp"))
	e.waitLines("mp", "count ", n+2) // it runs on
	e.must("kill", "mp")
	e.must("rm", "mp")

	// As the hint says.
	if r := e.ferryEnv([]string{"GODEBUG=multipathtcp=0"}, "run", "--name", "mp", "--", w, "gotcp", port); r.code != 0 {
		t.Fatalf("run with GODEBUG=multipathtcp=0: %s", r)
	}
	e.waitLines("mp", "count ", 2)
	img := filepath.Join(t.TempDir(), "mp2.ferry")
	e.must("checkpoint", "mp", "-o", img)
	last := e.counts("mp")
	e.must("restore", img)
	e.assertCountsFrom("mp", len(last), last[len(last)-1]+1)
	if msg := dialSays("tcp", "127.0.0.1:"+port, "hello "); msg != "" {
		t.Fatal(msg)
	}
}
