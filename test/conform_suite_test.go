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
	"sync"
	"testing"
	"time"

	"github.com/ferry-cr/ferry/internal/proc"
	"golang.org/x/sys/unix"
)

// The conformance suite: each case is one small C program of test/conform
// (built into bin/conform by `make conform`) in one mode, setting up one
// kind of kernel state and printing "ok N" every 50 ms while that state
// holds ("FAIL ..." when it does not). A case runs the program as a job,
// checkpoints it, restores it and passes when the restored job goes on
// printing "ok" with the count continued: no gap, no restart, no FAIL.

// conformCase is one program in one mode.
type conformCase struct {
	prog, mode string
	state      string   // what it holds, for the table
	flags      []string // checkpoint flags the state needs
	// port, if set, gives the program a third argument: a free port of
	// this kind (tcp4, tcp6, udp4, udp6) on the loopback, or with
	// "abstract" a fresh abstract unix socket name.
	port string
	// after, if set, runs against the restored job (e.g. dials its
	// listening socket) and returns what is wrong, or "".
	after func(dir, port string) string
	// xfail, if set, is why the case cannot pass today (a limit or defect
	// of ferry, not of the test); xfailAt is the stage that fails
	// ("checkpoint", "restore" or "held") and xfailSays a word the failure
	// must name. A case marked so that passes fails the suite, so that the
	// mark is dropped once ferry is fixed.
	xfail, xfailAt, xfailSays string
	// xfailUnless, if set, lifts xfail where it returns true.
	xfailUnless func() bool
}

func (c conformCase) name() string { return c.prog + "-" + c.mode }

