package cgroup

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ferry-cr/ferry/freezer"
	"golang.org/x/sys/unix"
)

// Tests against the real kernel: they need root, create job cgroups named
// ferry-test-<pid>-<random>/job in the host's hierarchies, and remove them
// and every process they start in t.Cleanup.

func requireRoot(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("skipped in -short mode: needs root and the kernel's cgroupfs")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates cgroups under " + DefaultRoot)
	}
}

func TestKernelDetectLayout(t *testing.T) {
	if testing.Short() {
		t.Skip("skipped in -short mode: reads the host's cgroupfs")
	}
	l, err := DetectLayout(DefaultRoot)
	if err != nil {
		t.Skipf("no cgroups on this host: %v", err)
	}
	t.Logf("layout: %+v", *l)
	root, _ := statfsType(DefaultRoot)
	unified, _ := statfsType(filepath.Join(DefaultRoot, "unified"))
	switch {
	case root == unix.CGROUP2_SUPER_MAGIC:
		if l.Mode != Unified || l.V2 != DefaultRoot {
			t.Errorf("cgroup2 at the root, got %+v", *l)
		}
	case unified == unix.CGROUP2_SUPER_MAGIC:
		if l.Mode != Hybrid || l.V2 != filepath.Join(DefaultRoot, "unified") {
			t.Errorf("cgroup2 at unified/, got %+v", *l)
		}
	default:
		if l.Mode != Legacy || l.V2 != "" {
			t.Errorf("no cgroup2, got %+v", *l)
		}
	}
	if l.V1Freezer != "" {
		if m, _ := statfsType(l.V1Freezer); m != unix.CGROUP_SUPER_MAGIC {
			t.Errorf("V1Freezer %q is not a cgroup v1 mount", l.V1Freezer)
		}
	}
	if os.Geteuid() == 0 {
		dir, version, err := l.FreezerBase()
		t.Logf("FreezerBase = %q, %d, %v", dir, version, err)
		if err != nil && (l.V1Freezer != "" || l.Mode == Unified) {
			t.Errorf("FreezerBase: %v", err)
		}
	}
}

// jobLayouts returns one layout per usable hierarchy: v2 alone and v1
// freezer alone, so that both get tested on a hybrid host.
func jobLayouts(t *testing.T) map[string]*Layout {
	t.Helper()
	requireRoot(t)
	l, err := DetectLayout(DefaultRoot)
	if err != nil {
		t.Skipf("no cgroups on this host: %v", err)
	}
	out := map[string]*Layout{}
	if l.V2 != "" {
		if ok, _ := v2Usable(l.V2); ok {
			out["v2"] = &Layout{Mode: l.Mode, Root: l.Root, V2: l.V2}
		}
	}
	if l.V1Freezer != "" {
		out["v1"] = &Layout{Mode: l.Mode, Root: l.Root, V1Freezer: l.V1Freezer}
	}
	if len(out) == 0 {
		t.Skipf("no hierarchy with a freezer in %+v", *l)
	}
	return out
}

// newJob creates <base>/ferry-test-<pid>-<rand>/job, and in cleanup kills
// what is left in it, removes it and its parent.
func newJob(t *testing.T, l *Layout) (*Cgroup, string) {
	t.Helper()
	rel := fmt.Sprintf("ferry-test-%d-%08x/job", os.Getpid(), rand.Uint32())
	c, err := Create(l, rel)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		// Only processes this test started can be in its cgroup.
		if err := c.Kill(ctx); err != nil {
			t.Errorf("cleanup: %v", err)
		}
		if err := c.Remove(ctx); err != nil {
			t.Errorf("cleanup: %v", err)
		}
		if err := (&Cgroup{Path: filepath.Dir(c.Path)}).Remove(ctx); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	return c, rel
}

// startTree starts `sh` that, once released, starts two `sleep 100` and
// waits; it is moved into c before it forks. It returns the shell's
// pid and a channel closed once it is reaped; cleanup kills it (if still
// there) and waits for that.
func startTree(t *testing.T, c *Cgroup) (int, <-chan struct{}) {
	t.Helper()
	cmd := exec.Command("/bin/sh", "-c", "read go; sleep 100 & sleep 100 & wait")
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	reaped := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(reaped)
	}()
	t.Cleanup(func() {
		_ = os.WriteFile(filepath.Join(c.Path, "freezer.state"), []byte("THAWED"), 0)
		_ = os.WriteFile(filepath.Join(c.Path, "cgroup.freeze"), []byte("0"), 0)
		_ = cmd.Process.Kill() // no-op once reaped
		select {
		case <-reaped:
		case <-time.After(10 * time.Second):
			t.Errorf("pid %d not reaped", cmd.Process.Pid)
		}
	})
	if err := c.AddProc(cmd.Process.Pid); err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(stdin, "go\n"); err != nil {
		t.Fatal(err)
	}
	stdin.Close()
	return cmd.Process.Pid, reaped
}

