package test

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Migrations whose last word is lost, and migrations interrupted on the
// source: the job must never run twice nor be lost.

func TestMigrateInDoubt(t *testing.T) {
	requireCriu(t)
	w := buildWorkload(t)
	h := newHosts(t)
	src, dst := newEnv(t), newEnv(t)
	token := writeToken(t, "correct horse battery staple 42")
	listen := net.JoinHostPort(h.addrB, "7100")
	dst.serve(h.b, listen, token)
	via := net.JoinHostPort(h.addrB, "7101")
	defer proxy(t, h.b, via, listen, cutAfterRestoredTLS)()

	if r := src.ferryIn(h.a, "run", "--name", "dj", "--", w, "memory", "32"); r.code != 0 {
		t.Fatalf("run: %s", r)
	}
	src.waitLines("dj", "verify ", 1)
	sum := src.lines("dj", "sum ")[0]
	before, _ := src.verifyLines("dj")

	r := src.ferryIn(h.a, "migrate", "dj", "--to", via, "--token-file", token, "--mode", "stop-copy")
	if r.code != 22 || !strings.Contains(r.stderr, "in doubt") {
		t.Fatalf("migrate losing its last confirmation: %s", r)
	}
	t.Log(r.stderr)

	// The source ended its copy once the destination had restored it, and
	// says it cannot know whether the destination started it.
	v := src.job("dj")
	if v.State != "exited" || v.Migration == nil || v.Migration.Role != "source" || !strings.Contains(v.Migration.Resolve, "ferry thaw dj") {
		t.Fatalf("source after a lost confirmation: state %s, note %+v", v.State, v.Migration)
	}
	// The destination holds the only copy, frozen, and says how to settle.
	var dv jobView
	eventually(t, 45*time.Second, "the destination to give up waiting for the source", func() bool {
		dv = dst.job("dj")
		return dv.Migration != nil && strings.Contains(dv.Migration.Note, "unknown")
	})
	if dv.State != "frozen" || !strings.Contains(dv.Migration.Resolve, "ferry thaw dj") {
		t.Fatalf("destination after a lost confirmation: state %s, note %+v", dv.State, dv.Migration)
	}
	if out := dst.must("list"); !strings.Contains(out, "to settle: ") {
		t.Fatalf("ferry list does not say how to settle it:\n%s", out)
	}
	// Frozen means frozen: its log does not move.
	held, _ := dst.verifyLines("dj")
	time.Sleep(1500 * time.Millisecond)
	if now, _ := dst.verifyLines("dj"); len(now) != len(held) {
		t.Fatalf("the held copy ran: %d verify lines, then %d", len(held), len(now))
	}
	// Settled from the source (a second migrate of a job in doubt there):
	// it ended its copy, so the destination runs the one it holds, which
	// continues where it stopped; no operator needed.
	r = src.ferryIn(h.a, "migrate", "dj", "--to", listen, "--token-file", token)
	if r.code != 0 || !strings.Contains(r.stdout, "settled the migration of dj") {
		t.Fatalf("settling the migration: %s", r)
	}
	dst.assertContinues("dj", sum, before[len(before)-1])
	if dv := dst.job("dj"); dv.Migration != nil || dv.State != "running" {
		t.Errorf("destination after settling: %s, note %+v", dv.State, dv.Migration)
	}
	if v := src.job("dj"); v.Migration != nil {
		t.Errorf("the source's note outlived the settlement: %+v", v.Migration)
	}
}

// startFerryIn starts ferry in namespace ns without waiting for it.
func (e *env) startFerryIn(ns string, args ...string) (*exec.Cmd, *bytes.Buffer) {
	e.t.Helper()
	return e.startFerryEnvIn(ns, nil, args...)
}

