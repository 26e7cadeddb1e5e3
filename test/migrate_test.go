package test

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// hosts are two test hosts on one machine: network namespaces joined by a
// veth pair, with addresses from the benchmarking range 198.18.0.0/15.
type hosts struct {
	a, b         string // namespace names
	addrA, addrB string
	vethA, vethB string
	net          int // the third byte of the addresses: 198.18.NET.x
}

// hostSeq numbers the hosts of this test binary (hostMu: TestMigrateChaos
// makes them from parallel subtests).
var (
	hostMu  sync.Mutex
	hostSeq int
)

func newHosts(t *testing.T) *hosts {
	t.Helper()
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("ip (iproute2) not installed")
	}
	hostMu.Lock()
	hostSeq++
	seq := hostSeq
	hostMu.Unlock()
	n := os.Getpid()%200 + seq
	tag := fmt.Sprintf("ft%d-%d", os.Getpid(), seq)
	va, vb := "v"+tag+"a", "v"+tag+"b"
	h := &hosts{a: tag + "a", b: tag + "b", addrA: fmt.Sprintf("198.18.%d.1", n), addrB: fmt.Sprintf("198.18.%d.2", n),
		vethA: va, vethB: vb, net: n}
	t.Cleanup(func() {
		// Deleting the namespaces removes the veth pair with them.
		_ = exec.Command("ip", "netns", "del", h.a).Run()
		_ = exec.Command("ip", "netns", "del", h.b).Run()
	})
	for _, args := range [][]string{
		{"netns", "add", h.a}, {"netns", "add", h.b},
		{"link", "add", va, "type", "veth", "peer", "name", vb},
		{"link", "set", va, "netns", h.a}, {"link", "set", vb, "netns", h.b},
		{"-n", h.a, "addr", "add", h.addrA + "/24", "dev", va}, {"-n", h.b, "addr", "add", h.addrB + "/24", "dev", vb},
		{"-n", h.a, "link", "set", va, "up"}, {"-n", h.b, "link", "set", vb, "up"},
		{"-n", h.a, "link", "set", "lo", "up"}, {"-n", h.b, "link", "set", "lo", "up"},
	} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v: %v\n%s", args, err, out)
		}
	}
	return h
}

// ferryIn runs ferry with e's root inside network namespace ns (nsenter
// switches only the network namespace: `ip netns exec` would also give
// ferry a mount namespace of its own, which CRIU cannot work across).
func (e *env) ferryIn(ns string, args ...string) result {
	e.t.Helper()
	return e.runFerry([]string{"nsenter", "--net=/run/netns/" + ns}, nil, args...)
}

// server is a `ferry serve` this test started (and stops).
type server struct {
	log string
	pid int // ferry serve's (nsenter execs it)
}

// lazyDaemons lists the CRIU lazy-pages daemons ferry serve has running:
// one outlives its migration only by a defect (each holds a scratch
// directory, and its migration's connections, for good).
func (s *server) lazyDaemons() []string {
	var found []string
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", s.pid))
	for _, f := range tasks {
		b, _ := os.ReadFile(f)
		for _, pid := range strings.Fields(string(b)) {
			if args, _ := os.ReadFile("/proc/" + pid + "/cmdline"); strings.Contains(string(args), "\x00lazy-pages\x00") {
				found = append(found, pid)
			}
		}
	}
	return found
}

// lazyDaemonsOf lists the lazy-pages daemons that serve pid started (by
// the scratch directory named after it: see restore.NewEarlyLazy).
func lazyDaemonsOf(pid int) []int {
	mark := fmt.Sprintf(".ferry-scratch-lazy-%d-", pid)
	var found []int
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, _ := os.ReadFile(p)
		if strings.Contains(string(b), "\x00lazy-pages\x00") && strings.Contains(string(b), mark) {
			var d int
			if _, err := fmt.Sscan(filepath.Base(filepath.Dir(p)), &d); err == nil {
				found = append(found, d)
			}
		}
	}
	return found
}

func (s *server) text() string { b, _ := os.ReadFile(s.log); return string(b) }

func (e *env) serve(ns, listen, token string, extraEnv ...string) *server {
	e.t.Helper()
	return e.serveWith(ns, listen, token, nil, extraEnv...)
}

