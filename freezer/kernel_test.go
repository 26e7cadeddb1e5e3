package freezer

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Tests against the real kernel. They need root and a cgroup hierarchy with
// a freezer, create their cgroups as ferry-test-<pid>-<random> at the top of
// the hierarchy, and remove them and every process they start in
// t.Cleanup.

const cgroupfs = "/sys/fs/cgroup"

func requireRoot(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("skipped in -short mode: needs root and the kernel's cgroupfs")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates cgroups under " + cgroupfs)
	}
}

func isFS(dir string, magic int64) bool {
	var st unix.Statfs_t
	return unix.Statfs(dir, &st) == nil && st.Type == magic
}

// requireCgroupV1 returns the v1 freezer hierarchy, or skips.
func requireCgroupV1(t *testing.T) string {
	t.Helper()
	requireRoot(t)
	dir := filepath.Join(cgroupfs, "freezer")
	if !isFS(dir, unix.CGROUP_SUPER_MAGIC) {
		t.Skip("no cgroup v1 freezer hierarchy at " + dir)
	}
	return dir
}

// requireCgroupV2 returns the cgroup2 mount (/sys/fs/cgroup on a unified
// host, /sys/fs/cgroup/unified on a hybrid one), or skips. Whether
// cgroup.freeze exists is checked on the test's own child cgroup.
func requireCgroupV2(t *testing.T) string {
	t.Helper()
	requireRoot(t)
	for _, dir := range []string{cgroupfs, filepath.Join(cgroupfs, "unified")} {
		if isFS(dir, unix.CGROUP2_SUPER_MAGIC) {
			return dir
		}
	}
	t.Skip("no cgroup2 mount at " + cgroupfs + " or " + cgroupfs + "/unified")
	return ""
}

// newTestCgroup creates a cgroup under parent, removed again in cleanup.
func newTestCgroup(t *testing.T, parent, name string) string {
	t.Helper()
	if name == "" {
		name = fmt.Sprintf("ferry-test-%d-%08x", os.Getpid(), rand.Uint32())
	}
	dir := filepath.Join(parent, name)
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rmdirCgroup(t, dir) })
	if _, err := Version(dir); errors.Is(err, ErrNotSupported) {
		t.Skipf("%s has no freezer (kernel %s): %v", dir, kernelRelease(), err)
	}
	return dir
}

// rmdirCgroup removes a cgroup, retrying while the kernel still counts an
// exiting task (EBUSY).
func rmdirCgroup(t *testing.T, dir string) {
	t.Helper()
	var err error
	for range 100 {
		err = unix.Rmdir(dir)
		if err == nil || errors.Is(err, unix.ENOENT) {
			return
		}
		if !errors.Is(err, unix.EBUSY) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Errorf("removing test cgroup %s: %v", dir, err)
}

// forceThaw thaws dir by writing the control file directly, without the
// code under test; errors are ignored (cleanup, best effort).
func forceThaw(dir string) {
	_ = os.WriteFile(filepath.Join(dir, "freezer.state"), []byte("THAWED"), 0)
	_ = os.WriteFile(filepath.Join(dir, "cgroup.freeze"), []byte("0"), 0)
}

// startIn starts a command, moves it into the cgroup dir, and returns its
// pid. Cleanup thaws dir and thawDirs (SIGKILL does nothing to a frozen v1
// task until it is thawed), kills the process and waits for it.
func startIn(t *testing.T, dir string, thawDirs []string, name string, args ...string) int {
	t.Helper()
	cmd := exec.Command(name, args...)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	t.Cleanup(func() {
		thawDirs := append([]string{dir}, thawDirs...)
		for _, d := range thawDirs {
			forceThaw(d)
		}
		_ = cmd.Process.Kill()
		for _, d := range thawDirs {
			forceThaw(d)
		}
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Errorf("process %d (%s) did not exit after SIGKILL", pid, name)
		}
	})
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0); err != nil {
		t.Fatalf("moving pid %d into %s: %v", pid, dir, err)
	}
	return pid
}

