package test

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// unixAsk sends line on c and returns the answer line.
func unixAsk(t *testing.T, c net.Conn, r *bufio.Reader, line string) string {
	t.Helper()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := fmt.Fprintln(c, line); err != nil {
		t.Fatalf("sending %q: %v", line, err)
	}
	ans, err := r.ReadString('\n')
	if err != nil {
		t.Fatalf("answer to %q: %v", line, err)
	}
	return strings.TrimSpace(ans)
}

// TestUnixStreamClientRefused: a client outside the tree connected over
// the job's unix socket: CRIU cannot carry one end of a stream
// connection, with or without --ext-unix-sk, so ferry refuses up front
// (16) without naming a flag that cannot help, and the job serves on.
// What the refusal says to do (the peer disconnects first) works: the job
// then checkpoints and restores, and answers a new client with its count
// continued.
func TestUnixStreamClientRefused(t *testing.T) {
	e := newEnv(t)
	requireCriu(t)
	w := buildWorkload(t)
	sock := filepath.Join(t.TempDir(), "s")
	e.must("run", "--name", "usrv", "--", w, "unix-serve", sock)
	e.waitLines("usrv", "unix listening", 1)
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r := bufio.NewReader(c)
	if a := unixAsk(t, c, r, "a"); a != "1 a" {
		t.Fatalf("answer %q", a)
	}
	ckpt := filepath.Join(t.TempDir(), "usrv.ferry")
	for _, flags := range [][]string{nil, {"--ext-unix-sk"}} {
		args := append(append([]string{"checkpoint", "-o", ckpt}, flags...), "usrv")
		res := e.ferry(args...)
		if res.code != 16 || !strings.Contains(res.stderr, "stream connection") || strings.Contains(res.stderr, "--ext-unix-sk") {
			t.Fatalf("ferry %v with a client connected: want 16, the reason and no --ext-unix-sk hint; got %s", args, res)
		}
	}
	if a := unixAsk(t, c, r, "b"); a != "2 b" {
		t.Fatalf("after the refusals the job answers %q, want 2 b", a)
	}
	c.Close()
	eventually(t, 10*time.Second, "the job to drop the closed connection", func() bool {
		return !strings.Contains(e.must("checkpoint", "--dry-run", "usrv"), "stream connection")
	})
	e.must("checkpoint", "-o", ckpt, "usrv")
	e.must("restore", ckpt)
	var c2 net.Conn
	eventually(t, 10*time.Second, "the restored job to accept", func() bool {
		c2, err = net.Dial("unix", sock)
		return err == nil
	})
	defer c2.Close()
	if a := unixAsk(t, c2, bufio.NewReader(c2), "c"); a != "3 c" {
		t.Fatalf("restored job answers %q, want 3 c", a)
	}
}

// TestUnixDgramExtUnixSk: a datagram socket connected to a receiver
// outside the tree needs --ext-unix-sk (16 without, naming it), and with
// it CRIU carries the socket: the receiver gets the job's datagrams after
// the restore, their count continued.
func TestUnixDgramExtUnixSk(t *testing.T) {
	e := newEnv(t)
	requireCriu(t)
	w := buildWorkload(t)
	sock := filepath.Join(t.TempDir(), "dg")
	ln, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	got := make(chan int, 4096)
	go func() {
		buf := make([]byte, 64)
		for {
			n, err := ln.Read(buf)
			if err != nil {
				close(got)
				return
			}
			if v, err := strconv.Atoi(strings.TrimPrefix(string(buf[:n]), "dg ")); err == nil {
				select {
				case got <- v:
				default:
				}
			}
		}
	}()
	next := func(what string) int {
		t.Helper()
		select {
		case v := <-got:
			return v
		case <-time.After(10 * time.Second):
			t.Fatalf("no datagram %s", what)
		}
		return 0
	}
	e.must("run", "--name", "dg", "--", w, "unix-dgram", sock)
	next("before the checkpoint")
	ckpt := filepath.Join(t.TempDir(), "dg.ferry")
	res := e.ferry("checkpoint", "-o", ckpt, "dg")
	if res.code != 16 || !strings.Contains(res.stderr, "--ext-unix-sk") {
		t.Fatalf("checkpoint without --ext-unix-sk: want 16 naming it, got %s", res)
	}
	e.must("checkpoint", "--ext-unix-sk", "-o", ckpt, "dg")
	last := 0
	for drained := false; !drained; {
		select {
		case v := <-got:
			last = v
		case <-time.After(300 * time.Millisecond):
			drained = true
		}
	}
	sent := e.lastInts("dg", "sent ")[0]
	e.must("restore", ckpt)
	first := next("after the restore")
	if first <= last || first > sent+1 {
		t.Fatalf("first datagram after the restore is %d; the receiver had %d, the job had sent %d", first, last, sent)
	}
	if n := next("after the restore"); n != first+1 {
		t.Fatalf("datagrams after the restore: %d then %d", first, n)
	}
	if strings.Contains(e.must("logs", "dg"), "send failed") {
		t.Errorf("the restored job's sends failed:\n%s", e.must("logs", "dg"))
	}
}

