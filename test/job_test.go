package test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// ticker prints a line every 50 ms, forever.
const ticker = `i=0; while :; do i=$((i+1)); echo "tick $i"; sleep 0.05; done`

func (e *env) logLines(name string) int {
	e.t.Helper()
	return strings.Count(e.must("logs", name), "\n")
}

func nsInode(t *testing.T, pid int, ns string) string {
	t.Helper()
	l, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/%s", pid, ns))
	if err != nil {
		t.Fatalf("reading %s namespace of %d: %v", ns, pid, err)
	}
	return l
}

func nspid(t *testing.T, pid int) []int {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, "NSpid:"); ok {
			var pids []int
			for _, f := range strings.Fields(rest) {
				n, _ := strconv.Atoi(f)
				pids = append(pids, n)
			}
			return pids
		}
	}
	t.Fatalf("no NSpid for %d", pid)
	return nil
}

func TestRunFreezeThawKill(t *testing.T) {
	e := newEnv(t)
	out := e.must("run", "--name", "t1", "--", "sh", "-c", ticker)
	if strings.TrimSpace(out) != "t1" {
		t.Fatalf("ferry run printed %q, want the job name", out)
	}
	v := e.job("t1")
	if v.State != "running" || v.InitPID <= 0 {
		t.Fatalf("job after run: %+v", v)
	}
	eventually(t, 5*time.Second, "main process", func() bool { v = e.job("t1"); return v.MainPID > 0 })

	// ferry's init is pid 1 of a fresh PID namespace, the command pid 2,
	// and both have a PID and IPC namespace of their own.
	if got := nspid(t, v.InitPID); got[len(got)-1] != 1 {
		t.Errorf("init NSpid = %v, want pid 1 inside", got)
	}
	// The command is a child of init inside the namespace (its pid there
	// is small but not 2: the Go runtime's threads in init take pids too).
	if got := nspid(t, v.MainPID); len(got) < 2 || got[len(got)-1] <= 1 || got[0] != v.MainPID {
		t.Errorf("main NSpid = %v, want a pid inside the job's namespace", got)
	}
	for _, ns := range []string{"pid", "ipc"} {
		if nsInode(t, v.MainPID, ns) == nsInode(t, os.Getpid(), ns) {
			t.Errorf("job shares the host's %s namespace", ns)
		}
	}
	// Session leader of its namespace: sid == pid for the init.
	if sid, err := unix.Getsid(v.InitPID); err != nil || sid != v.InitPID {
		t.Errorf("init sid = %d (%v), want %d", sid, err, v.InitPID)
	}
	// It runs in its own cgroup, which holds exactly the job.
	procs, err := os.ReadFile(filepath.Join(v.Cgroup, "cgroup.procs"))
	if err != nil {
		t.Fatal(err)
	}
	pids := strings.Fields(string(procs))
	if !slices.Contains(pids, strconv.Itoa(v.InitPID)) || !slices.Contains(pids, strconv.Itoa(v.MainPID)) {
		t.Errorf("cgroup %s holds %v, want init %d and main %d", v.Cgroup, pids, v.InitPID, v.MainPID)
	}
	if v.RSS <= 0 {
		t.Errorf("RSS of running job = %d", v.RSS)
	}

	eventually(t, 5*time.Second, "log output", func() bool { return e.logLines("t1") >= 3 })

	// Frozen: the log stops growing.
	e.must("freeze", "t1")
	if s := e.job("t1").State; s != "frozen" {
		t.Fatalf("state after freeze = %q", s)
	}
	before := e.logLines("t1")
	time.Sleep(400 * time.Millisecond)
	if after := e.logLines("t1"); after != before {
		t.Fatalf("log grew from %d to %d lines while frozen", before, after)
	}
	// Thawed: it grows again, continuing the count.
	e.must("thaw", "t1")
	if s := e.job("t1").State; s != "running" {
		t.Fatalf("state after thaw = %q", s)
	}
	eventually(t, 5*time.Second, "log to grow after thaw", func() bool { return e.logLines("t1") > before+2 })
	logs := e.must("logs", "t1")
	if !strings.Contains(logs, fmt.Sprintf("tick %d\n", before+1)) {
		t.Errorf("count did not continue after thaw: no \"tick %d\" in log", before+1)
	}

	e.must("kill", "--grace", "2s", "t1")
	v2 := e.job("t1")
	if v2.State != "exited" || v2.Exit == nil || v2.Exit.Reason != "killed" {
		t.Fatalf("job after kill: %+v exit %+v", v2, v2.Exit)
	}
	for _, pid := range []int{v.InitPID, v.MainPID} {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d/cgroup", pid)); err == nil {
			if data, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); !strings.Contains(string(data), ") Z") {
				t.Errorf("process %d still exists after kill", pid)
			}
		}
	}
	if _, err := os.Stat(v.Cgroup); !os.IsNotExist(err) {
		t.Errorf("cgroup %s still exists after kill (%v)", v.Cgroup, err)
	}
	// Killing it again says it is not running.
	if r := e.ferry("kill", "t1"); r.code != 10 {
		t.Errorf("second kill: %s, want exit 10", r)
	}
}

