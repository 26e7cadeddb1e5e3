package test

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// A destination's CRIU may be stuck in its restore (above all a post-copy
// one, on its lazy-pages daemon), its tree made and waiting, when the
// harm comes: its serve is killed, or the link goes dead. Such a start
// held the job's name, a cgroup, a frozen tree, a lazy-pages daemon and
// the migration's connection for the restore's whole timeout, 5 min (the
// chaos test's seeds 5263125 and 2581047). It must end within a bounded
// time, leave nothing running, and the job must run on at the source with
// its memory intact, and migrate again.
//
// The restore is caught there by the destination's CRIU: the real one,
// given an action script (CRIU's --action-script) that holds it at
// post-restore, once every task is made with its lazy memory handed to
// the daemon, before CRIU lets the tree go.

// stuckRestore makes a CRIU for dst whose first restore stops at
// post-restore for two minutes, and returns it with the file it touches
// then.
func stuckRestore(t *testing.T, dst *env) (criu, mark string) {
	t.Helper()
	dir := t.TempDir()
	mark, script := filepath.Join(dir, "post-restore"), filepath.Join(dir, "hold.sh")
	if err := os.WriteFile(script, fmt.Appendf(nil, "#!/bin/sh\n[ \"$CRTOOLS_SCRIPT_ACTION\" = post-restore ] && [ ! -e %[1]s ] || exit 0\ntouch %[1]s\nexec sleep 120\n", mark), 0o755); err != nil {
		t.Fatal(err)
	}
	return dst.criuWrapper(fmt.Sprintf(`[ "$1" = restore ] && set -- "$@" --action-script %s`, script)), mark
}

// stuckServe starts ferry serve for dst in h.b on listen with the CRIU
// of stuckRestore (first: more of serveProc's shell line), and returns it
// with the file that CRIU touches once a restore is stuck. (serveProc
// has the lazy-pages daemons its serve left killed at the end.)
func stuckServe(t *testing.T, dst *env, h *hosts, listen, token, first string) (*exec.Cmd, *server, string) {
	t.Helper()
	criu, mark := stuckRestore(t, dst)
	serve, srv := dst.serveProc(h.b, listen, token, "export FERRY_CRIU="+criu+"; "+first)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("serve log:\n%s", srv.text())
		}
	})
	return serve, srv, mark
}

// countingJob runs the workload's memory job name (64 MiB) on src, in
// h.a, and returns the sum of its memory and its last count so far.
func countingJob(t *testing.T, src *env, h *hosts, w, name string) (sum string, last int) {
	t.Helper()
	if r := src.ferryIn(h.a, "run", "--name", name, "--", w, "memory", "64"); r.code != 0 {
		t.Fatalf("run: %s", r)
	}
	src.waitLines(name, "verify ", 1)
	before, _ := src.verifyLines(name)
	return src.lines(name, "sum ")[0], before[len(before)-1]
}

// migrationHosts makes two hosts, a workload and a token for a migration
// in mode (post-copy needs userfaultfd: the test is skipped without).
func migrationHosts(t *testing.T, mode string) (w string, h *hosts, src, dst *env, token string) {
	t.Helper()
	if mode == "post-copy" {
		return postCopyHosts(t)
	}
	requireCriu(t)
	return buildWorkload(t), newHosts(t), newEnv(t), newEnv(t), writeToken(t, "correct horse battery staple 42")
}

// TestRestoreStuckServeKilled kills the destination's serve while its
// CRIU is stuck in the restore of a post-copy migration, then of a
// stop-copy one. The shim that runs that restore gives it up at once,
// since the copy can never be the job (only the dead serve could have
// told the source it exists): the tree goes, then (post-copy) the daemon.
// The source gives its job back; a new serve clears the record and takes
// the job.
func TestRestoreStuckServeKilled(t *testing.T) {
	for _, c := range []struct{ mode, port string }{{"post-copy", "7160"}, {"stop-copy", "7162"}} {
		t.Run(c.mode, func(t *testing.T) { restoreStuckServeKilled(t, c.mode, c.port) })
	}
}