// criuWrapper writes a CRIU that runs the shell line first and then the
// real one (as ferry doctor finds it), and returns its path; the test is
// skipped when the real one cannot be found.
func (e *env) criuWrapper(first string) string {
	e.t.Helper()
	var doc struct {
		Criu struct {
			Path string `json:"path"`
		} `json:"criu"`
	}
	_ = json.Unmarshal([]byte(e.must("doctor", "--json")), &doc)
	if doc.Criu.Path == "" {
		e.t.Skip("cannot tell the CRIU path from ferry doctor --json")
	}
	path := filepath.Join(e.t.TempDir(), "criu")
	if err := os.WriteFile(path, []byte("#!/bin/sh\n"+first+"\nexec "+doc.Criu.Path+" \"$@\"\n"), 0o755); err != nil {
		e.t.Fatal(err)
	}
	return path
}

// lazyPages says whether e's host can take part in post-copy (userfaultfd,
// as ferry doctor reports it).
func (e *env) lazyPages() bool {
	d := e.must("doctor", "--json")
	return strings.Contains(d, `"uffd-noncoop": true`) || strings.Contains(d, `"uffd-noncoop":true`)
}

// serveWith is serve with more arguments for `ferry serve`.
func (e *env) serveWith(ns, listen, token string, args []string, extraEnv ...string) *server {
	e.t.Helper()
	s := &server{log: filepath.Join(e.t.TempDir(), "serve.log")}
	f, err := os.Create(s.log)
	if err != nil {
		e.t.Fatal(err)
	}
	defer f.Close()
	cmd := exec.Command("nsenter", append([]string{"--net=/run/netns/" + ns, ferryBin, "--root", e.root, "serve", "--listen", listen, "--token-file", token}, args...)...)
	cmd.Env = append(append(os.Environ(), e.vars...), extraEnv...)
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	s.pid = cmd.Process.Pid
	reapLazyDaemonsAtEnd(e.t, s.pid)
	e.t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	eventually(e.t, 10*time.Second, "ferry serve to listen", func() bool { return strings.Contains(s.text(), "serving migrations") })
	return s
}

// reapLazyDaemonsAtEnd kills, once the test is over and the serve pid
// with it, the lazy-pages daemons that serve started and left (a serve
// killed by a test orphans them; their scratch directory, which names
// the serve, may be on the tmpfs rather than under the test's root:
// restore.NewEarlyLazy). Registered before the serve's own cleanup, it
// runs after it.
func reapLazyDaemonsAtEnd(t *testing.T, pid int) {
	t.Cleanup(func() {
		for _, d := range lazyDaemonsOf(pid) {
			t.Logf("a lazy-pages daemon of serve %d left behind, killed: %d", pid, d)
			_ = syscall.Kill(d, syscall.SIGKILL)
		}
	})
}