func TestSignalForwardingAndExitStatus(t *testing.T) {
	e := newEnv(t)
	e.must("run", "--name", "trap", "--", "sh", "-c", `trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 0.05; done`)
	eventually(t, 5*time.Second, "job ready", func() bool { return strings.Contains(e.must("logs", "trap"), "ready") })
	e.must("kill", "--grace", "5s", "trap")
	v := e.job("trap")
	if v.Exit == nil || v.Exit.Code != 7 {
		t.Fatalf("exit after SIGTERM: %+v, want the job's own status 7", v.Exit)
	}
	if !strings.Contains(e.must("logs", "trap"), "got-term") {
		t.Error("the job's TERM handler did not run: init did not forward SIGTERM")
	}

	// A job that ends by itself: its status is recorded and its cgroup removed.
	e.must("run", "--name", "three", "--", "sh", "-c", "echo bye; exit 3")
	eventually(t, 5*time.Second, "job to exit", func() bool { return e.job("three").State == "exited" })
	v = e.job("three")
	if v.Exit == nil || v.Exit.Code != 3 {
		t.Fatalf("exit status = %+v, want 3", v.Exit)
	}
	eventually(t, 5*time.Second, "cgroup removal", func() bool { _, err := os.Stat(v.Cgroup); return os.IsNotExist(err) })
	if !strings.Contains(e.ferry("list").stdout, "exited (status 3)") {
		t.Errorf("ferry list does not show the exit status:\n%s", e.ferry("list").stdout)
	}

	// A job that ignores SIGTERM is SIGKILLed after the grace period.
	e.must("run", "--name", "stubborn", "--", "sh", "-c", `trap '' TERM; while :; do sleep 0.05; done`)
	start := time.Now()
	e.must("kill", "--grace", "500ms", "stubborn")
	if d := time.Since(start); d < 500*time.Millisecond {
		t.Errorf("kill returned after %s, before the grace period", d)
	}
	if v := e.job("stubborn"); v.State != "exited" || v.Exit == nil || v.Exit.Signal != "SIGKILL" {
		t.Errorf("stubborn job after kill: %+v %+v", v, v.Exit)
	}
}

func TestInitReapsOrphans(t *testing.T) {
	e := newEnv(t)
	// Each subshell's sleep is orphaned at once and reparented to init.
	e.must("run", "--name", "orphans", "--", "sh", "-c", `for i in 1 2 3 4 5 6; do (sleep 0.1 &); done; echo spawned; sleep 100`)
	eventually(t, 5*time.Second, "orphans spawned", func() bool { return strings.Contains(e.must("logs", "orphans"), "spawned") })
	v := e.job("orphans")
	// Orphans are reparented to init; once they exit, init must reap them.
	// A zombie drops out of cgroup.procs, so look at init's children.
	var kids []string
	eventually(t, 5*time.Second, "orphans reaped", func() bool {
		kids = nil
		tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", v.InitPID))
		for _, task := range tasks {
			data, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/children", v.InitPID, task.Name()))
			kids = append(kids, strings.Fields(string(data))...)
		}
		for _, p := range kids {
			stat, _ := os.ReadFile("/proc/" + p + "/stat")
			if strings.Contains(string(stat), ") Z ") {
				return false
			}
		}
		return len(kids) == 1 // the main sh; the six orphans are gone
	})
	if kids[0] != strconv.Itoa(e.job("orphans").MainPID) {
		t.Errorf("init's child %s is not the main process", kids[0])
	}
}