// startCounter starts a shell that counts as fast as it can into a file
// and moves it into the cgroup dir (see startIn); it returns the file and
// the shell's pid.
func startCounter(t *testing.T, dir string, thawDirs ...string) (string, int) {
	t.Helper()
	counter := filepath.Join(t.TempDir(), "counter")
	pid := startIn(t, dir, thawDirs, "/bin/sh", "-c", `i=0; while :; do i=$((i+1)); echo $i > "$1"; done`, "sh", counter)
	return counter, pid
}

// counterMoves reports whether the counter file changes within d.
func counterMoves(t *testing.T, counter string, d time.Duration) bool {
	t.Helper()
	first, _ := os.ReadFile(counter)
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
		if now, _ := os.ReadFile(counter); !bytes.Equal(now, first) {
			return true
		}
	}
	return false
}

func procField(pid int, name string) string {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/%s", pid, name))
	if err != nil {
		return "(" + err.Error() + ")"
	}
	return string(bytes.TrimSpace(data))
}

func kernelRelease() string {
	var u unix.Utsname
	if unix.Uname(&u) != nil {
		return "unknown"
	}
	return unix.ByteSliceToString(u.Release[:])
}

func TestKernelFreezeV1(t *testing.T) {
	testKernelFreeze(t, requireCgroupV1(t), 1)
}

func TestKernelFreezeV2(t *testing.T) {
	testKernelFreeze(t, requireCgroupV2(t), 2)
}