// startFerryEnvIn is startFerryIn with more environment (NAME=VALUE).
func (e *env) startFerryEnvIn(ns string, extraEnv []string, args ...string) (*exec.Cmd, *bytes.Buffer) {
	e.t.Helper()
	var out bytes.Buffer
	cmd := exec.Command("nsenter", append([]string{"--net=/run/netns/" + ns, ferryBin, "--root", e.root}, args...)...)
	if extraEnv != nil {
		cmd.Env = append(os.Environ(), extraEnv...)
	}
	cmd.Stdout, cmd.Stderr = &out, &out
	// A CRIU that outlives a killed ferry holds its output pipe: Wait
	// does not wait for it.
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() {
		if cmd.ProcessState == nil {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		}
	})
	return cmd, &out
}

// interrupt sends SIGINT to cmd, as Ctrl-C would, and returns its exit
// status.
func interrupt(t *testing.T, cmd *exec.Cmd) int {
	t.Helper()
	if err := cmd.Process.Signal(unix.SIGINT); err != nil {
		t.Fatal(err)
	}
	return waitExit(t, cmd)
}

// stoppedForMigration reports whether a migration has stopped the job:
// its cgroup reads frozen, or CRIU holds its main task by ptrace. Once
// CRIU has seized the tasks it thaws the cgroup (the tasks stay stopped),
// and the source freezes in CRIU's pre-dump action, a few milliseconds
// before that: the frozen state alone is too brief to be seen.
func stoppedForMigration(v jobView) bool {
	if v.State == "frozen" {
		return true
	}
	if v.MainPID == 0 {
		return false
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", v.MainPID))
	if err != nil {
		return false
	}
	for _, l := range strings.Split(string(status), "\n") {
		if tracer, ok := strings.CutPrefix(l, "TracerPid:"); ok {
			return strings.TrimSpace(tracer) != "0"
		}
	}
	return false
}

// midMigration is a migration of a 64 MiB job through a link that
// stalls after 4 MiB, caught in the middle of its transfer (stop-copy:
// the image stream; post-copy: the pages, the destination's copy already
// running).
type midMigration struct {
	mode      string
	src, dst  *env
	name, sum string
	before    []int         // the job's verify lines before the migration
	cmd       *exec.Cmd     // the source's ferry migrate
	out       *bytes.Buffer // its output
	stop      func()        // takes the stalled link down
	h         *hosts
	listen    string // the destination's serve, directly
	token     string // its token file
	srv       *server
}

// eachMidMigration runs f on a midMigration in each mode this host can
// run, with ports from port on.
func eachMidMigration(t *testing.T, name string, port int, f func(t *testing.T, m *midMigration)) {
	requireCriu(t)
	w := buildWorkload(t)
	h := newHosts(t)
	src, dst := newEnv(t), newEnv(t)
	token := writeToken(t, "correct horse battery staple 42")
	listen := net.JoinHostPort(h.addrB, strconv.Itoa(port))
	srv := dst.serve(h.b, listen, token)
	if r := src.ferryIn(h.a, "run", "--name", name, "--", w, "memory", "64"); r.code != 0 {
		t.Fatalf("run: %s", r)
	}
	src.waitLines(name, "verify ", 1)
	sum := src.lines(name, "sum ")[0]
	modes := []string{"stop-copy"}
	if src.lazyPages() {
		modes = append(modes, "post-copy")
	}
	for i, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			via := net.JoinHostPort(h.addrB, strconv.Itoa(port+1+i))
			stop := sync.OnceFunc(stallingProxy(t, h.b, via, listen, 4<<20))
			defer stop()
			before, _ := src.verifyLines(name)
			cmd, out := src.startFerryIn(h.a, "migrate", name, "--to", via, "--token-file", token, "--mode", mode)
			eventually(t, 30*time.Second, "the job to stop for its migration", func() bool {
				return stoppedForMigration(src.job(name))
			})
			time.Sleep(500 * time.Millisecond) // into the transfer
			f(t, &midMigration{mode: mode, src: src, dst: dst, name: name, sum: sum, before: before, cmd: cmd, out: out, stop: stop,
				h: h, listen: listen, token: token, srv: srv})
		})
	}
}