func alive(pid int) bool {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	_, after, _ := strings.Cut(string(data), ") ")
	return after != "" && after[0] != 'Z' && after[0] != 'X'
}

func TestKernelJobLifecycle(t *testing.T) {
	for name, l := range jobLayouts(t) {
		for _, killFile := range []bool{true, false} {
			if name == "v1" && killFile {
				continue
			}
			tname := name + "/freeze-kill-thaw"
			if killFile {
				tname = name + "/cgroup.kill"
			}
			t.Run(tname, func(t *testing.T) {
				testJobLifecycle(t, l, killFile)
			})
		}
	}
}

func testJobLifecycle(t *testing.T, l *Layout, killFile bool) {
	c, rel := newJob(t, l)
	if killFile && !exists(filepath.Join(c.Path, "cgroup.kill")) {
		t.Skip("no cgroup.kill (Linux < 5.14)")
	}
	if _, err := Create(l, rel); !errors.Is(err, fs.ErrExist) {
		t.Errorf("Create of an existing job = %v, want fs.ErrExist", err)
	}
	if o, err := Open(c.Path); err != nil || *o != *c {
		t.Errorf("Open = %+v, %v; want %+v", o, err, c)
	}

	sh, reaped := startTree(t, c)
	var pids []int
	for range 200 { // the shell forks its two sleeps: wait for them
		var err error
		if pids, err = c.Procs(); err != nil {
			t.Fatal(err)
		}
		if len(pids) == 3 {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if len(pids) != 3 || !slices.Contains(pids, sh) {
		t.Fatalf("Procs = %v, want the shell %d and its two sleeps", pids, sh)
	}
	if empty, err := c.Empty(); err != nil || empty {
		t.Errorf("Empty = %v, %v; want false", empty, err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.Freeze(ctx); err != nil {
		t.Fatal(err)
	}
	if s, err := c.State(); err != nil || s != freezer.Frozen {
		t.Errorf("State = %q, %v; want FROZEN", s, err)
	}
	if err := c.Thaw(ctx); err != nil {
		t.Fatal(err)
	}
	if s, err := c.State(); err != nil || s != freezer.Thawed {
		t.Errorf("State = %q, %v; want THAWED", s, err)
	}

	// Kill while frozen: the case that needs a thaw on v1.
	if err := c.Freeze(ctx); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if killFile {
		err := c.Kill(ctx)
		if err != nil {
			t.Fatalf("Kill: %v", err)
		}
	} else if err := c.kill(ctx, false); err != nil {
		t.Fatalf("kill: %v", err)
	}
	t.Logf("killed in %v", time.Since(start))
	if empty, err := c.Empty(); err != nil || !empty {
		t.Errorf("Empty after Kill = %v, %v", empty, err)
	}
	select {
	case <-reaped:
	case <-time.After(5 * time.Second):
		t.Fatalf("shell %d not reaped after Kill", sh)
	}
	for _, pid := range pids {
		if pid != sh && alive(pid) {
			t.Errorf("sleep %d survived Kill", pid)
		}
	}
	if !killFile {
		// freeze, kill, thaw leaves the cgroup thawed.
		if s, err := c.State(); err != nil || s != freezer.Thawed {
			t.Errorf("State after Kill = %q, %v; want THAWED", s, err)
		}
	}

	if err := c.Remove(ctx); err != nil {
		t.Fatalf("Remove: %v", err)
	}
	if _, err := os.Stat(c.Path); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("cgroup still there after Remove: %v", err)
	}
	if err := c.Remove(ctx); err != nil {
		t.Errorf("second Remove = %v, want nil", err)
	}
	if _, err := Open(c.Path); !errors.Is(err, freezer.ErrNotExist) {
		t.Errorf("Open of a removed cgroup = %v, want freezer.ErrNotExist", err)
	}
}
