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
	"testing"
	"time"
)

// workloadBin is test/workload, built once per test binary.
var workloadBin string

func buildWorkload(t *testing.T) string {
	t.Helper()
	if workloadBin != "" {
		return workloadBin
	}
	dir, err := os.MkdirTemp("", "ferry-workload-")
	if err != nil {
		t.Fatal(err)
	}
	// Not t.TempDir: restores of the workload need the binary to stay at
	// the same path for the whole test binary's life.
	bin := filepath.Join(dir, "workload")
	cmd := exec.Command("go", "build", "-o", bin, "./workload")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building workload: %v\n%s", err, out)
	}
	workloadBin = bin
	return bin
}

// lines returns the log lines of job name that start with prefix, with the
// prefix cut off.
func (e *env) lines(name, prefix string) []string {
	e.t.Helper()
	var out []string
	for _, l := range strings.Split(e.must("logs", name), "\n") {
		if rest, ok := strings.CutPrefix(l, prefix); ok {
			out = append(out, rest)
		}
	}
	return out
}

// checkpointRestore checkpoints job name (ending it), restores it and
// returns the number of matching log lines there were at the checkpoint.
func (e *env) checkpointRestore(name, prefix string, flags ...string) int {
	e.t.Helper()
	return len(e.checkpointRestoreLines(name, prefix, flags...))
}

// checkpointRestoreLines is checkpointRestore returning the lines logged
// up to the checkpoint.
func (e *env) checkpointRestoreLines(name, prefix string, flags ...string) []string {
	e.t.Helper()
	// The main format: CRIU streams into a .ferry, restore serves it back.
	ckpt := filepath.Join(e.t.TempDir(), name+".ferry")
	e.must(append(append([]string{"checkpoint", "-o", ckpt}, flags...), name)...)
	lines := e.lines(name, prefix)
	e.must("restore", ckpt)
	return lines
}

// waitLines waits until job name has logged at least n lines with prefix.
func (e *env) waitLines(name, prefix string, n int) {
	e.t.Helper()
	eventually(e.t, 20*time.Second, fmt.Sprintf("%d %q lines from %s", n, prefix, name), func() bool {
		return len(e.lines(name, prefix)) >= n
	})
}

// lastFields parses the space-separated integers of the last line with prefix.
func (e *env) lastInts(name, prefix string) []int {
	e.t.Helper()
	ls := e.lines(name, prefix)
	if len(ls) == 0 {
		e.t.Fatalf("no %q line from %s", prefix, name)
	}
	var out []int
	for _, f := range strings.Fields(ls[len(ls)-1]) {
		n, err := strconv.Atoi(f)
		if err != nil {
			e.t.Fatalf("line %q: %v", ls[len(ls)-1], err)
		}
		out = append(out, n)
	}
	return out
}

func (e *env) noErrors(name string) {
	e.t.Helper()
	if log := e.must("logs", name); strings.Contains(log, "workload:") {
		e.t.Fatalf("workload %s reported a problem:\n%s", name, log)
	}
}

func TestWorkloadMemory256MiB(t *testing.T) {
	e := newEnv(t)
	requireCriu(t)
	w := buildWorkload(t)
	e.must("run", "--name", "mem", "--", w, "memory", "256")
	e.waitLines("mem", "sum ", 1)
	sum := e.lines("mem", "sum ")[0]
	e.checkpointRestore("mem", "verify ")
	n := len(e.lines("mem", "verify "))
	e.waitLines("mem", "verify ", n+2)
	for _, l := range e.lines("mem", "verify ")[n:] {
		if f := strings.Fields(l); len(f) != 2 || f[1] != sum {
			t.Fatalf("after restore: verify %q, want sum %s", l, sum)
		}
	}
}

func TestWorkloadPipesAndSocketpair(t *testing.T) {
	e := newEnv(t)
	requireCriu(t)
	w := buildWorkload(t)
	e.must("run", "--name", "ring", "--", w, "pipes")
	e.waitLines("ring", "seq ", 10)
	at := e.checkpointRestore("ring", "seq ")
	e.waitLines("ring", "seq ", at+10)
	e.noErrors("ring")
	var prev int
	for i, l := range e.lines("ring", "seq ") {
		n, _ := strconv.Atoi(l)
		if i > 0 && n != prev+4 {
			t.Fatalf("sequence goes %d -> %d at line %d (checkpoint after %d)", prev, n, i, at)
		}
		prev = n
	}
	if v := e.job("ring"); v.Tasks != 5 {
		t.Errorf("restored tree has %d tasks, want 5 (init, parent, 3 stages)", v.Tasks)
	}
}

