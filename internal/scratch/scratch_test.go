package scratch

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ferry-cr/ferry/internal/proc"
)

// child starts a process (sleep) to own scratch space, and returns
// its identity and a function that ends it and reaps it.
func child(t *testing.T) (owner, func()) {
	t.Helper()
	cmd := exec.Command("sleep", "600")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ended := false
	end := func() {
		if !ended {
			ended = true
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		}
	}
	t.Cleanup(end)
	st, err := proc.ReadStat(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	return owner{pid: st.PID, start: st.StartTime}, end
}

// makeFor creates a scratch directory in base as if o had made it.
func makeFor(t *testing.T, base string, o owner, prefix string) string {
	t.Helper()
	p := filepath.Join(base, o.name(prefix))
	if err := os.Mkdir(p, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(p, "pages-1.img"), []byte("data"), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func exists(p string) bool {
	_, err := os.Lstat(p)
	return err == nil
}

func TestDirNamesItsOwner(t *testing.T) {
	base := t.TempDir()
	p, err := Dir(base, "job.ferry")
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(p)
	if err != nil || !fi.IsDir() || fi.Mode().Perm() != 0o700 {
		t.Fatalf("Dir made %s: %v %v", p, fi, err)
	}
	pid, start, ok := Owner(filepath.Base(p))
	st, err := proc.ReadStat(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if !ok || pid != os.Getpid() || start != st.StartTime {
		t.Fatalf("Owner(%q) = %d %d %v, want %d %d", filepath.Base(p), pid, start, ok, os.Getpid(), st.StartTime)
	}
	if !strings.HasPrefix(filepath.Base(p), ".ferry-scratch-job.ferry-") {
		t.Errorf("name %q does not carry the prefix", filepath.Base(p))
	}
	f, err := File(base, "x")
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	if fi, err := os.Stat(f.Name()); err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm() != 0o600 {
		t.Fatalf("File made %s: %v %v", f.Name(), fi, err)
	}
	if _, err := Dir(base, "a/b"); err == nil {
		t.Errorf("Dir accepted a prefix with a slash")
	}
}

func TestOwnerParsesFromTheRight(t *testing.T) {
	for name, want := range map[string]bool{
		".ferry-scratch-a-b-c-12-345-0123abcd": true,
		".ferry-scratch--12-345-0123abcd":      true, // empty prefix
		".ferry-scratch-x-12-345-0123abc":      false,
		".ferry-scratch-x-12-345-0123ABCD":     false,
		".ferry-scratch-x-0-345-0123abcd":      false,
		".ferry-scratch-x-12-0123abcd":         false,
		"ferry-scratch-x-12-345-0123abcd":      false,
		".c1.ckpt.partial-123456":              false,
	} {
		pid, start, ok := Owner(name)
		if ok != want {
			t.Errorf("Owner(%q) ok = %v, want %v", name, ok, want)
		}
		if ok && (pid != 12 || start != 345) {
			t.Errorf("Owner(%q) = %d %d", name, pid, start)
		}
	}
}

func TestSweep(t *testing.T) {
	base := t.TempDir()
	elsewhere := t.TempDir()

	live, _ := child(t)
	dead, kill := child(t)
	mine, err := Dir(base, "mine")
	if err != nil {
		t.Fatal(err)
	}
	keptLive := makeFor(t, base, live, "live")
	gone := makeFor(t, base, dead, "dead.ferry")
	goneFile := filepath.Join(base, dead.name("stream"))
	if err := os.WriteFile(goneFile, []byte("partial"), 0o600); err != nil {
		t.Fatal(err)
	}
	// The pid of a live process, with a start time that is not its own:
	// the owner that had it is gone.
	reused := makeFor(t, base, owner{pid: live.pid, start: live.start + 1}, "reused")
	// Names that are not scratch names, whoever they seem to belong to.
	others := []string{
		filepath.Join(base, fmt.Sprintf(".ferry-scratch-x-%d-%d-nothex00", dead.pid, dead.start)),
		filepath.Join(base, fmt.Sprintf(".c1.ckpt.partial-%d", dead.pid)),
		filepath.Join(base, fmt.Sprintf("ferry-snapshot-%d", dead.pid)),
	}
	for _, p := range others {
		if err := os.Mkdir(p, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	// A link with a dead owner's name to a directory that must survive.
	target := makeFor(t, elsewhere, dead, "target")
	link := filepath.Join(base, dead.name("link"))
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	// A scratch directory with a link inside to a directory outside: the
	// link goes, what it points to stays.
	outside := filepath.Join(elsewhere, "outside")
	if err := os.Mkdir(outside, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(outside, "keep"), []byte("keep"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(outside, filepath.Join(gone, "escape")); err != nil {
		t.Fatal(err)
	}

	// Before its owner dies, the dead child's directory is kept too.
	if removed, err := Sweep(base); err != nil || len(removed) != 1 || removed[0] != reused {
		t.Fatalf("Sweep with the child alive removed %v (%v), want only %s", removed, err, reused)
	}
	if !exists(gone) {
		t.Fatalf("Sweep removed %s while its owner lived", gone)
	}
	kill()
	removed, err := Sweep(base)
	if err != nil {
		t.Fatal(err)
	}
	if len(removed) != 2 || exists(gone) || exists(goneFile) {
		t.Fatalf("Sweep after the owner died removed %v; %s or %s is still there", removed, gone, goneFile)
	}
	for _, p := range append([]string{mine, keptLive, link, target, filepath.Join(outside, "keep")}, others...) {
		if !exists(p) {
			t.Errorf("Sweep removed %s", p)
		}
	}
	if _, err := Sweep(filepath.Join(base, "missing")); err != nil {
		t.Errorf("Sweep of a missing directory: %v", err)
	}
}

// TestSweepLeavesOtherUsers: a scratch name owned by another user is not
// ferry's to remove.
func TestSweepLeavesOtherUsers(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to give a directory to another user")
	}
	base := t.TempDir()
	dead, kill := child(t)
	kill()
	p := makeFor(t, base, dead, "theirs")
	if err := os.Chown(p, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	if removed, err := Sweep(base); err != nil || len(removed) != 0 || !exists(p) {
		t.Fatalf("Sweep removed %v (%v): another user's directory", removed, err)
	}
}