func restoreStuckServeKilled(t *testing.T, mode, port string) {
	lazy := mode == "post-copy"
	w, h, src, dst, token := migrationHosts(t, mode)
	listen := net.JoinHostPort(h.addrB, port)
	serve, _, mark := stuckServe(t, dst, h, listen, token, "")
	servePid := serve.Process.Pid
	sum, last := countingJob(t, src, h, w, "lj")
	mig, out := src.startFerryIn(h.a, "migrate", "lj", "--to", listen, "--token-file", token, "--mode", mode)
	eventually(t, 60*time.Second, "the destination's restore to reach post-restore", func() bool {
		_, err := os.Stat(mark)
		return err == nil
	})
	v := dst.job("lj")
	if v.State != "starting" || lazy && len(lazyDaemonsOf(servePid)) == 0 {
		t.Fatalf("the destination's restore is not stuck (with a daemon, in post-copy): lj is %s, daemons %v; the case under test did not arise", v.State, lazyDaemonsOf(servePid))
	}
	cg := v.Cgroup
	kill9(t, serve)
	t0 := time.Now()
	eventually(t, 20*time.Second, "the dead serve's start to be given up", func() bool {
		v, ok := dst.list()["lj"]
		return !ok || v.State != "starting"
	})
	t.Logf("the start was given up %s after the serve's death", time.Since(t0).Round(time.Millisecond))
	if v, ok := dst.list()["lj"]; ok && v.State != "stale" {
		t.Fatalf("the given-up start reads %s, want stale", v.State)
	}
	eventually(t, 10*time.Second, "the dead serve's lazy-pages daemon to end", func() bool { return len(lazyDaemonsOf(servePid)) == 0 })
	if b, err := os.ReadFile(filepath.Join(cg, "cgroup.procs")); err == nil && len(strings.TrimSpace(string(b))) > 0 {
		t.Fatalf("the given-up start left processes in its cgroup: %s", b)
	}
	code := waitExit(t, mig)
	t.Logf("migrate to a destination killed mid-restore: exit %d\n%s", code, out)
	if code == 0 {
		t.Fatal("migrate to a destination killed mid-restore succeeded")
	}
	src.assertContinues("lj", sum, last+1)

	// A new serve (with a CRIU that restores) clears the record, and the
	// job moves.
	_, log := dst.serveProc(h.b, listen, token, "")
	if !strings.Contains(log.text(), "lj: its restore was abandoned") {
		t.Errorf("the new serve did not clear the given-up start:\n%s", log.text())
	}
	if r := src.ferryIn(h.a, "migrate", "lj", "--to", listen, "--token-file", token, "--mode", mode); r.code != 0 {
		t.Fatalf("migrating again: %s", r)
	}
	dst.assertContinues("lj", sum, last+1)
}

// TestRestoreStuckLinkDead takes the link down while the destination's
// CRIU is stuck in the restore of a post-copy migration, then of a
// stop-copy one. The source hears nothing and gives its job back; the
// destination, hearing nothing either, gives up its restore once the
// source must have given up, not at the restore's timeout: the tree, the
// daemon (post-copy) and the connection go. Once the link is back the job
// moves.
func TestRestoreStuckLinkDead(t *testing.T) {
	for _, c := range []struct{ mode, port string }{{"post-copy", "7161"}, {"stop-copy", "7163"}} {
		t.Run(c.mode, func(t *testing.T) { restoreStuckLinkDead(t, c.mode, c.port) })
	}
}

func restoreStuckLinkDead(t *testing.T, mode, port string) {
	w, h, src, dst, token := migrationHosts(t, mode)
	listen := net.JoinHostPort(h.addrB, port)
	const silence = "FERRY_PEER_SILENCE=3s"
	serve, srv, mark := stuckServe(t, dst, h, listen, token, "export "+silence+"; set -- --debug \"$@\";")
	servePid := serve.Process.Pid
	sum, last := countingJob(t, src, h, w, "lk")
	mig, out := src.startFerryEnvIn(h.a, []string{silence}, "migrate", "lk", "--to", listen, "--token-file", token, "--mode", mode)
	eventually(t, 60*time.Second, "the destination's restore to reach post-restore", func() bool {
		_, err := os.Stat(mark)
		return err == nil
	})
	v := dst.job("lk")
	if v.State != "starting" {
		t.Fatalf("the destination's restore is not stuck: lk is %s; the case under test did not arise", v.State)
	}
	cg := v.Cgroup
	link := func(state string) {
		if rr := exec1(t, "ip", "-n", h.a, "link", "set", h.vethA, state); rr != 0 {
			t.Fatalf("ip link set %s %s: exit %d", h.vethA, state, rr)
		}
	}
	link("down")
	up := false
	defer func() {
		if !up {
			link("up")
		}
	}()
	t0 := time.Now()
	code := waitExit(t, mig)
	t.Logf("migrate over a link that died mid-restore: exit %d after %s\n%s", code, time.Since(t0).Round(time.Millisecond), out)
	if code == 0 {
		t.Fatal("migrate over a link that died mid-restore succeeded")
	}
	src.assertContinues("lk", sum, last+1)
	// 3 s of silence for each side, and a beat's period (5 s) to notice:
	// well within 30 s, where the restore's own timeout is 5 min.
	eventually(t, 30*time.Second, "the destination to give up its restore", func() bool {
		_, ok := dst.list()["lk"]
		return !ok && !serveBusy(t, h.b, listen)
	})
	t.Logf("the destination gave up %s after the link died", time.Since(t0).Round(time.Millisecond))
	eventually(t, 10*time.Second, "the lazy-pages daemon to end", func() bool { return len(lazyDaemonsOf(servePid)) == 0 })
	if _, err := os.Stat(cg); !os.IsNotExist(err) {
		t.Errorf("the given-up restore left its cgroup %s (%v)", cg, err)
	}
	if !strings.Contains(srv.text(), "went silent") {
		t.Errorf("the serve's log does not say why it gave up:\n%s", srv.text())
	}
	link("up")
	up = true
	if r := src.ferryIn(h.a, "migrate", "lk", "--to", listen, "--token-file", token, "--mode", mode); r.code != 0 {
		t.Fatalf("migrating again: %s", r)
	}
	dst.assertContinues("lk", sum, last+1)
}