func TestWorkloadThreads(t *testing.T) {
	e := newEnv(t)
	requireCriu(t)
	w := buildWorkload(t)
	e.must("run", "--name", "thr", "--", w, "threads", "4")
	e.waitLines("thr", "threads ", 5)
	before := e.lastInts("thr", "threads ")
	at := e.checkpointRestore("thr", "threads ")
	e.waitLines("thr", "threads ", at+5)
	after := e.lastInts("thr", "threads ")
	for i := range before {
		if after[i] <= before[i] {
			t.Fatalf("thread %d counter %d after restore, %d before: reset or stuck", i, after[i], before[i])
		}
	}
}

func TestWorkloadTimerSignals(t *testing.T) {
	e := newEnv(t)
	requireCriu(t)
	w := buildWorkload(t)
	e.must("run", "--name", "tmr", "--", w, "timer")
	e.waitLines("tmr", "ticks ", 5)
	before := e.checkpointRestoreLines("tmr", "ticks ")
	at := len(before)
	last, _ := strconv.Atoi(before[at-1])
	e.waitLines("tmr", "ticks ", at+5)
	ticks := e.lines("tmr", "ticks ")
	first, _ := strconv.Atoi(ticks[at])
	if first != last+10 {
		t.Fatalf("first tick report after restore %d, want %d: the timer or its handler did not carry over", first, last+10)
	}
}

func TestWorkloadSysVIPC(t *testing.T) {
	e := newEnv(t)
	requireCriu(t)
	w := buildWorkload(t)
	e.must("run", "--name", "ipc", "--", w, "sysv")
	e.waitLines("ipc", "sysv ok ", 5)
	at := e.checkpointRestore("ipc", "sysv ok ")
	e.waitLines("ipc", "sysv ok ", at+10)
	e.noErrors("ipc")
}

func TestWorkloadFileMapping(t *testing.T) {
	e := newEnv(t)
	requireCriu(t)
	w := buildWorkload(t)
	data := make([]byte, 4096)
	for i := range data {
		data[i] = byte(i % 251)
	}
	path := filepath.Join(t.TempDir(), "data")
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	e.must("run", "--name", "fmap", "--", w, "file", path)
	e.waitLines("fmap", "file ", 10)
	before := e.checkpointRestoreLines("fmap", "file ")
	at := len(before)
	lastOff, _ := strconv.Atoi(strings.Fields(before[at-1])[1])
	e.waitLines("fmap", "file ", at+5)
	next := e.lines("fmap", "file ")[at]
	f := strings.Fields(next)
	off, _ := strconv.Atoi(f[1])
	if off != lastOff+1 {
		t.Fatalf("file offset after restore %d, want %d", off, lastOff+1)
	}
	e.noErrors("fmap")
}

func TestWorkloadTCP(t *testing.T) {
	e := newEnv(t)
	requireCriu(t)
	w := buildWorkload(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
	ln.Close()
	e.must("run", "--name", "tcp", "--", w, "tcp", port)
	e.waitLines("tcp", "echo ", 5)
	at := e.checkpointRestore("tcp", "echo ", "--tcp-established")
	e.waitLines("tcp", "echo ", at+5)
	e.noErrors("tcp")
	// The established client connection carried on: its count continues.
	ls := e.lines("tcp", "echo ")
	prev := strings.Fields(ls[at-1])
	next := strings.Fields(ls[at])
	if p, _ := strconv.Atoi(prev[0]); strconv.Itoa(p+1) != next[0] {
		t.Fatalf("client count %s then %s across the restore", prev[0], next[0])
	}
	// The listening socket answers a new client.
	c, err := net.DialTimeout("tcp", "127.0.0.1:"+port, 5*time.Second)
	if err != nil {
		t.Fatalf("restored server does not accept: %v", err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(c, "ping\n")
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "pong ") {
		t.Fatalf("restored server answered %q, %v", line, err)
	}
}