var conformCases = []conformCase{
	// 1. process-tree shapes
	{prog: "tree", mode: "threads", state: "3 threads counting, thread-local data, tids"},
	{prog: "tree", mode: "session", state: "child leading a session with a grandchild"},
	{prog: "tree", mode: "pgrp", state: "two children in a process group"},
	{prog: "tree", mode: "zombie", state: "unreaped child with exit status 7"},
	{prog: "tree", mode: "orphan", state: "orphan reparented to the reaper"},
	// 2. signals
	{prog: "signals", mode: "pending", state: "pending per process and per thread, queued RT values"},
	{prog: "signals", mode: "blocked", state: "different blocked masks in two threads"},
	{prog: "signals", mode: "handlers", state: "SA_SIGINFO handler with sa_mask, SIG_IGN, SA_RESETHAND"},
	{prog: "signals", mode: "altstack", state: "handler on a sigaltstack"},
	// 3. timers
	{prog: "timers", mode: "itimer", state: "ITIMER_REAL 10 ms, ITIMER_VIRTUAL/PROF armed"},
	{prog: "timers", mode: "posix", state: "POSIX timers: 10 ms signal+value, one-shot, SIGEV_NONE"},
	{prog: "timers", mode: "timerfd", state: "timerfd 10 ms and one-shot 1000 s", xfail: "refused up front (16): CRIU 4.2.1 restores a periodic timerfd disarmed (it_value 0, interval kept), so it would never fire again (so with bare criu dump/restore too)", xfailAt: "checkpoint", xfailSays: "periodic timerfd"},
	// 4. file descriptors
	{prog: "fds", mode: "pipe", state: "pipe with 8000 bytes in flight"},
	{prog: "fds", mode: "fifo", state: "FIFO with 8000 bytes in flight"},
	{prog: "fds", mode: "eventfd", state: "eventfd counter, semaphore eventfd", xfail: "refused up front (16): CRIU 4.2.1 restores an eventfd without EFD_SEMAPHORE (so with bare criu dump/restore too)", xfailAt: "checkpoint", xfailSays: "semaphore"},
	{prog: "fds", mode: "signalfd", state: "signalfd with a signal pending"},
	{prog: "fds", mode: "epoll", state: "epoll on a pipe and an edge-triggered eventfd"},
	{prog: "fds", mode: "inotify", state: "inotify watch on a directory"},
	{prog: "fds", mode: "fanotify", state: "fanotify mark on a directory"},
	{prog: "fds", mode: "memfd", state: "sealed memfd, mapped shared"},
	{prog: "fds", mode: "deleted", state: "deleted 256 KiB file open twice"},
	{prog: "fds", mode: "sparse-deleted", state: "deleted sparse file, 2 GiB apparent, 8 KiB data"},
	{prog: "fds", mode: "append", state: "O_APPEND file and a reader's offset"},
	{prog: "fds", mode: "fdtable", state: "fd table shared with a CLONE_FILES child"},
	{prog: "fds", mode: "offset", state: "file offset shared with a forked child"},
	// 5. sockets (loopback only)
	{prog: "sockets", mode: "unix-stream", state: "unix stream socketpair, data in flight both ways"},
	{prog: "sockets", mode: "unix-dgram", state: "unix datagram socketpair, datagrams queued"},
	{prog: "sockets", mode: "unix-seqpacket", state: "unix seqpacket socketpair, records queued"},
	{prog: "sockets", mode: "unix-listen", state: "unix listeners (path, abstract), accepted connection", port: "abstract",
		after: func(dir, name string) string {
			return dialSays("unix", filepath.Join(dir, "sock"), "hello") + dialSays("unix", "@"+name, "hello")
		}},
	{prog: "sockets", mode: "unix-unconnected", state: "unconnected unix sockets, named dgram receiver", port: ""},
	{prog: "sockets", mode: "tcp", state: "TCP listener and established connection on 127.0.0.1", port: "tcp4",
		flags: []string{"--tcp-established"},
		after: func(dir, port string) string { return dialSays("tcp", "127.0.0.1:"+port, "hello") }},
	{prog: "sockets", mode: "tcp6", state: "TCP listener and established connection on ::1", port: "tcp6",
		flags: []string{"--tcp-established"},
		after: func(dir, port string) string { return dialSays("tcp6", "[::1]:"+port, "hello") }},
	{prog: "sockets", mode: "udp", state: "UDP bound and connected sockets on 127.0.0.1", port: "udp4"},
	{prog: "sockets", mode: "udp6", state: "UDP bound and connected sockets on ::1", port: "udp6"},
	{prog: "sockets", mode: "packet", state: "raw packet socket bound to lo"},
	// 6. SysV IPC (the job's own IPC namespace)
	{prog: "sysv", mode: "shm", state: "SysV shm: shared with a child, keyed, detached"},
	{prog: "sysv", mode: "sem", state: "SysV semaphore set"},
	{prog: "sysv", mode: "msg", state: "SysV message queue holding 6 messages"},
	// 7. file locks
	{prog: "locks", mode: "posix", state: "POSIX write and read locks", flags: []string{"--file-locks"}},
	{prog: "locks", mode: "flock", state: "flock exclusive and shared", flags: []string{"--file-locks"}},
	{prog: "locks", mode: "ofd", state: "OFD write lock", flags: []string{"--file-locks"}},
	// 8. memory
	{prog: "mem", mode: "anon-private", state: "8 MiB private anonymous"},
	{prog: "mem", mode: "anon-shared", state: "shared anonymous with a child"},
	{prog: "mem", mode: "file-private", state: "private file mapping, written (COW)"},
	{prog: "mem", mode: "file-shared", state: "shared file mapping, coherent with the file"},
	{prog: "mem", mode: "mprotect", state: "rw/r/none pages of one mapping, faults"},
	{prog: "mem", mode: "cow", state: "private memory diverged after fork"},
	{prog: "mem", mode: "large", state: "64 MiB private anonymous"},
	{prog: "mem", mode: "sparse", state: "1 GiB mapping, 16 pages touched"},
	// 9. credentials, limits, cwd and umask
	{prog: "creds", mode: "groups", state: "supplementary groups"},
	{prog: "creds", mode: "prctl", state: "bounding set, no_new_privs, comm"},
	{prog: "creds", mode: "uid", state: "task running as uid 1000", xfail: "refused up front (16), as it must be on a host where ferry lacks CAP_SYS_RESOURCE (CRIU must read another user's task's limits); passes where ferry has it", xfailAt: "checkpoint", xfailSays: "CAP_SYS_RESOURCE",
		xfailUnless: func() bool { return proc.HasCapability("CapEff", unix.CAP_SYS_RESOURCE) }},
	{prog: "creds", mode: "rlimits", state: "lowered rlimits"},
	{prog: "creds", mode: "cwd-umask", state: "cwd in DIR/a/b, umask 027"},
	// 10. stopped tasks
	{prog: "stop", mode: "stopped", state: "child stopped by SIGSTOP, sibling running"},
	{prog: "stop", mode: "ptraced", state: "child in a ptrace stop, traced by its parent",
		xfail: "refused up front (16): CRIU cannot seize a task that another tracer holds, even one inside the tree", xfailAt: "checkpoint", xfailSays: "traced"},
}

// conformRow is one line of the results table.
type conformRow struct {
	name, state               string
	checkpoint, restore, held string
	note                      string
}

