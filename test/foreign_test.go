package test

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// foreignTree starts a counter that ferry did not start: a session of its
// own, its output on a pipe this test reads. It returns the pid and a
// function giving the numbers read so far.
func foreignTree(t *testing.T) (int, func() []int) {
	return foreignTreeIn(t, nil)
}

// foreignTreeIn is foreignTree started inside the cgroup open as cg.
func foreignTreeIn(t *testing.T, cg *os.File) (int, func() []int) {
	t.Helper()
	return foreignTreeRun(t, cg, "sh", "-c", counter)
}

// foreignTreeRun is foreignTreeIn of the command argv, which prints the
// counter's numbers.
func foreignTreeRun(t *testing.T, cg *os.File, argv ...string) (int, func() []int) {
	t.Helper()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if cg != nil {
		cmd.SysProcAttr.UseCgroupFD = true
		cmd.SysProcAttr.CgroupFD = int(cg.Fd())
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var nums []int
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			n, _ := strconv.Atoi(sc.Text())
			mu.Lock()
			nums = append(nums, n)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		// Make sure to not leave a zombie: the tree is ours.
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGCONT)
		_ = cmd.Wait()
	})
	return cmd.Process.Pid, func() []int {
		mu.Lock()
		defer mu.Unlock()
		return append([]int(nil), nums...)
	}
}

func TestForeignTree(t *testing.T) {
	e := newEnv(t)
	requireCriu(t)
	pid, read := foreignTree(t)
	eventually(t, 10*time.Second, "foreign counter", func() bool { return len(read()) >= 10 })

	d := e.must("checkpoint", "--pid", strconv.Itoa(pid), "--dry-run")
	if !strings.Contains(d, "checkpointable: yes") {
		t.Fatalf("dry run of the foreign tree:\n%s", d)
	}
	ckpt := filepath.Join(t.TempDir(), "foreign.ckpt")
	out := e.must("checkpoint", "--pid", strconv.Itoa(pid), "--leave-running", "-o", ckpt)
	if !strings.Contains(out, "still running") {
		t.Errorf("summary: %s", out)
	}
	// The original keeps counting after a --leave-running checkpoint...
	n := len(read())
	eventually(t, 10*time.Second, "original to go on", func() bool { return len(read()) > n+5 })
	// ...and holds its pid while the copy is restored, in a fresh PID
	// namespace under ferry's init, with that same pid inside.
	name := strings.TrimSpace(e.must("restore", "--name", "copy", ckpt))
	if name != "copy" {
		t.Fatalf("restore printed %q", name)
	}
	var v jobView
	eventually(t, 10*time.Second, "restored main", func() bool { v = e.job("copy"); return v.MainPID > 0 })
	if got := nspid(t, v.MainPID); got[len(got)-1] != pid || got[0] == pid {
		t.Errorf("restored tree NSpid = %v, want %d inside a namespace of its own", got, pid)
	}
	if got := nspid(t, v.InitPID); got[len(got)-1] != 1 {
		t.Errorf("restored job's init NSpid = %v, want 1", got)
	}
	if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err != nil {
		t.Fatalf("original tree gone: %v", err)
	}
	eventually(t, 10*time.Second, "copy to count", func() bool { return e.logLines("copy") >= 10 })
	copyNums := numbers(t, e.must("logs", "copy"))
	assertConsecutive(t, copyNums)
	orig := read()
	if copyNums[0] < 10 || copyNums[0] > orig[len(orig)-1] {
		t.Fatalf("copy starts at %d; the original was at %d at most", copyNums[0], orig[len(orig)-1])
	}

	// The copy is an ordinary job: freeze, thaw, checkpoint again (ending
	// it), restore again, and it counts on.
	e.must("freeze", "copy")
	e.must("thaw", "copy")
	ckpt2 := filepath.Join(t.TempDir(), "copy.ferry") // streamed, CRIU inside the job's namespaces
	e.must("checkpoint", "-o", ckpt2, "copy")
	at := e.logLines("copy")
	e.must("restore", ckpt2)
	eventually(t, 10*time.Second, "second copy to count", func() bool { return e.logLines("copy") >= at+10 })
	assertConsecutive(t, numbers(t, e.must("logs", "copy")))
	v = e.job("copy")
	eventually(t, 5*time.Second, "main", func() bool { v = e.job("copy"); return v.MainPID > 0 })
	if got := nspid(t, v.MainPID); got[len(got)-1] != pid {
		t.Errorf("after the second restore NSpid = %v, want %d inside", got, pid)
	}

	// Checkpoint without --leave-running ends the foreign original.
	ckpt3 := filepath.Join(t.TempDir(), "orig.ckpt")
	e.must("checkpoint", "--pid", strconv.Itoa(pid), "-o", ckpt3)
	eventually(t, 5*time.Second, "original to end", func() bool {
		data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		return err != nil || strings.Contains(string(data), ") Z ")
	})
}

