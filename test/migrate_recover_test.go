package test

import (
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestServeRestartRecoversPostCopy kills the destination's serve with
// SIGKILL while a post-copy migration's copy runs there on memory still
// coming from the source (the page link stalls): the copy has lost the
// daemon that brought its pages. The source keeps its job frozen, in
// doubt. A new serve on the same state directory recovers by the record
// (the copy is dropped, and says so), and re-running ferry migrate on the
// source settles the migration with no operator: the source's copy,
// whole, runs on with its memory intact.
func TestServeRestartRecoversPostCopy(t *testing.T) {
	w, h, src, dst, token := postCopyHosts(t)
	listen := net.JoinHostPort(h.addrB, "7140")
	via := net.JoinHostPort(h.addrB, "7141")
	serve, _ := dst.serveProc(h.b, listen, token, "")
	if r := src.ferryIn(h.a, "run", "--name", "rj", "--", w, "memory", "64"); r.code != 0 {
		t.Fatalf("run: %s", r)
	}
	src.waitLines("rj", "verify ", 1)
	sum := src.lines("rj", "sum ")[0]
	stop := sync.OnceFunc(stallingProxy(t, h.b, via, listen, 4<<20))
	defer stop()
	before, _ := src.verifyLines("rj")
	mig, out := src.startFerryIn(h.a, "migrate", "rj", "--to", via, "--token-file", token, "--mode", "post-copy")
	eventually(t, 60*time.Second, "the destination's copy to run on pages still coming", func() bool {
		v, ok := dst.list()["rj"]
		return ok && v.Migration != nil && v.Migration.State == "lazy" && v.State == "running"
	})
	// The thaw's lease is committed a moment after the thaw: a serve
	// killed before that has the guard put the copy back as it was
	// (frozen), which is not the case under test.
	time.Sleep(time.Second)
	kill9(t, serve)
	stop()
	// The copy lost the serve that relayed its pages, not its memory: no
	// page it lacks may read as zeros meanwhile. (The daemon, seeing its
	// page socket close with serve, exited, and the kernel then filled
	// every missing page with zeros: the job's Go runtime died of "fatal
	// error: bad ts" on its zeroed timers.) The job logs its memory's sum
	// each second; it must log no other sum, and must not fail.
	time.Sleep(3 * time.Second)
	if l := dst.must("logs", "rj"); strings.Contains(l, "fatal error") || strings.Contains(l, "panic") {
		t.Fatalf("the destination's copy ran on memory that never came:\n%s", l)
	}
	for _, l := range dst.lines("rj", "verify ") {
		if _, got, _ := strings.Cut(l, " "); got != sum {
			t.Fatalf("the destination's copy ran on memory that never came: %q, want sum %s", l, sum)
		}
	}
	if v := dst.list()["rj"]; v.State == "exited" {
		t.Fatalf("the destination's copy ended by itself once its serve died: exit %+v\n%s", v.Exit, dst.must("logs", "rj"))
	}
	deadServe := serve.Process.Pid
	if code := waitExit(t, mig); code != 22 {
		t.Fatalf("migrate whose destination died mid-transfer: exit %d, want 22 (in doubt)\n%s", code, out)
	}
	if v := src.job("rj"); v.State != "frozen" || v.Migration == nil || v.Migration.Role != "source" {
		t.Fatalf("source after its destination died mid-transfer: %s, note %+v", v.State, v.Migration)
	}

	// A new serve finds the copy that ran on missing pages and drops it.
	_, log := dst.serveProc(h.b, listen, token, "")
	// (The copy may have died first, reading zeros where its pages
	// never came: then there is only its record to clear.)
	if !strings.Contains(log.text(), "rj: dropped") && !strings.Contains(log.text(), "rj: its copy was gone") {
		t.Fatalf("the new serve did not say it dropped the copy:\n%s", log.text())
	}
	if v, ok := dst.list()["rj"]; ok && (v.State == "running" || v.State == "frozen" || v.Migration != nil) {
		t.Fatalf("destination after its serve restarted: rj is %s, note %+v", v.State, v.Migration)
	}
	// The dead serve's lazy-pages daemon, which waited for pages rather
	// than end, ends with the copy it served.
	eventually(t, 30*time.Second, "the dead serve's lazy-pages daemon to end", func() bool { return len(lazyDaemonsOf(deadServe)) == 0 })
	// Settled from the source, by its record, with no operator.
	if r := src.ferryIn(h.a, "migrate", "rj", "--to", listen, "--token-file", token); r.code != 0 || !strings.Contains(r.stdout, "runs on here") {
		t.Fatalf("settling the migration: %s", r)
	}
	src.assertContinues("rj", sum, before[len(before)-1]+1)
	if v := src.job("rj"); v.Migration != nil {
		t.Errorf("the source's note outlived the settlement: %+v", v.Migration)
	}
}

// TestServeRestartSettlesHeldPostCopy kills the destination's serve
// while a post-copy copy is restored and held frozen, before the
// source's commit comes (a proxy holds it). The source keeps its job
// frozen, in doubt; the new serve holds the copy in doubt. Re-running
// ferry migrate on the source settles it: the destination drops its
// copy, which never ran, and with it the dead serve's lazy-pages daemon,
// which waits for pages rather than end (it stayed for good, busy, after
// such a settle), and the source's copy runs on, its memory intact.
func TestServeRestartSettlesHeldPostCopy(t *testing.T) {
	w, h, src, dst, token := postCopyHosts(t)
	listen := net.JoinHostPort(h.addrB, "7150")
	// The pre-restore hook runs once the whole stream has come, before
	// CRIU restores: the mark says the source has sent all but its
	// commit, which the proxy, paused then, holds.
	dir := t.TempDir()
	mark, hook := filepath.Join(dir, "streamed"), filepath.Join(dir, "hook")
	if err := os.WriteFile(hook, fmt.Appendf(nil, "#!/bin/sh\n[ \"$1\" = pre-restore ] && touch %q && sleep 2\nexit 0\n", mark), 0o755); err != nil {
		t.Fatal(err)
	}
	serve, _ := dst.serveProc(h.b, listen, token, "", "--hook", hook)
	via := net.JoinHostPort(h.addrB, "7151")
	pause, stop := pausingProxy(t, h.b, via, listen)
	defer stop()
	if r := src.ferryIn(h.a, "run", "--name", "hj", "--", w, "memory", "64"); r.code != 0 {
		t.Fatalf("run: %s", r)
	}
	src.waitLines("hj", "verify ", 1)
	sum := src.lines("hj", "sum ")[0]
	before, _ := src.verifyLines("hj")
	mig, out := src.startFerryIn(h.a, "migrate", "hj", "--to", via, "--token-file", token, "--mode", "post-copy")
	eventually(t, 60*time.Second, "the destination to have the whole stream", func() bool {
		_, err := os.Stat(mark)
		return err == nil
	})
	pause()
	eventually(t, 60*time.Second, "the destination's copy to be held frozen", func() bool {
		v, ok := dst.list()["hj"]
		return ok && v.Migration != nil && v.Migration.State == "held" && v.State == "frozen"
	})
	// ...and the source has heard that it is restored: it keeps its own
	// copy frozen to serve the pages, and sends its commit (held).
	eventually(t, 30*time.Second, "the source to keep its copy for the destination's pages", func() bool {
		v := src.job("hj")
		return v.Migration != nil && v.Migration.State == "serving"
	})
	deadServe := serve.Process.Pid
	kill9(t, serve)
	stop()
	if code := waitExit(t, mig); code != 22 {
		t.Fatalf("migrate whose destination died before its commit came: exit %d, want 22 (in doubt)\n%s", code, out)
	}
	if v := src.job("hj"); v.State != "frozen" || v.Migration == nil || v.Migration.Role != "source" {
		t.Fatalf("source after its destination died before its commit came: %s, note %+v", v.State, v.Migration)
	}
	daemons := func() []int { return lazyDaemonsOf(deadServe) }
	// The daemon is this test's: a failure must not leave it behind.
	t.Cleanup(func() {
		for _, pid := range daemons() {
			_ = unix.Kill(pid, unix.SIGKILL)
		}
	})
	if len(daemons()) == 0 {
		t.Fatal("the dead serve left no lazy-pages daemon behind its held copy: the case under test did not arise")
	}

	_, log := dst.serveProc(h.b, listen, token, "")
	if !strings.Contains(log.text(), "hj: held frozen, in doubt") {
		t.Fatalf("the new serve did not hold the copy in doubt:\n%s", log.text())
	}
	// Settled from the source, by its record, with no operator.
	if r := src.ferryIn(h.a, "migrate", "hj", "--to", listen, "--token-file", token); r.code != 0 || !strings.Contains(r.stdout, "runs on here") {
		t.Fatalf("settling the migration: %s", r)
	}
	if v, ok := dst.list()["hj"]; ok && v.State != "exited" {
		t.Fatalf("destination after the settlement: hj is %s, note %+v", v.State, v.Migration)
	}
	eventually(t, 30*time.Second, "the dead serve's lazy-pages daemon to end with the copy it served", func() bool {
		return len(daemons()) == 0
	})
	src.assertContinues("hj", sum, before[len(before)-1]+1)
	if v := src.job("hj"); v.Migration != nil {
		t.Errorf("the source's note outlived the settlement: %+v", v.Migration)
	}
}

// pausingProxy forwards connections on listen (in namespace ns) to
// target both ways; once paused, it holds whatever the client sends on
// the first connection it accepted (a migration's control connection)
// and forwards the rest: the source's commit never comes while its
// pages still flow.
func pausingProxy(t *testing.T, ns, listen, target string) (pause, stop func()) {
	t.Helper()
	var paused, claimed atomic.Bool
	halt := proxy(t, ns, listen, target, func(c, d net.Conn) {
		control := claimed.CompareAndSwap(false, true)
		gone := make(chan struct{})
		go func() {
			_, _ = io.Copy(c, d)
			c.Close()
			d.Close()
			close(gone)
		}()
		pump(c, d, func(int) bool {
			for control && paused.Load() {
				select {
				case <-gone:
					return false
				case <-time.After(10 * time.Millisecond):
				}
			}
			return true
		})
		c.Close()
		d.Close()
		<-gone
	})
	return func() { paused.Store(true) }, sync.OnceFunc(halt)
}
