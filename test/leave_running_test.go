package test

import (
	"path/filepath"
	"strings"
	"testing"
)

// TestLeaveRunningStreamed: a --leave-running checkpoint to a .ferry file
// is streamed (CRIU's images compressed as they come, nothing spooled to
// tmpfs) and still holds the tree exactly as it stopped. CRIU hands the
// tree's own pages to its pipes without copying them, so the tree must
// not run before ferry has read them all: a job that rewrites every page
// of its memory without end, checking each against the generation it must
// hold, runs on unharmed, and each restored copy finds every page as the
// checkpoint left it and goes on.
func TestLeaveRunningStreamed(t *testing.T) {
	e := newEnv(t)
	requireCriu(t)
	w := buildWorkload(t)
	e.must("run", "--name", "gens", "--", w, "gens", "64")
	e.waitLines("gens", "gen ", 1)
	dir := t.TempDir()
	for i := range 3 {
		file := filepath.Join(dir, "gens"+string(rune('a'+i))+".ferry")
		out := e.ferry("--debug", "checkpoint", "--leave-running", "-o", file, "gens")
		if out.code != 0 {
			t.Fatalf("checkpoint: %s", out)
		}
		if !strings.Contains(out.stderr, "sink=streamed") {
			t.Fatalf("the checkpoint was not streamed by CRIU:\n%s", out.stderr)
		}
		name := "copy" + string(rune('a'+i))
		e.must("restore", "--name", name, file)
		// A few whole passes over the memory, every page checked.
		e.waitLines(name, "gen ", 3)
		if bad := e.lines(name, "corrupt "); len(bad) > 0 {
			t.Fatalf("restored copy %d found a page changed after its checkpoint: %v", i, bad)
		}
		e.must("kill", name)
	}
	before := len(e.lines("gens", "gen "))
	e.waitLines("gens", "gen ", before+2)
	if bad := e.lines("gens", "corrupt "); len(bad) > 0 || e.job("gens").State != "running" {
		t.Fatalf("the original after its checkpoints: %s %v", e.job("gens").State, bad)
	}
	assertNoStrays(t, e)
}
