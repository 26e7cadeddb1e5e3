package test

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// newEnvV1 is newEnv whose ferry sees only cgroup v1: a tmpfs of the
// test's own with the kernel's v1 freezer hierarchy mounted under it (the
// legacy layout), given to ferry as FERRY_CGROUP_ROOT, so that a hybrid
// or unified host tests the v1 paths too. The test is skipped where the
// kernel will not mount a v1 freezer (a pure cgroup2 kernel, or freezer
// bound to cgroup2 only).
func newEnvV1(t *testing.T) *env {
	t.Helper()
	requireRoot(t)
	root := t.TempDir() // removed last: after both unmounts below
	if err := syscall.Mount("tmpfs", root, "tmpfs", 0, "mode=0755"); err != nil {
		t.Fatalf("mounting a tmpfs for a cgroup v1 root: %v", err)
	}
	t.Cleanup(func() { unmount(t, root) })
	freezer := filepath.Join(root, "freezer")
	if err := os.Mkdir(freezer, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount("cgroup", freezer, "cgroup", 0, "freezer"); err != nil {
		t.Skipf("this kernel mounts no cgroup v1 freezer hierarchy: %v", err)
	}
	t.Cleanup(func() { unmount(t, freezer) })
	e := newEnv(t) // its cleanup (jobs killed, cgroups gone) runs before the unmounts
	e.vars = append(e.vars, "FERRY_CGROUP_ROOT="+root)
	return e
}

// unmount unmounts dir, detaching it if something still holds it.
func unmount(t *testing.T, dir string) {
	if err := syscall.Unmount(dir, 0); err != nil {
		t.Logf("unmounting %s: %v; detaching it", dir, err)
		if err := syscall.Unmount(dir, syscall.MNT_DETACH); err != nil {
			t.Errorf("detaching %s: %v", dir, err)
		}
	}
}