func TestBadInput(t *testing.T) {
	e := newEnv(t)
	for _, tc := range []struct {
		name string
		args []string
		code int
		want string
	}{
		{"unknown job logs", []string{"logs", "nope"}, 4, "no such job"},
		{"unknown job kill", []string{"kill", "nope"}, 4, "no such job"},
		{"unknown job freeze", []string{"freeze", "nope"}, 4, "no such job"},
		{"invalid name", []string{"run", "--name", "../x", "--", "true"}, 5, "invalid job name"},
		{"command not found", []string{"run", "--name", "nf", "--", "/no/such/cmd"}, 6, "command not found"},
		{"no command", []string{"run", "--name", "x"}, 2, "no command"},
		{"extra args", []string{"freeze", "a", "b"}, 2, "want JOB"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := e.ferry(tc.args...)
			if r.code != tc.code || !strings.Contains(r.stderr, tc.want) {
				t.Fatalf("%s\nwant exit %d and %q on stderr", r, tc.code, tc.want)
			}
			if lines := strings.Count(strings.TrimSpace(r.stderr), "\n"); lines != 0 {
				t.Errorf("stderr has %d lines, want one:\n%s", lines+1, r.stderr)
			}
		})
	}
	// Nothing left behind by the failed starts.
	entries, _ := os.ReadDir(filepath.Join(e.root, "jobs"))
	if len(entries) != 0 {
		t.Errorf("failed runs left job directories: %v", entries)
	}

	// A duplicate name is refused and the first job is untouched.
	e.must("run", "--name", "dup", "--", "sh", "-c", ticker)
	first := e.job("dup")
	if r := e.ferry("run", "--name", "dup", "--", "true"); r.code != 5 || !strings.Contains(r.stderr, "already in use") {
		t.Fatalf("duplicate run: %s", r)
	}
	if v := e.job("dup"); v.State != "running" || v.InitPID != first.InitPID {
		t.Fatalf("first job changed after duplicate run: %+v", v)
	}

	// Not root.
	cmd := exec.Command("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", ferryBin, "--root", t.TempDir(), "run", "--", "true")
	out, err := cmd.CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 3 || !strings.Contains(string(out), "root") {
		t.Errorf("run as nobody: %v %s, want exit 3", err, out)
	}

	// No usable cgroup hierarchy: nothing is started or left behind.
	empty := t.TempDir()
	r := e.ferryEnv([]string{"FERRY_CGROUP_ROOT=" + empty}, "run", "--name", "nocg", "--", "true")
	if r.code != 8 || !strings.Contains(r.stderr, "cgroup") {
		t.Errorf("run without cgroups: %s, want exit 8", r)
	}
	if _, err := os.Stat(filepath.Join(e.root, "jobs", "nocg")); !os.IsNotExist(err) {
		t.Errorf("run without cgroups left a job directory")
	}
}

func TestLogsFollowAndListAlias(t *testing.T) {
	e := newEnv(t)
	e.must("run", "--name", "short", "--", "sh", "-c", `for i in 1 2 3 4 5; do echo "line $i"; sleep 0.1; done`)
	// logs -f returns by itself once the job has ended, with every line.
	out := e.must("logs", "-f", "short")
	for i := 1; i <= 5; i++ {
		if !strings.Contains(out, fmt.Sprintf("line %d\n", i)) {
			t.Fatalf("logs -f output lacks line %d:\n%s", i, out)
		}
	}
	if !strings.Contains(e.must("ps"), "short") {
		t.Error("ferry ps does not list the job")
	}
	// FERRY_ROOT selects the state directory like --root.
	cmd := exec.Command(ferryBin, "list")
	cmd.Env = append(os.Environ(), "FERRY_ROOT="+e.root)
	if got, err := cmd.Output(); err != nil || !strings.Contains(string(got), "short") {
		t.Errorf("list with FERRY_ROOT: %v %s", err, got)
	}
	e.must("rm", "short")
	if _, ok := e.list()["short"]; ok {
		t.Error("rm left the job")
	}
}

func TestUsageErrors(t *testing.T) {
	e := newEnv(t)
	for _, args := range [][]string{{"bogus"}, {"list", "--bogus"}, {"logs"}, {"--log-format", "xml", "list"}} {
		if r := e.ferry(args...); r.code != 2 {
			t.Errorf("ferry %v: %s, want exit 2", args, r)
		}
	}
}

// TestSmallInit: a job's pid 1 is ferry's small C init (bin/ferry-init,
// beside the binary under test), not the Go binary: it reserves no large
// address space for CRIU to walk, and it still forwards signals and
// reports the command's status (TestSignalForwardingAndExitStatus).
func TestSmallInit(t *testing.T) {
	e := newEnv(t)
	small := filepath.Join(filepath.Dir(ferryBin), "ferry-init")
	if _, err := os.Stat(small); err != nil {
		t.Skipf("no %s beside the binary under test (make build makes it): %v", small, err)
	}
	e.must("run", "--name", "si", "--", "sleep", "60")
	var v jobView
	eventually(t, 5*time.Second, "the job's main process", func() bool { v = e.job("si"); return v.MainPID > 0 })
	exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", v.InitPID))
	if err != nil || exe != small {
		t.Fatalf("the job's init is %q (%v), want %s", exe, err, small)
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", v.InitPID))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(status), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmSize:" {
			if kb, _ := strconv.Atoi(f[1]); kb > 16<<10 {
				t.Errorf("the init's address space is %d KiB, want a small process", kb)
			}
		}
	}
	// Only fds 0, 1 and 2 reach the command.
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", v.MainPID))
	if err != nil {
		t.Fatal(err)
	}
	if len(fds) != 3 {
		names := []string{}
		for _, f := range fds {
			names = append(names, f.Name())
		}
		t.Errorf("the command holds fds %v, want 0 1 2", names)
	}
}