// conformBins builds the programs (make conform) once and returns their
// directory; the test is skipped when no C compiler can be had.
var conformBuild struct {
	once sync.Once
	dir  string
	err  error
}

func conformBins(t *testing.T) string {
	t.Helper()
	conformBuild.once.Do(func() {
		root, err := filepath.Abs("..")
		if err != nil {
			conformBuild.err = err
			return
		}
		out, err := exec.Command("make", "-s", "-C", root, "conform").CombinedOutput()
		if err != nil {
			conformBuild.err = fmt.Errorf("make conform: %v\n%s", err, out)
			return
		}
		conformBuild.dir = filepath.Join(root, "bin", "conform")
	})
	if conformBuild.err != nil {
		t.Skipf("cannot build the conformance programs: %v", conformBuild.err)
	}
	return conformBuild.dir
}

// okLines parses a conformance program's log: the "ok N" counts in order
// and the FAIL lines.
func okLines(log string) (nums []int, fails []string) {
	for _, l := range strings.Split(log, "\n") {
		if rest, ok := strings.CutPrefix(l, "ok "); ok {
			if n, err := strconv.Atoi(strings.TrimSpace(rest)); err == nil {
				nums = append(nums, n)
				continue
			}
		}
		if strings.HasPrefix(l, "FAIL") {
			fails = append(fails, l)
		}
	}
	return nums, fails
}

// logTail is the part of log after "ok last", at most 10 lines.
func logTail(log string, last int) string {
	_, after, _ := strings.Cut(log, fmt.Sprintf("ok %d\n", last))
	lines := strings.Split(strings.TrimSpace(after), "\n")
	return strings.Join(lines[:min(len(lines), 10)], "\n")
}

// gap returns what is wrong with nums as one count from 1, or "".
func gap(nums []int) string {
	for i, n := range nums {
		if n != i+1 {
			return fmt.Sprintf("count goes %d -> %d (line %d): state lost or repeated", nums[max(i-1, 0)], n, i+1)
		}
	}
	return ""
}

