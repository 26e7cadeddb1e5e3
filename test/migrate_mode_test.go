package test

import (
	"net"
	"strings"
	"testing"
)

// TestMigrateModeRefused: a mode that cannot run is refused with exit 23
// and its reason once the hosts have compared capabilities, before anything
// is frozen: the job counts on here with its memory and the destination
// holds nothing. pre-copy is not built; post-copy cannot carry established
// TCP connections (refused whatever the hosts' lazy pages), and the mode
// that refusal names then moves the job.
func TestMigrateModeRefused(t *testing.T) {
	requireCriu(t)
	w := buildWorkload(t)
	h := newHosts(t)
	src, dst := newEnv(t), newEnv(t)
	token := writeToken(t, "correct horse battery staple 42")
	listen := net.JoinHostPort(h.addrB, "7070")
	dst.serve(h.b, listen, token)

	if r := src.ferryIn(h.a, "run", "--name", "mr", "--", w, "memory", "16"); r.code != 0 {
		t.Fatalf("run: %s", r)
	}
	src.waitLines("mr", "verify ", 1)
	sum := src.lines("mr", "sum ")[0]

	var hint string // what the last refusal said
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--mode", "pre-copy"}, "pre-copy is not built"},
		{[]string{"--mode", "post-copy", "--tcp-established"}, "post-copy cannot carry established TCP connections"},
	} {
		before, _ := src.verifyLines("mr")
		r := src.ferryIn(h.a, append([]string{"migrate", "mr", "--to", listen, "--token-file", token}, tc.args...)...)
		if r.code != 23 || !strings.Contains(r.stderr, tc.want) || strings.Count(strings.TrimSpace(r.stderr), "\n") != 0 {
			t.Fatalf("migrate %v: %s\nwant exit 23 and one line saying %q", tc.args, r, tc.want)
		}
		t.Log(strings.TrimSpace(r.stderr))
		hint = r.stderr
		if v := src.job("mr"); v.State != "running" {
			t.Fatalf("migrate %v: source job is %s afterwards", tc.args, v.State)
		}
		src.assertContinues("mr", sum, before[len(before)-1])
		if jobs := dst.list(); len(jobs) != 0 {
			t.Fatalf("migrate %v: the destination holds %v", tc.args, jobs)
		}
	}
	// A mode that does not exist is a usage error, and names those that do.
	if r := src.ferryIn(h.a, "migrate", "mr", "--to", listen, "--token-file", token, "--mode", "precopy"); r.code != 2 || !strings.Contains(r.stderr, "auto, stop-copy or post-copy") {
		t.Fatalf("migrate --mode precopy: %s", r)
	}
	// What the refusal of post-copy with --tcp-established says to do
	// works: the same migration with the mode it names moves the job,
	// its memory whole.
	_, mode, ok := strings.Cut(strings.TrimSpace(hint), "use --mode ")
	if !ok || strings.ContainsAny(mode, " ;,") {
		t.Fatalf("the refusal names no single mode to use: %s", hint)
	}
	before, _ := src.verifyLines("mr")
	if r := src.ferryIn(h.a, "migrate", "mr", "--to", listen, "--token-file", token, "--tcp-established", "--mode", mode); r.code != 0 {
		t.Fatalf("migrate --tcp-established --mode %s, as the refusal said: %s", mode, r)
	}
	if v := dst.job("mr"); v.State != "running" {
		t.Fatalf("after the migration the destination's job is %s", v.State)
	}
	dst.assertContinues("mr", sum, before[len(before)-1])
}

// TestMigrateNoLazyPagesHint: a destination whose CRIU lacks lazy pages
// (here a CRIU that says so to `criu check`) refuses post-copy before
// anything is stopped, in one line that names the mode to use instead;
// that mode moves the job, its memory whole.
func TestMigrateNoLazyPagesHint(t *testing.T) {
	requireCriu(t)
	w := buildWorkload(t)
	h := newHosts(t)
	src, dst := newEnv(t), newEnv(t)
	token := writeToken(t, "correct horse battery staple 42")
	listen := net.JoinHostPort(h.addrB, "7076")
	noUffd := dst.criuWrapper(`if [ "$1" = check ]; then case "$*" in *uffd*) echo "uffd is not supported" >&2; exit 1;; esac; fi`)
	dst.serveProc(h.b, listen, token, "export FERRY_CRIU="+noUffd+";")
	if r := src.ferryIn(h.a, "run", "--name", "nl", "--", w, "memory", "16"); r.code != 0 {
		t.Fatalf("run: %s", r)
	}
	src.waitLines("nl", "verify ", 1)
	sum := src.lines("nl", "sum ")[0]
	before, _ := src.verifyLines("nl")
	r := src.ferryIn(h.a, "migrate", "nl", "--to", listen, "--token-file", token, "--mode", "post-copy")
	if r.code != 23 || !strings.Contains(r.stderr, "post-copy needs lazy pages") || strings.Count(strings.TrimSpace(r.stderr), "\n") != 0 {
		t.Fatalf("post-copy to a destination without lazy pages: %s\nwant exit 23 and one line", r)
	}
	src.assertContinues("nl", sum, before[len(before)-1])
	_, mode, ok := strings.Cut(strings.TrimSpace(r.stderr), "use --mode ")
	if !ok || strings.ContainsAny(mode, " ;,") {
		t.Fatalf("the refusal names no single mode to use: %s", r.stderr)
	}
	before, _ = src.verifyLines("nl")
	if r := src.ferryIn(h.a, "migrate", "nl", "--to", listen, "--token-file", token, "--mode", mode); r.code != 0 {
		t.Fatalf("migrate --mode %s, as the refusal said: %s", mode, r)
	}
	dst.assertContinues("nl", sum, before[len(before)-1])
}
