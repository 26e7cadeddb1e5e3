package test

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// fdTargets maps each open descriptor of pid to what it points at.
func fdTargets(t *testing.T, pid int) map[int]string {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatalf("listing %s: %v", dir, err)
	}
	m := map[int]string{}
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		target, _ := os.Readlink(filepath.Join(dir, e.Name()))
		m[fd] = target
	}
	return m
}

// TestJobGetsOnlyStdio: a job starts with fds 0, 1 and 2 whatever its
// caller held open, and no process of ferry's (shim, init) keeps the
// caller's descriptor either.
func TestJobGetsOnlyStdio(t *testing.T) {
	e := newEnv(t)
	held := filepath.Join(t.TempDir(), "held")
	// The shell opens fd 7 (without close-on-exec, as shells do) and
	// execs ferry with it.
	wrapper := []string{"sh", "-c", `exec 7>>"$0"; exec "$@"`, held}
	if r := e.runFerry(wrapper, nil, "run", "--name", "fds", "--", "sleep", "1000"); r.code != 0 {
		t.Fatalf("ferry run: %s", r)
	}
	var v jobView
	eventually(t, 10*time.Second, "main pid", func() bool { v = e.job("fds"); return v.MainPID > 0 })
	fds := fdTargets(t, v.MainPID)
	var nums []int
	for fd := range fds {
		nums = append(nums, fd)
	}
	slices.Sort(nums)
	if !slices.Equal(nums, []int{0, 1, 2}) {
		t.Errorf("job's command has fds %v (%v), want exactly 0 1 2", nums, fds)
	}
	shim := e.shimPID("fds")
	for who, pid := range map[string]int{"init": v.InitPID, "shim": shim} {
		for fd, target := range fdTargets(t, pid) {
			if target == held {
				t.Errorf("the job's %s holds its caller's fd as its fd %d", who, fd)
			}
		}
	}
}

// shimPID reads the job's shim pid from ferry list --json.
func (e *env) shimPID(name string) int {
	e.t.Helper()
	out := e.must("list", "--json")
	i := strings.Index(out, `"name": "`+name+`"`)
	if i < 0 {
		e.t.Fatalf("job %s not listed", name)
	}
	rest := out[i:]
	j := strings.Index(rest, `"shimPid": `)
	if j < 0 {
		e.t.Fatalf("no shimPid for %s in %s", name, out)
	}
	rest = rest[j+len(`"shimPid": `):]
	n, err := strconv.Atoi(rest[:strings.IndexAny(rest, ",\n")])
	if err != nil {
		e.t.Fatal(err)
	}
	return n
}

// TestJobStartedUnderFlock: a job started while its caller holds a flock
// lock (`flock FILE ferry run`, whose lock sits at fd 3, and a shell's
// `exec 9>>FILE; flock 9`) leaves the lock to the caller alone (released
// when it exits), and checkpoints and restores with its counter continued.
func TestJobStartedUnderFlock(t *testing.T) {
	e := newEnv(t)
	requireCriu(t)
	for _, c := range []struct {
		name    string
		wrapper func(lock string) []string
	}{
		{"flock-cmd", func(lock string) []string { return []string{"flock", lock} }},
		{"flock-fd9", func(lock string) []string {
			return []string{"sh", "-c", `exec 9>>"$0"; flock 9 || exit 99; exec "$@"`, lock}
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			lock := filepath.Join(t.TempDir(), "lock")
			if r := e.runFerry(c.wrapper(lock), nil, "run", "--name", c.name, "--", "sh", "-c", counter); r.code != 0 {
				t.Fatalf("ferry run under flock: %s", r)
			}
			// The caller has exited: nobody may hold the lock any more.
			if code := exec1(t, "flock", "-n", lock, "true"); code != 0 {
				t.Errorf("the caller's lock is still held after it exited (flock -n: exit %d)", code)
			}
			eventually(t, 10*time.Second, "count to reach 10", func() bool { return e.logLines(c.name) >= 10 })
			ckpt := filepath.Join(t.TempDir(), c.name+".ferry")
			if r := e.ferry("checkpoint", "-o", ckpt, c.name); r.code != 0 {
				t.Fatalf("checkpoint of a job started under flock: %s", r)
			}
			before := numbers(t, e.must("logs", c.name))
			e.must("restore", ckpt)
			eventually(t, 10*time.Second, "count to continue", func() bool { return e.logLines(c.name) >= len(before)+10 })
			nums := numbers(t, e.must("logs", c.name))
			assertConsecutive(t, nums)
			if nums[len(nums)-1] <= before[len(before)-1] {
				t.Fatalf("count did not continue past %d", before[len(before)-1])
			}
		})
	}
}
