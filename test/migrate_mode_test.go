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
// TCP connections (refused whatever the hosts' lazy pages).
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
}