func testKernelFreeze(t *testing.T, base string, version int) {
	dir := newTestCgroup(t, base, "")
	if v, err := Version(dir); err != nil || v != version {
		t.Fatalf("Version(%s) = %d, %v; want %d", dir, v, err, version)
	}
	counter, pid := startCounter(t, dir)
	// Sleepers: a v1 freezer since Linux 6.1 freezes these in place
	// rather than in __refrigerator, which the not-frozen heuristic must
	// know about.
	sleeper := startIn(t, dir, nil, "sleep", "100")
	stopped := startIn(t, dir, nil, "sleep", "100")
	if err := unix.Kill(stopped, unix.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	if !counterMoves(t, counter, 2*time.Second) {
		t.Fatal("the counter does not run before freezing")
	}
	if s, err := GetState(dir); err != nil || s != Thawed {
		t.Fatalf("GetState before Freeze = %q, %v; want THAWED", s, err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	if err := Freeze(ctx, dir); err != nil {
		t.Fatalf("Freeze: %v", err)
	}
	t.Logf("v%d: froze in %v; pid %d: %s, wchan %s", version, time.Since(start), pid,
		procStatusState(pid), procField(pid, "wchan"))
	if s, err := GetState(dir); err != nil || s != Frozen {
		t.Errorf("GetState after Freeze = %q, %v; want FROZEN", s, err)
	}
	if counterMoves(t, counter, 200*time.Millisecond) {
		t.Error("the counter still moves after Freeze")
	}
	if tasks := unfrozenTasks(dir, version); len(tasks) != 0 {
		t.Errorf("the not-frozen heuristic lists %+v in a frozen cgroup", tasks)
	}
	for _, p := range []int{sleeper, stopped} {
		t.Logf("v%d: frozen sleep %d: %s, wchan %s", version, p, procStatusState(p), procField(p, "wchan"))
	}
	// Freezing again is a no-op that succeeds.
	if err := Freeze(ctx, dir); err != nil {
		t.Errorf("second Freeze: %v", err)
	}

	start = time.Now()
	if err := Thaw(ctx, dir); err != nil {
		t.Fatalf("Thaw: %v", err)
	}
	t.Logf("v%d: thawed in %v", version, time.Since(start))
	if s, err := GetState(dir); err != nil || s != Thawed {
		t.Errorf("GetState after Thaw = %q, %v; want THAWED", s, err)
	}
	if !counterMoves(t, counter, 2*time.Second) {
		t.Error("the counter does not move after Thaw")
	}
	// A running task must not look frozen. It can be caught between two
	// states, so look a few times.
	listed := false
	for range 20 {
		if slices.ContainsFunc(unfrozenTasks(dir, version), func(t Task) bool { return t.PID == pid }) {
			listed = true
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if !listed {
		t.Errorf("the not-frozen heuristic does not list running pid %d (%s, wchan %s)", pid,
			procStatusState(pid), procField(pid, "wchan"))
	}
}

func procStatusState(pid int) string {
	task, _ := inspectTask(pid)
	return task.State
}

func TestKernelAncestorV1(t *testing.T) {
	testKernelAncestor(t, requireCgroupV1(t), 1)
}

func TestKernelAncestorV2(t *testing.T) {
	testKernelAncestor(t, requireCgroupV2(t), 2)
}

// testKernelAncestor freezes a parent and checks what its child reports.
func testKernelAncestor(t *testing.T, base string, version int) {
	parent := newTestCgroup(t, base, "")
	child := newTestCgroup(t, parent, "child")
	counter, _ := startCounter(t, child, parent)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	if err := Freeze(ctx, parent); err != nil {
		t.Fatalf("Freeze(parent): %v", err)
	}
	if s, err := GetState(child); err != nil || s != Frozen {
		t.Errorf("GetState(child) of a frozen parent = %q, %v; want FROZEN (effective state)", s, err)
	}
	if counterMoves(t, counter, 200*time.Millisecond) {
		t.Error("the counter in the child moves while the parent is frozen")
	}
	if err := Thaw(ctx, child); !errors.Is(err, ErrFrozenByAncestor) {
		t.Errorf("Thaw(child) = %v, want ErrFrozenByAncestor", err)
	}
	if err := Thaw(ctx, parent); err != nil {
		t.Fatalf("Thaw(parent): %v", err)
	}
	if s, err := GetState(child); err != nil || s != Thawed {
		t.Errorf("GetState(child) after thawing the parent = %q, %v; want THAWED", s, err)
	}
	if !counterMoves(t, counter, 2*time.Second) {
		t.Error("the counter does not move after the parent is thawed")
	}
}

func TestKernelRemovedCgroup(t *testing.T) {
	for _, tc := range []struct {
		name string
		base func(*testing.T) string
	}{
		{name: "v1", base: requireCgroupV1},
		{name: "v2", base: requireCgroupV2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := newTestCgroup(t, tc.base(t), "")
			rmdirCgroup(t, dir)
			if _, err := GetState(dir); !errors.Is(err, ErrNotExist) {
				t.Errorf("GetState of a removed cgroup = %v, want ErrNotExist", err)
			}
			err := Freeze(context.Background(), dir)
			var fe *FreezeError
			if !errors.As(err, &fe) || !errors.Is(err, ErrNotExist) {
				t.Errorf("Freeze of a removed cgroup = %v, want a *FreezeError wrapping ErrNotExist", err)
			}
		})
	}
}

// TestKernelEventsNotify checks that the kernel signals a change of
// cgroup.events through inotify, so waitFrozen wakes without polling.
func TestKernelEventsNotify(t *testing.T) {
	dir := newTestCgroup(t, requireCgroupV2(t), "")
	startCounter(t, dir)
	w := watchEvents(dir)
	defer w.close()
	if w.fd < 0 {
		t.Fatal("cannot watch cgroup.events with inotify")
	}
	if err := os.WriteFile(filepath.Join(dir, "cgroup.freeze"), []byte("1"), 0); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	w.wait(context.Background(), 5*time.Second)
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("no inotify event on %s/cgroup.events within %v of freezing", dir, d)
	}
	if err := Thaw(context.Background(), dir); err != nil {
		t.Fatal(err)
	}
}