// destinationDrops waits until the destination has dropped whatever it
// started: once the link goes down it cannot tell a stalled link from a
// slow one.
func (m *midMigration) destinationDrops(t *testing.T) {
	t.Helper()
	m.stop()
	eventually(t, 30*time.Second, "the destination to drop what it started", func() bool {
		for _, v := range m.dst.list() {
			if v.State != "exited" {
				return false
			}
		}
		return true
	})
	// ...and let go of it: no lazy-pages daemon of a post-copy is left
	// waiting for images the broken stream never brought (it held the
	// migration's connections for good: chaos seed 2340527).
	eventually(t, 30*time.Second, "the destination's lazy-pages daemon to end", func() bool {
		return len(m.srv.lazyDaemons()) == 0
	})
}

// TestMigrateInterrupted: Ctrl-C of the source mid-transfer: the source
// keeps its job running and says so; the destination drops its copy.
func TestMigrateInterrupted(t *testing.T) {
	eachMidMigration(t, "ij", 7110, func(t *testing.T, m *midMigration) {
		code := interrupt(t, m.cmd)
		if code != 130 || !strings.Contains(m.out.String(), "migration interrupted, ij keeps running here") {
			t.Fatalf("interrupted migrate: exit %d\n%s", code, m.out)
		}
		t.Log(m.out.String())
		m.destinationDrops(t)
		assertKeptHere(t, m.src, m.dst, "ij", m.sum, m.before)
		// The Abort could not cross the stalled link: if the checkpoint
		// had gone whole, the destination may have held a copy when the
		// source gave up, and the source's record says so (settling
		// drops that copy); otherwise nothing is recorded.
		if v := m.src.job("ij"); v.Migration != nil && (v.Migration.State != "frozen" || !strings.Contains(v.Migration.Note, "may hold a frozen copy")) {
			t.Fatalf("the source's record after the rollback: %+v", v.Migration)
		}
	})
}

// The destination starts its restore before the source dumps, and the
// source dumps only once it says Prepared. Interrupted while it waits
// (this destination's CRIU takes a minute to start), the source stops at
// once and keeps its job, and the destination drops what it started at
// once too (the stream's end ends its restore wherever its start-up is),
// not when its CRIU would have asked for its first image.
func TestMigrateInterruptedBeforeDump(t *testing.T) {
	requireCriu(t)
	w := buildWorkload(t)
	h := newHosts(t)
	src, dst := newEnv(t), newEnv(t)
	token := writeToken(t, "correct horse battery staple 42")
	slow := src.criuWrapper(`[ "$1" = restore ] && sleep 60`)
	listen := net.JoinHostPort(h.addrB, "7120")
	dst.serve(h.b, listen, token, "FERRY_CRIU="+slow)

	if r := src.ferryIn(h.a, "run", "--name", "bd", "--", w, "memory", "64"); r.code != 0 {
		t.Fatalf("run: %s", r)
	}
	src.waitLines("bd", "verify ", 1)
	sum := src.lines("bd", "sum ")[0]
	modes := []string{"stop-copy"}
	if src.lazyPages() {
		modes = append(modes, "post-copy")
	}
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			before, _ := src.verifyLines("bd")
			cmd, out := src.startFerryIn(h.a, "migrate", "bd", "--to", listen, "--token-file", token, "--mode", mode)
			eventually(t, 20*time.Second, "the destination to start its restore", func() bool {
				return len(dst.list()) > 0
			})
			time.Sleep(500 * time.Millisecond)
			if v := src.job("bd"); v.State != "running" {
				t.Fatalf("the source froze before the destination was prepared: %+v", v)
			}
			code := interrupt(t, cmd)
			if code != 130 || !strings.Contains(out.String(), "bd keeps running here") || !strings.Contains(out.String(), "prepare") {
				t.Fatalf("migrate interrupted while the destination prepares: exit %d\n%s", code, out)
			}
			eventually(t, 5*time.Second, "the destination to drop what it started", func() bool {
				for _, v := range dst.list() {
					if v.State != "exited" {
						return false
					}
				}
				return true
			})
			assertKeptHere(t, src, dst, "bd", sum, before)
		})
	}
}