// TestIPNetnsExecHint: under `ip netns exec` (a /sys without cgroups)
// ferry run fails with 8 and says to use nsenter --net, which works: the
// job runs in that network namespace.
func TestIPNetnsExecHint(t *testing.T) {
	e := newEnv(t)
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("no ip command")
	}
	ns := fmt.Sprintf("ferry-conform-%d", os.Getpid())
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "delete", ns).Run() })
	res := e.runFerry([]string{"ip", "netns", "exec", ns}, nil, "run", "--name", "nsx", "--", "sleep", "1000")
	if res.code != 8 || !strings.Contains(res.stderr, "nsenter --net=/run/netns/NAME") || strings.Count(strings.TrimSpace(res.stderr), "\n") != 0 {
		t.Fatalf("ferry run under ip netns exec: want one line naming nsenter --net and exit 8, got %s", res)
	}
	res = e.runFerry([]string{"nsenter", "--net=/run/netns/" + ns}, nil, "run", "--name", "nsx", "--", "sleep", "1000")
	if res.code != 0 {
		t.Fatalf("ferry run under nsenter --net: %s", res)
	}
	var v jobView
	eventually(t, 10*time.Second, "main pid", func() bool { v = e.job("nsx"); return v.MainPID > 0 })
	var ino [2]uint64
	for i, p := range []string{"/run/netns/" + ns, fmt.Sprintf("/proc/%d/ns/net", v.MainPID)} {
		var st syscall.Stat_t
		if err := syscall.Stat(p, &st); err != nil {
			t.Fatal(err)
		}
		ino[i] = st.Ino
	}
	if ino[0] != ino[1] {
		t.Errorf("job's network namespace is %d, want %s's %d", ino[1], ns, ino[0])
	}
}

// procTracer is the TracerPid of pid.
func procTracer(t *testing.T, pid int) int {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(l, "TracerPid:"); ok {
			n, err := strconv.Atoi(strings.TrimSpace(v))
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatalf("no TracerPid in /proc/%d/status", pid)
	return 0
}

// TestTracedTaskHint: a job's task held by a tracer outside the job (as
// strace holds it: PTRACE_SEIZE, the task runs on) is refused up front
// (16), in one line that says to detach the tracer first, and the job
// runs on, traced, its state whole. Following the hint works: once the
// tracer has detached, the job checkpoints and restores with its 8 MiB
// of memory and its count whole.
func TestTracedTaskHint(t *testing.T) {
	requireRoot(t)
	requireCriu(t)
	bins := conformBins(t)
	dir := t.TempDir()
	e := newEnv(t)
	e.must("run", "--name", "traced", "--", filepath.Join(bins, "mem"), "anon-private", dir)
	if nums, fails, state := e.waitOK("traced", 5, 20*time.Second); len(fails) > 0 || len(nums) < 5 {
		t.Fatalf("before tracing (job %s): %d ok lines, %q", state, len(nums), fails)
	}
	pid := e.job("traced").MainPID

	tracer := exec.Command(filepath.Join(bins, "tracer"), strconv.Itoa(pid))
	out, err := tracer.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	tracer.Stderr = os.Stderr
	if err := tracer.Start(); err != nil {
		t.Fatal(err)
	}
	exited := false
	t.Cleanup(func() {
		if !exited {
			_ = tracer.Process.Kill() // a tracer that dies detaches its tracee
			_ = tracer.Wait()
		}
	})
	said := bufio.NewReader(out)
	if l, err := said.ReadString('\n'); err != nil || strings.TrimSpace(l) != fmt.Sprintf("seized %d", pid) {
		t.Fatalf("tracer says %q, %v", l, err)
	}
	if tp := procTracer(t, pid); tp != tracer.Process.Pid {
		t.Fatalf("the job's task is traced by %d, want the tracer %d", tp, tracer.Process.Pid)
	}

	ckpt := filepath.Join(t.TempDir(), "traced.ferry")
	res := e.ferry("checkpoint", "-o", ckpt, "traced")
	if res.code != 16 || !strings.Contains(res.stderr, "detach the tracer first") || strings.Count(strings.TrimSpace(res.stderr), "\n") != 0 {
		t.Fatalf("checkpoint of a traced job: want one line saying to detach the tracer first, exit 16; got %s", res)
	}
	if _, err := os.Stat(ckpt); err == nil {
		t.Errorf("the refused checkpoint left %s", ckpt)
	}
	if d := e.ferry("checkpoint", "--dry-run", "traced"); !strings.Contains(d.stdout, "checkpointable: no") || !strings.Contains(d.stdout, "detach the tracer first") {
		t.Errorf("dry run of a traced job: %s", d)
	}
	nums, _ := okLines(e.must("logs", "traced"))
	before := nums[len(nums)-1]
	nums, fails, state := e.waitOK("traced", before+5, 20*time.Second)
	if state != "running" || len(fails) > 0 || gap(nums) != "" || nums[len(nums)-1] <= before+5 {
		t.Fatalf("after the refusal the traced job is %s, counted to %d from %d, %q %s", state, nums[len(nums)-1], before, fails, gap(nums))
	}

	// What the refusal says: detach the tracer.
	if err := tracer.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	l, _ := said.ReadString('\n')
	err = tracer.Wait()
	exited = true
	if err != nil || strings.TrimSpace(l) != "detached" {
		t.Fatalf("tracer on SIGTERM: said %q, exit %v", l, err)
	}
	if tp := procTracer(t, pid); tp != 0 {
		t.Fatalf("the job's task is still traced by %d", tp)
	}
	e.must("checkpoint", "-o", ckpt, "traced")
	nums, _ = okLines(e.must("logs", "traced"))
	last := nums[len(nums)-1]
	e.must("restore", ckpt)
	nums, fails, state = e.waitOK("traced", last+10, 20*time.Second)
	if state != "running" || len(fails) > 0 || gap(nums) != "" || nums[len(nums)-1] <= last+10 {
		t.Fatalf("restored job is %s, counted to %d from %d, %q %s\n%s", state, nums[len(nums)-1], last, fails, gap(nums), logTail(e.must("logs", "traced"), last))
	}
}