func TestCheckpointBadPid(t *testing.T) {
	e := newEnv(t)
	requireCriu(t)
	dir := t.TempDir()
	self := exec.Command("sh", "-c", `exec "$0" --root "$1" checkpoint --pid $$ -o "$2"`, ferryBin, e.root, filepath.Join(dir, "self"))
	selfOut, err := self.CombinedOutput()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	}
	if code != 18 || !strings.Contains(string(selfOut), "ferry itself") {
		t.Errorf("checkpoint of ferry's own pid: exit %d %s", code, selfOut)
	}
	for _, tc := range []struct {
		name string
		pid  string
		code int
		want string
	}{
		{"pid 1", "1", 18, "host's init"},
		{"kernel thread", "2", 18, "kernel thread"},
		{"no such process", "999999999", 4, "no such process"},
		{"our own test process", strconv.Itoa(os.Getpid()), 18, "ancestors"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := e.ferry("checkpoint", "--pid", tc.pid, "-o", filepath.Join(dir, tc.name))
			if r.code != tc.code || !strings.Contains(r.stderr, tc.want) {
				t.Fatalf("%s\nwant exit %d and %q", r, tc.code, tc.want)
			}
		})
	}
	if r := e.ferry("checkpoint", "--pid", "5", "somejob"); r.code != 2 {
		t.Errorf("JOB and --pid together: %s, want exit 2", r)
	}
}

// TestForeignTreeInItsOwnCgroup: a foreign tree that is exactly its
// cgroup is stopped with the cgroup freezer, not by CRIU's ptrace.
func TestForeignTreeInItsOwnCgroup(t *testing.T) {
	e := newEnv(t)
	requireCriu(t)
	dir, cg := testCgroup(t)
	pid, read := foreignTreeIn(t, cg)
	eventually(t, 10*time.Second, "foreign counter", func() bool { return len(read()) >= 5 })
	ckpt := filepath.Join(t.TempDir(), "cg.ckpt")
	out := e.must("checkpoint", "--pid", strconv.Itoa(pid), "--leave-running", "--json", "-o", ckpt)
	if !strings.Contains(out, `"stoppedBy": "cgroup freezer"`) {
		t.Fatalf("checkpoint of a tree that is its whole cgroup did not use the freezer:\n%s", out)
	}
	if st, _ := os.ReadFile(filepath.Join(dir, "cgroup.freeze")); strings.TrimSpace(string(st)) != "0" {
		t.Fatalf("cgroup left frozen after --leave-running: %q", st)
	}
	n := len(read())
	eventually(t, 10*time.Second, "original to go on", func() bool { return len(read()) > n+5 })
	e.must("restore", "--name", "cgcopy", ckpt)
	eventually(t, 10*time.Second, "copy to count", func() bool { return e.logLines("cgcopy") >= 5 })
	assertConsecutive(t, numbers(t, e.must("logs", "cgcopy")))
	// The same tree seen as part of a larger cgroup is seized by CRIU.
	pid2, read2 := foreignTree(t)
	eventually(t, 10*time.Second, "second counter", func() bool { return len(read2()) >= 5 })
	out = e.must("checkpoint", "--pid", strconv.Itoa(pid2), "--leave-running", "--json", "-o", filepath.Join(t.TempDir(), "x.ckpt"))
	if !strings.Contains(out, `"stoppedBy": "criu"`) {
		t.Fatalf("checkpoint of a tree sharing its cgroup did not let CRIU seize it:\n%s", out)
	}
	n = len(read2())
	eventually(t, 10*time.Second, "second original to go on", func() bool { return len(read2()) > n+5 })
}

// testCgroup makes a v2 cgroup of the test's own (skipping without v2)
// and opens it; the cleanup removes it.
func testCgroup(t *testing.T) (string, *os.File) {
	t.Helper()
	base := "/sys/fs/cgroup/unified"
	if _, err := os.Stat(filepath.Join(base, "cgroup.procs")); err != nil {
		base = "/sys/fs/cgroup"
	}
	if _, err := os.Stat(filepath.Join(base, "cgroup.subtree_control")); err != nil {
		t.Skip("needs cgroup v2")
	}
	testCgroupSeq++
	dir := filepath.Join(base, fmt.Sprintf("ferry-test-%d-%d", os.Getpid(), testCgroupSeq))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for range 50 {
			if err := os.Remove(dir); err == nil || os.IsNotExist(err) {
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
		t.Errorf("could not remove test cgroup %s", dir)
	})
	cg, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cg.Close() })
	return dir, cg
}

var testCgroupSeq int