func writeToken(t *testing.T, text string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(p, []byte(text+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// verifyLines parses the workload's "verify N SUM" lines of job name.
func (e *env) verifyLines(name string) (ns []int, sums []string) {
	for _, l := range e.lines(name, "verify ") {
		n, sum, _ := strings.Cut(l, " ")
		k, _ := strconv.Atoi(n)
		ns, sums = append(ns, k), append(sums, sum)
	}
	return ns, sums
}

// assertContinues waits until job name of e has logged more verify lines
// and checks they carry sum and, if after > 0, numbers past after.
func (e *env) assertContinues(name, sum string, after int) {
	e.t.Helper()
	var ns []int
	var sums []string
	eventually(e.t, 15*time.Second, name+" to log on", func() bool {
		ns, sums = e.verifyLines(name)
		return len(ns) > 0 && ns[len(ns)-1] > after
	})
	for i := range ns {
		if sums[i] != sum {
			e.t.Fatalf("%s: verify %d has sum %s, want %s", name, ns[i], sums[i], sum)
		}
	}
}

func TestMigrate(t *testing.T) {
	requireCriu(t)
	w := buildWorkload(t)
	h := newHosts(t)
	src, dst := newEnv(t), newEnv(t)
	token := writeToken(t, "correct horse battery staple 42")
	listen := net.JoinHostPort(h.addrB, "7070")
	srv := dst.serve(h.b, listen, token)

	if r := src.ferryIn(h.a, "run", "--name", "mj", "--", w, "memory", "64"); r.code != 0 {
		t.Fatalf("run: %s", r)
	}
	src.waitLines("mj", "verify ", 1)
	sum := src.lines("mj", "sum ")[0]

	t.Run("wrong token is refused before any job data", func(t *testing.T) {
		bad := writeToken(t, "not the token, but long enough")
		r := src.ferryIn(h.a, "migrate", "mj", "--to", listen, "--token-file", bad)
		if r.code != 20 || !strings.Contains(r.stderr, "authentication failed") {
			t.Fatalf("migrate with a wrong token: %s", r)
		}
		if v := src.job("mj"); v.State != "running" {
			t.Fatalf("source job after a refused migration: %s", v.State)
		}
		if len(dst.list()) != 0 {
			t.Fatalf("destination has jobs after a refused migration: %v", dst.list())
		}
		eventually(t, 5*time.Second, "the refusal in the serve log", func() bool {
			return strings.Contains(srv.text(), "refused a migration") && strings.Contains(srv.text(), h.addrA)
		})
		if r := src.ferryIn(h.a, "migrate", "mj", "--to", listen, "--token-file", filepath.Join(t.TempDir(), "none")); r.code != 2 {
			t.Fatalf("migrate without a token file: %s", r)
		}
	})

	t.Run("a failed restore on the destination leaves the job running here", func(t *testing.T) {
		// A CRIU on the destination that fails every restore.
		broken := src.criuWrapper(`[ "$1" = restore ] && { echo 'Error (injected): restore refused' >&2; exit 1; }`)
		other := newEnv(t)
		listen2 := net.JoinHostPort(h.addrB, "7071")
		other.serve(h.b, listen2, token, "FERRY_CRIU="+broken)
		before, _ := src.verifyLines("mj")
		r := src.ferryIn(h.a, "migrate", "mj", "--to", listen2, "--token-file", token)
		if r.code != 19 || !strings.Contains(r.stderr, "keeps running here") || !strings.Contains(r.stderr, "injected") {
			t.Fatalf("migrate to a failing destination: %s", r)
		}
		t.Log(r.stderr)
		assertKeptHere(t, src, other, "mj", sum, before)
	})

	t.Run("a connection cut mid-transfer leaves the job running here", func(t *testing.T) {
		cut := net.JoinHostPort(h.addrB, "7072")
		stop := cuttingProxy(t, h.b, cut, listen, 1<<20)
		defer stop()
		before, _ := src.verifyLines("mj")
		r := src.ferryIn(h.a, "migrate", "mj", "--to", cut, "--token-file", token)
		if r.code != 19 {
			t.Fatalf("migrate over a cut connection: %s", r)
		}
		t.Log(r.stderr)
		if v := src.job("mj"); v.State != "running" {
			t.Fatalf("source job after a cut migration: %s", v.State)
		}
		src.assertContinues("mj", sum, before[len(before)-1]+1)
		eventually(t, 10*time.Second, "the destination to drop the partial job", func() bool {
			v, ok := dst.list()["mj"]
			return !ok || v.State == "exited"
		})
	})

	t.Run("stop-copy moves the job and its state", func(t *testing.T) {
		before, _ := src.verifyLines("mj")
		// In s2, the checkpoint's default codec (auto would pick zstd or raw).
		r := src.ferryIn(h.a, "migrate", "mj", "--to", listen, "--token-file", token, "--mode", "stop-copy", "--compress", "s2", "--json")
		if r.code != 0 {
			t.Fatalf("migrate: %s", r)
		}
		var rep migrateReport
		if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil {
			t.Fatalf("report: %v\n%s", err, r.stdout)
		}
		if rep.Mode != "stop-copy" || rep.RemoteName != "mj" || rep.BytesSent < 1<<20 || rep.Downtime <= 0 || rep.Downtime > rep.Total {
			t.Errorf("report %+v", rep)
		}
		if v := src.job("mj"); v.State != "exited" {
			t.Errorf("source job after migration: %s", v.State)
		}
		if v := dst.job("mj"); v.State != "running" {
			t.Fatalf("destination job after migration: %s", v.State)
		}
		// The destination's copy continues the count with the same memory;
		// a fresh start would print "sum" and count from 1.
		dst.assertContinues("mj", sum, before[len(before)-1])
		if len(dst.lines("mj", "sum ")) != 0 {
			t.Fatal("the destination started the workload afresh")
		}
	})
}

// cuttingProxy forwards connections on listen (in namespace ns) to target
// and cuts each once limit bytes have gone from client to target.
func cuttingProxy(t *testing.T, ns, listen, target string, limit int64) func() {
	t.Helper()
	return proxy(t, ns, listen, target, func(c, d net.Conn) {
		go func() { _, _ = io.Copy(c, d) }()
		_, _ = io.CopyN(d, c, limit)
		c.Close()
		d.Close()
	})
}

// postCopyHosts is what a post-copy test starts from: the workload, two
// hosts, an env on each and a token; it skips where this host has no
// userfaultfd.
func postCopyHosts(t *testing.T) (w string, h *hosts, src, dst *env, token string) {
	t.Helper()
	requireCriu(t)
	w = buildWorkload(t)
	h = newHosts(t)
	src, dst = newEnv(t), newEnv(t)
	if !src.lazyPages() {
		t.Skip("no userfaultfd here: post-copy cannot work")
	}
	return w, h, src, dst, writeToken(t, "correct horse battery staple 42")
}

// pump copies r to w a read at a time until either fails, handing each
// read's byte count to gate first: gate says whether to forward it, and
// may wait before it answers.
func pump(r io.Reader, w io.Writer, gate func(n int) bool) {
	buf := make([]byte, 32<<10)
	for {
		n, err := r.Read(buf)
		if n > 0 && gate(n) {
			if _, werr := w.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// stallingProxy is cuttingProxy that, instead of cutting, stops
// forwarding from client to target after limit bytes and holds the
// connection open until stopped: a link that hangs.
func stallingProxy(t *testing.T, ns, listen, target string, limit int64) func() {
	t.Helper()
	stop := make(chan struct{})
	halt := proxy(t, ns, listen, target, func(c, d net.Conn) {
		go func() { _, _ = io.Copy(c, d) }()
		_, _ = io.CopyN(d, c, limit)
		<-stop
		c.Close()
		d.Close()
	})
	return func() { close(stop); halt() }
}

// proxy accepts connections on listen (in namespace ns; its sockets are
// made on a thread moved there) and hands each, with a connection to
// target, to relay.
func proxy(t *testing.T, ns, listen, target string, relay func(c, d net.Conn)) func() {
	t.Helper()
	var ln net.Listener
	var wg sync.WaitGroup
	err := inNetns(t, ns, func() (err error) {
		ln, err = net.Listen("tcp", listen)
		return err
	})
	if err != nil {
		t.Fatalf("proxy: %v", err)
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			var d net.Conn
			if err := inNetns(t, ns, func() (err error) {
				d, err = net.Dial("tcp", target)
				return err
			}); err != nil {
				c.Close()
				continue
			}
			wg.Go(func() { relay(c, d) })
		}
	}()
	return func() { ln.Close(); wg.Wait() }
}

// assertKeptHere checks what a failed migration of job name must leave:
// the job running on src, counting on past before with its memory intact
// (sum), and no live copy on dest.
func assertKeptHere(t *testing.T, src, dest *env, name, sum string, before []int) {
	t.Helper()
	if v := src.job(name); v.State != "running" {
		t.Fatalf("source job after a failed migration: %s", v.State)
	}
	src.assertContinues(name, sum, before[len(before)-1]+1)
	for other, v := range dest.list() {
		if v.State != "exited" {
			t.Fatalf("failed destination left job %s %s", other, v.State)
		}
	}
}

// migrateReport is the part of `ferry migrate --json` the tests check.
type migrateReport struct {
	Mode       string `json:"mode"`
	Reason     string `json:"reason"`
	RemoteName string `json:"remoteName"`
	BytesSent  int64  `json:"bytesSent"`
	Downtime   int64  `json:"downtimeNs"`
	Total      int64  `json:"totalNs"`
	LazyPages  int64  `json:"lazyPages"`
	Memory     int64  `json:"memoryBytes"`
}

func TestMigratePostCopy(t *testing.T) {
	requireCriu(t)
	w := buildWorkload(t)
	h := newHosts(t)
	// other is the destination whose lazy-pages daemon fails; made here,
	// its root is short enough for the restore's serve socket.
	src, dst, other := newEnv(t), newEnv(t), newEnv(t)
	token := writeToken(t, "correct horse battery staple 42")
	listen := net.JoinHostPort(h.addrB, "7080")
	dstSrv := dst.serve(h.b, listen, token)
	if !src.lazyPages() {
		t.Skip("no userfaultfd here: post-copy cannot work")
	}

	if r := src.ferryIn(h.a, "run", "--name", "pc", "--", w, "memory", "256"); r.code != 0 {
		t.Fatalf("run: %s", r)
	}
	src.waitLines("pc", "verify ", 1)
	sum := src.lines("pc", "sum ")[0]

	t.Run("a lazy-pages daemon that fails to start fails the restore it held and resumes the source", func(t *testing.T) {
		// The destination's restore starts beside its lazy-pages daemon
		// and waits for it at its first image; this daemon fails once the
		// restore is (most likely) waiting.
		broken := src.criuWrapper(`[ "$1" = lazy-pages ] && { sleep 0.3; echo 'Error (injected): no lazy pages' >&2; exit 1; }`)
		listen2 := net.JoinHostPort(h.addrB, "7082")
		srv := other.serve(h.b, listen2, token, "FERRY_CRIU="+broken)
		before, _ := src.verifyLines("pc")
		r := src.ferryIn(h.a, "migrate", "pc", "--to", listen2, "--token-file", token, "--mode", "post-copy")
		// "aborted before it began": CRIU was held for the daemon (see
		// restore.Options.LazyReady) and refused its first image.
		if r.code != 19 || !strings.Contains(r.stderr, "injected") || !strings.Contains(r.stderr, "aborted before it began") {
			t.Fatalf("post-copy to a destination whose lazy-pages daemon fails: %s", r)
		}
		t.Log(r.stderr)
		assertKeptHere(t, src, other, "pc", sum, before)
		// Nothing of the attempt is left there: no directory, no CRIU.
		if left := other.serveLeftovers(srv.pid); len(left) != 0 {
			t.Errorf("the destination left %q", left)
		}
		if left := lazyDaemonsOf(srv.pid); len(left) != 0 {
			t.Errorf("the destination left lazy-pages daemons %v", left)
		}
		if !strings.Contains(srv.text(), "injected") {
			t.Errorf("the serve log does not say why: %s", srv.text())
		}
	})

	t.Run("a page link cut mid-transfer drops the destination's copy and resumes the source", func(t *testing.T) {
		cut := net.JoinHostPort(h.addrB, "7081")
		// The control connection carries a few hundred KiB (everything but
		// memory); the page link is cut after 8 MiB of 256.
		stop := cuttingProxy(t, h.b, cut, listen, 8<<20)
		defer stop()
		before, _ := src.verifyLines("pc")
		r := src.ferryIn(h.a, "migrate", "pc", "--to", cut, "--token-file", token, "--mode", "post-copy")
		if r.code != 19 || !strings.Contains(r.stderr, "dropped its copy") {
			t.Fatalf("post-copy over a cut page link: %s", r)
		}
		t.Log(r.stderr)
		assertKeptHere(t, src, dst, "pc", sum, before)
	})

	t.Run("a stream cut before it is whole lets the destination go", func(t *testing.T) {
		// Cut after the stream's head (the manifest, on which the
		// destination starts its lazy-pages daemon) and long before its
		// end: the daemon waits for images that never come.
		cut := net.JoinHostPort(h.addrB, "7083")
		stop := cuttingProxy(t, h.b, cut, listen, 64<<10)
		defer stop()
		before, _ := src.verifyLines("pc")
		r := src.ferryIn(h.a, "migrate", "pc", "--to", cut, "--token-file", token, "--mode", "post-copy")
		if r.code != 19 || !strings.Contains(r.stderr, "keeps running here") {
			t.Fatalf("post-copy over a link cut in the stream: %s", r)
		}
		t.Log(r.stderr)
		assertKeptHere(t, src, dst, "pc", sum, before)
		eventually(t, 30*time.Second, "the destination to end its lazy-pages daemon", func() bool {
			return len(dstSrv.lazyDaemons()) == 0
		})
		eventually(t, 10*time.Second, "the destination to remove its scratch", func() bool {
			return len(dst.serveLeftovers(dstSrv.pid)) == 0
		})
	})

	t.Run("auto chooses post-copy and moves 256 MiB with memory following on demand", func(t *testing.T) {
		pipeMax, _ := os.ReadFile("/proc/sys/fs/pipe-max-size")
		before, _ := src.verifyLines("pc")
		// No downtime budget and more than 256 MiB of memory: auto must
		// prefer post-copy, which both test hosts support.
		r := src.ferryIn(h.a, "migrate", "pc", "--to", listen, "--token-file", token, "--json")
		if r.code != 0 {
			t.Fatalf("migrate: %s", r)
		}
		var rep migrateReport
		if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil {
			t.Fatalf("report: %v\n%s", err, r.stdout)
		}
		t.Logf("report: %+v", rep)
		// 256 MiB of pages went lazily; the stream itself was small.
		if rep.Mode != "post-copy" || !strings.HasPrefix(rep.Reason, "auto chose post-copy") || rep.LazyPages < (200<<20)/4096 || rep.BytesSent < 200<<20 || rep.Downtime <= 0 || rep.Downtime > rep.Total {
			t.Errorf("report %+v", rep)
		}
		if v := src.job("pc"); v.State != "exited" || v.Exit == nil || v.Exit.Reason != "migrated" || v.Operation != "" {
			t.Errorf("source job after migration: %s (%+v), operation %q", v.State, v.Exit, v.Operation)
		}
		if v := dst.job("pc"); v.State != "running" {
			t.Fatalf("destination job after migration: %s", v.State)
		}
		// Every verify line checksums all 256 MiB: it matches only if every
		// page arrived intact.
		dst.assertContinues("pc", sum, before[len(before)-1])
		if len(dst.lines("pc", "sum ")) != 0 {
			t.Fatal("the destination started the workload afresh")
		}
		// ferry raised fs.pipe-max-size for CRIU's lazy dump; it must be back.
		if now, _ := os.ReadFile("/proc/sys/fs/pipe-max-size"); string(now) != string(pipeMax) {
			t.Errorf("fs.pipe-max-size is %q after the migration, was %q", now, pipeMax)
		}
	})
}

// inNetns runs f on a thread moved into network namespace ns, so the
// sockets f makes belong to ns (and stay there, whatever thread uses them).
func inNetns(t *testing.T, ns string, f func() error) error {
	t.Helper()
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with this goroutine
		fd, err := os.Open("/run/netns/" + ns)
		if err != nil {
			done <- err
			return
		}
		err = unix.Setns(int(fd.Fd()), unix.CLONE_NEWNET)
		fd.Close()
		if err != nil {
			done <- err
			return
		}
		done <- f()
	}()
	return <-done
}

// pinger is a client's TCP connection to the workload's serve mode.
type pinger struct {
	c net.Conn
	r *bufio.Reader
}

func (p *pinger) ping(t *testing.T) int {
	t.Helper()
	_ = p.c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(p.c, "ping\n"); err != nil {
		t.Fatalf("ping: %v", err)
	}
	line, err := p.r.ReadString('\n')
	if err != nil {
		t.Fatalf("waiting for pong: %v", err)
	}
	n, err := strconv.Atoi(strings.TrimPrefix(strings.TrimSpace(line), "pong "))
	if err != nil {
		t.Fatalf("answer %q", line)
	}
	return n
}

// dialPinger connects from namespace ns to addr.
func dialPinger(t *testing.T, ns, addr string) *pinger {
	t.Helper()
	c := connectIn(t, ns, addr)
	return &pinger{c: c, r: bufio.NewReader(c)}
}

// connectIn is a TCP connection from namespace ns to addr (see dialIn),
// closed when the test ends.
func connectIn(t *testing.T, ns, addr string) net.Conn {
	t.Helper()
	c, err := dialIn(t, ns, addr, "")
	if err != nil {
		t.Fatalf("connecting to %s from %s: %v", addr, ns, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// TestMigrateTCP: a job serving TCP moves with its established connection
// while the destination takes over the service address (the serve hook
// moves it between the namespaces). The client, which stays put, goes on
// talking on the same connection and the count continues. Under cgroup v2
// and v1 (both hosts).
func TestMigrateTCP(t *testing.T) {
	requireCriu(t)
	w := buildWorkload(t)
	t.Run("v2", func(t *testing.T) { migrateTCP(t, w, newEnv, 2) })
	t.Run("v1", func(t *testing.T) { migrateTCP(t, w, newEnvV1, 1) })
}

func migrateTCP(t *testing.T, w string, newEnv func(*testing.T) *env, cgroupVersion int) {
	h := newHosts(t)
	src, dst := newEnv(t), newEnv(t)
	token := writeToken(t, "correct horse battery staple 42")
	service := fmt.Sprintf("198.18.%d.10", h.net)
	if out, err := exec.Command("ip", "-n", h.a, "addr", "add", service+"/32", "dev", h.vethA).CombinedOutput(); err != nil {
		t.Fatalf("adding the service address: %v\n%s", err, out)
	}
	events := filepath.Join(t.TempDir(), "events")
	hook := filepath.Join(t.TempDir(), "hook")
	script := fmt.Sprintf(`#!/bin/sh
echo "$1 $2 $FERRY_PEER" >> %[1]s
case "$1" in
pre-restore) ip -n %[2]s addr del %[4]s/32 dev %[3]s && ip -n %[5]s addr add %[4]s/32 dev %[6]s ;;
discarded) ip -n %[5]s addr del %[4]s/32 dev %[6]s; ip -n %[2]s addr add %[4]s/32 dev %[3]s ;;
esac
`, events, h.a, h.vethA, service, h.b, h.vethB)
	if err := os.WriteFile(hook, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	listen := net.JoinHostPort(h.addrB, "7090")
	srvCmd := []string{"--hook", hook}
	dst.serveWith(h.b, listen, token, srvCmd)

	addr := net.JoinHostPort(service, "7091")
	if r := src.ferryIn(h.a, "run", "--name", "tj", "--", w, "serve", addr); r.code != 0 {
		t.Fatalf("run: %s", r)
	}
	if v := src.job("tj").CgroupVersion; v != cgroupVersion {
		t.Skipf("the job's cgroup is v%d here, not v%d", v, cgroupVersion)
	}
	var p *pinger
	eventually(t, 10*time.Second, "the job to listen", func() bool {
		err := inNetns(t, h.b, func() error {
			c, err := net.DialTimeout("tcp", addr, time.Second)
			if err == nil {
				c.Close()
			}
			return err
		})
		return err == nil
	})
	p = dialPinger(t, h.b, addr)
	for want := 1; want <= 3; want++ {
		if got := p.ping(t); got != want {
			t.Fatalf("pong %d, want %d", got, want)
		}
	}

	r := src.ferryIn(h.a, "migrate", "tj", "--to", listen, "--token-file", token, "--tcp-established", "--json")
	if r.code != 0 {
		t.Fatalf("migrate: %s", r)
	}
	var rep migrateReport
	if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil {
		t.Fatalf("report: %v\n%s", err, r.stdout)
	}
	if rep.Mode != "stop-copy" || !strings.Contains(rep.Reason, "TCP") {
		t.Errorf("auto with --tcp-established chose %s (%s); want stop-copy for the connections' sake", rep.Mode, rep.Reason)
	}
	if v := src.job("tj"); v.State != "exited" {
		t.Errorf("source job after migration: %s", v.State)
	}
	if v := dst.job("tj"); v.State != "running" {
		t.Fatalf("destination job after migration: %s", v.State)
	}
	// The same connection, now served by the destination's copy, with
	// the count it had.
	if got := p.ping(t); got != 4 {
		t.Fatalf("after migration the established connection got pong %d, want 4", got)
	}
	// And the listening socket came along: a new client is served too.
	if got := dialPinger(t, h.b, addr).ping(t); got != 5 {
		t.Fatalf("a new connection after migration got pong %d, want 5", got)
	}
	// The job logs after it answers, and its shim copies the log on: wait.
	eventually(t, 10*time.Second, "the destination's log to say served 5", func() bool {
		served := dst.lines("tj", "served ")
		return len(served) > 0 && served[len(served)-1] == "5"
	})
	b, _ := os.ReadFile(events)
	if ev := string(b); !strings.HasPrefix(ev, "pre-restore tj "+h.addrA) || !strings.Contains(ev, "running tj") {
		t.Errorf("hook events:\n%s", ev)
	}
}