// waitOK waits until the job's log counts past n "ok" lines, says FAIL,
// or the job is no longer running; it returns the log's counts and fails.
func (e *env) waitOK(name string, n int, d time.Duration) (nums []int, fails []string, state string) {
	deadline := time.Now().Add(d)
	for {
		r := e.ferry("logs", name)
		nums, fails = okLines(r.stdout)
		state = ""
		if v, ok := e.list()[name]; ok {
			state = v.State
		}
		if state != "running" && state != "" {
			// It ended: its last words may reach the log a moment later.
			time.Sleep(300 * time.Millisecond)
			nums, fails = okLines(e.ferry("logs", name).stdout)
		}
		if len(fails) > 0 || (len(nums) > 0 && nums[len(nums)-1] > n) || state != "running" || time.Now().After(deadline) {
			return nums, fails, state
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// freePort returns a port on the loopback (kind tcp4, tcp6, udp4 or udp6)
// that nothing uses now.
func freePort(t *testing.T, kind string) string {
	t.Helper()
	host := "127.0.0.1"
	if strings.HasSuffix(kind, "6") {
		host = "::1"
	}
	if strings.HasPrefix(kind, "udp") {
		c, err := net.ListenPacket(kind, net.JoinHostPort(host, "0"))
		if err != nil {
			t.Skipf("cannot use %s on %s: %v", kind, host, err)
		}
		defer c.Close()
		return strconv.Itoa(c.LocalAddr().(*net.UDPAddr).Port)
	}
	ln, err := net.Listen(kind, net.JoinHostPort(host, "0"))
	if err != nil {
		t.Skipf("cannot use %s on %s: %v", kind, host, err)
	}
	defer ln.Close()
	return strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
}

var conformDumps sync.Mutex

// runConform takes one case through run, checkpoint and restore, filling
// row; it returns the stage that failed ("" for none) and why.
func runConform(t *testing.T, bins string, c conformCase, row *conformRow) (stage, why string) {
	dir := t.TempDir() // made before the env, so removed after its jobs end
	e := newEnv(t)
	name := c.name()
	args := []string{"run", "--name", name, "--", filepath.Join(bins, c.prog), c.mode, dir}
	port := ""
	switch c.port {
	case "":
	case "abstract":
		port = fmt.Sprintf("ferry-conform-%d-%d", os.Getpid(), time.Now().UnixNano())
	default:
		port = freePort(t, c.port)
	}
	if port != "" {
		args = append(args, port)
	}
	if r := e.ferry(args...); r.code != 0 {
		return "run", "ferry run: " + r.String()
	}
	nums, fails, state := e.waitOK(name, 5, 20*time.Second)
	if len(fails) > 0 || len(nums) < 5 {
		return "run", fmt.Sprintf("before the checkpoint (job %s): %d ok lines, %q", state, len(nums), fails)
	}

	ckpt := filepath.Join(t.TempDir(), name+".ferry")
	// One checkpoint at a time: two CRIU dumps at once of jobs whose tasks
	// have the same pids in their namespaces collide in CRIU's parasite
	// ("Can't create a directory (-17)").
	conformDumps.Lock()
	r := e.ferry(append(append([]string{"checkpoint", "-o", ckpt}, c.flags...), name)...)
	conformDumps.Unlock()
	if r.code != 0 {
		row.checkpoint = fmt.Sprintf("exit %d", r.code)
		why := strings.TrimSpace(r.stderr)
		// A checkpoint that fails leaves the job running, its state whole.
		before := nums[len(nums)-1]
		nums, fails, state = e.waitOK(name, before+5, 20*time.Second)
		if state != "running" || len(fails) > 0 || gap(nums) != "" || len(nums) == 0 || nums[len(nums)-1] <= before+5 {
			// Not an expected failure whatever the mark says: the
			// job must come out of a failed checkpoint whole.
			return "checkpoint (and the job was not kept whole)", fmt.Sprintf("%s; afterwards the job is %s, %q %s", why, state, fails, gap(nums))
		}
		return "checkpoint", why
	}
	row.checkpoint = "yes"
	nums, _ = okLines(e.must("logs", name))
	last := nums[len(nums)-1]

	if r := e.ferry("restore", ckpt); r.code != 0 {
		row.restore = fmt.Sprintf("exit %d", r.code)
		return "restore", strings.TrimSpace(r.stderr)
	}
	row.restore = "yes"
	nums, fails, state = e.waitOK(name, last+10, 20*time.Second)
	switch {
	case len(fails) > 0:
		return "held", strings.Join(fails, "; ") + "\nlog after the restore:\n" + logTail(e.must("logs", name), last)
	case gap(nums) != "":
		return "held", gap(nums)
	case nums[len(nums)-1] <= last+10:
		return "held", fmt.Sprintf("restored job is %s and counted only from %d to %d", state, last, nums[len(nums)-1])
	case state != "running":
		return "held", "restored job is " + state
	}
	if c.after != nil {
		if why := c.after(dir, port); why != "" {
			return "held", why
		}
	}
	row.held = "yes"
	row.note = fmt.Sprintf("ok %d at checkpoint, %d after restore", last, nums[len(nums)-1])
	return "", ""
}

// TestConformSuite runs every conformance case through ferry checkpoint and
// ferry restore (two at a time) and logs a table of the results.
func TestConformSuite(t *testing.T) {
	requireRoot(t)
	requireCriu(t)
	bins := conformBins(t)
	var mu sync.Mutex
	rows := make([]*conformRow, len(conformCases))
	t.Run("case", func(t *testing.T) {
		for i, c := range conformCases {
			if c.xfailUnless != nil && c.xfailUnless() {
				c.xfail = ""
			}
			row := &conformRow{name: c.name(), state: c.state, checkpoint: "-", restore: "-", held: "-"}
			rows[i] = row
			t.Run(c.name(), func(t *testing.T) {
				t.Parallel()
				stage, why := runConform(t, bins, c, row)
				mu.Lock()
				defer mu.Unlock()
				switch {
				case c.xfail == "" && stage != "":
					row.note = "FAIL at " + stage
					t.Errorf("%s failed at %s: %s", c.name(), stage, why)
				case c.xfail != "" && stage == "":
					row.note = "XPASS"
					t.Errorf("%s is marked as an expected failure (%s) but passes: drop the mark", c.name(), c.xfail)
				case c.xfail != "" && (stage != c.xfailAt || !strings.Contains(why, c.xfailSays)):
					row.note = "FAIL at " + stage
					t.Errorf("%s was expected to fail at %s saying %q (%s), but failed at %s: %s", c.name(), c.xfailAt, c.xfailSays, c.xfail, stage, why)
				case c.xfail != "":
					row.note = "expected failure: " + c.xfail
					t.Logf("expected failure at %s: %s\n%s", stage, c.xfail, why)
				}
			})
		}
	})
	var b strings.Builder
	w := []int{len("program"), len("state"), len("checkpoint"), len("restore"), len("held")}
	for _, r := range rows {
		w[0], w[1] = max(w[0], len(r.name)), max(w[1], len(r.state))
		w[2], w[3] = max(w[2], len(r.checkpoint)), max(w[3], len(r.restore))
	}
	line := func(cols ...string) {
		fmt.Fprintf(&b, "%-*s  %-*s  %-*s  %-*s  %-*s  %s\n", w[0], cols[0], w[1], cols[1], w[2], cols[2], w[3], cols[3], w[4], cols[4], cols[5])
	}
	line("program", "state", "checkpoint", "restore", "held", "")
	for _, r := range rows {
		line(r.name, r.state, r.checkpoint, r.restore, r.held, r.note)
	}
	t.Log("conformance results:\n" + b.String())
}

// dialSays dials addr (tcp, tcp6 or unix) and returns what is wrong unless
// the first line it reads starts with want.
func dialSays(network, addr, want string) string {
	c, err := net.DialTimeout(network, addr, 5*time.Second)
	if err != nil {
		return fmt.Sprintf("restored listener on %s does not accept: %v", addr, err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	l, err := bufio.NewReader(c).ReadString('\n')
	if err != nil || !strings.HasPrefix(l, want) {
		return fmt.Sprintf("restored listener on %s answered %q, %v; want %q", addr, l, err, want)
	}
	return ""
}

// TestConformMigrate takes three representative conformance programs
// (timers and their signals, an epoll set over a pipe and an eventfd,
// memory diverged copy-on-write between two processes) through ferry
// migrate between two network namespaces, in stop-copy and, where the
// host has userfaultfd, post-copy: the destination's job must go on
// counting where the source's stopped, without FAIL.
func TestConformMigrate(t *testing.T) {
	requireCriu(t)
	bins := conformBins(t)
	h := newHosts(t)
	src, dst := newEnv(t), newEnv(t)
	token := writeToken(t, "correct horse battery staple 42")
	listen := net.JoinHostPort(h.addrB, "7090")
	dst.serve(h.b, listen, token)
	modes := []string{"stop-copy"}
	if src.lazyPages() {
		modes = append(modes, "post-copy")
	} else {
		t.Log("no userfaultfd here: post-copy not tried")
	}
	var table []string
	for _, c := range []conformCase{
		{prog: "timers", mode: "posix"}, {prog: "fds", mode: "epoll"}, {prog: "mem", mode: "cow"},
	} {
		for _, mode := range modes {
			name := c.mode + "-" + mode
			t.Run(name, func(t *testing.T) {
				dir := t.TempDir()
				if r := src.ferryIn(h.a, "run", "--name", name, "--", filepath.Join(bins, c.prog), c.mode, dir); r.code != 0 {
					t.Fatalf("run: %s", r)
				}
				nums, fails, state := src.waitOK(name, 5, 20*time.Second)
				if len(fails) > 0 || len(nums) < 5 {
					t.Fatalf("before the migration (job %s): %d ok lines, %q", state, len(nums), fails)
				}
				r := src.ferryIn(h.a, "migrate", name, "--to", listen, "--token-file", token, "--mode", mode)
				if r.code != 0 {
					table = append(table, fmt.Sprintf("%-12s %-10s migrate exit %d", c.name(), mode, r.code))
					t.Fatalf("migrate: %s", r)
				}
				nums, _ = okLines(src.must("logs", name))
				last := nums[len(nums)-1]
				if v := src.job(name); v.State != "exited" {
					t.Errorf("source job after the migration: %s", v.State)
				}
				nums, fails, state = dst.waitOK(name, last+10, 20*time.Second)
				if len(nums) > 0 && nums[0] != 1 {
					// The destination's log starts at the migration.
					if nums[0] != last+1 {
						t.Fatalf("destination counts from %d, the source stopped at %d", nums[0], last)
					}
					nums = append(make([]int, 0, last+len(nums)), nums...)
					for i := last; i >= 1; i-- {
						nums = append([]int{i}, nums...)
					}
				}
				switch {
				case len(fails) > 0:
					t.Fatalf("destination: %q", fails)
				case gap(nums) != "":
					t.Fatalf("destination: %s", gap(nums))
				case len(nums) == 0 || nums[len(nums)-1] <= last+10 || state != "running":
					t.Fatalf("destination job is %s and counted only from %d to %v", state, last, nums[len(nums)-1:])
				}
				table = append(table, fmt.Sprintf("%-12s %-10s held: ok %d at the migration, %d after", c.name(), mode, last, nums[len(nums)-1]))
				dst.must("kill", name)
			})
		}
	}
	t.Log("conformance across migration:\n" + strings.Join(table, "\n"))
}
