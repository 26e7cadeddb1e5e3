package test

import (
	"bytes"
	"encoding/json"
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

	"github.com/ferry-cr/ferry/internal/proc"
)

// Nothing is left behind by a ferry killed with SIGKILL: a record stuck
// in "starting", a cgroup, scratch space in /dev/shm or a serve
// directory. The next ferry command tells what is abandoned (its owner is
// gone) and clears it; a retried restore under the same name works.

// bigJob is the workload the tests kill ferry around: a counter, printed
// each second, and 200 MiB of memory, so that dumping and restoring it
// takes long enough to be interrupted.
const bigMiB = "200"

// in is e for subtest t: the same state directory, with failures
// reported to t (e's own cleanup stays with the parent).
func (e *env) in(t *testing.T) *env { return &env{t: t, root: e.root} }

// kill9 sends SIGKILL to a ferry the test started and reaps it.
func kill9(t *testing.T, cmd *exec.Cmd) {
	t.Helper()
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()
}

// descendants lists the processes below pid (CRIU, a gate), children
// first.
func descendants(pid int) []int {
	var out []int
	kids, _ := proc.Children(pid)
	for _, k := range kids {
		out = append(out, k)
		out = append(out, descendants(k)...)
	}
	return out
}

// waitGone waits until none of pids is alive any more (a killed ferry's
// CRIU finishing on its own); the test signals none of them.
func waitGone(t *testing.T, pids []int) {
	t.Helper()
	starts := map[int]uint64{}
	for _, p := range pids {
		if st, err := proc.ReadStat(p); err == nil {
			starts[p] = st.StartTime
		}
	}
	eventually(t, 90*time.Second, fmt.Sprintf("the killed ferry's children %v to end", pids), func() bool {
		for p, s := range starts {
			if proc.Alive(p, s) {
				return false
			}
		}
		return true
	})
}

// openUnder returns the entry of base (its first path component below
// base) under which process pid has a file or directory open, or "".
func openUnder(pid int, base string) string {
	fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	for _, fd := range fds {
		l, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name()))
		if err != nil {
			continue
		}
		if rest, ok := strings.CutPrefix(l, base+"/"); ok && rest != "" {
			return filepath.Join(base, strings.SplitN(rest, "/", 2)[0])
		}
	}
	return ""
}

// ownedBy lists the entries of dir whose scratch name says pid owns them.
func ownedBy(dir string, pid int) []string {
	var out []string
	entries, _ := os.ReadDir(dir)
	for _, en := range entries {
		if strings.HasPrefix(en.Name(), ".ferry-scratch-") && strings.Contains(en.Name(), fmt.Sprintf("-%d-", pid)) {
			out = append(out, filepath.Join(dir, en.Name()))
		}
	}
	return out
}

// serveLeftovers is the scratch directories of a restore or serve with
// pid: in the serve directory, /run/ferry-serve (when that is too deep
// for a socket's path), and /dev/shm (a post-copy destination's lazy
// restore: restore.NewEarlyLazy).
func (e *env) serveLeftovers(pid int) []string {
	var out []string
	for _, dir := range []string{filepath.Join(e.root, "serve"), "/run/ferry-serve", "/dev/shm"} {
		out = append(out, ownedBy(dir, pid)...)
	}
	return out
}

// record reads job name's record straight from the state directory
// (without running ferry, which takes a while): its status and cgroup.
func (e *env) record(name string) (status, cgroup string) {
	var r struct {
		Status string `json:"status"`
		Cgroup string `json:"cgroup"`
	}
	data, err := os.ReadFile(filepath.Join(e.root, "jobs", name, "job.json"))
	if err != nil || json.Unmarshal(data, &r) != nil {
		return "", ""
	}
	return r.Status, r.Cgroup
}

// counts is the counter values job name has logged ("count N ..." lines).
func (e *env) counts(name string) []int {
	e.t.Helper()
	var out []int
	for _, l := range e.lines(name, "count ") {
		n, err := strconv.Atoi(strings.Fields(l)[0])
		if err != nil {
			e.t.Fatalf("count line %q", l)
		}
		out = append(out, n)
	}
	return out
}

// assertCountsFrom waits for job name to log two more counts after its
// first skip lines, and checks that they start at first and go up by one.
func (e *env) assertCountsFrom(name string, skip, first int) {
	e.t.Helper()
	e.waitLines(name, "count ", skip+2)
	got := e.counts(name)[skip:]
	if got[0] != first {
		e.t.Fatalf("%s counts from %d after the restore, want %d (carried on from the checkpoint)", name, got[0], first)
	}
	assertConsecutive(e.t, got)
}

// assertStale checks that ferry list tells the truth about job name: its
// start was abandoned.
func (e *env) assertStale(name string) jobView {
	e.t.Helper()
	var v jobView
	eventually(e.t, 90*time.Second, name+" to be listed stale", func() bool {
		v = e.job(name)
		return v.State == "stale"
	})
	text := e.must("list")
	if !strings.Contains(text, "stale (owner gone)") || !strings.Contains(text, "ferry rm "+name) {
		e.t.Errorf("ferry list does not say %s was abandoned:\n%s", name, text)
	}
	if v.Cgroup == "" {
		e.t.Fatalf("stale record of %s names no cgroup", name)
	}
	if _, err := os.Stat(v.Cgroup); err != nil {
		e.t.Fatalf("the abandoned start left no cgroup to clear (%v): the test tests nothing", err)
	}
	return v
}

// TestKilledRestoreLeavesNothingStuck kills `ferry restore` with SIGKILL
// at two moments: while CRIU starts in the shim (before it has read
// anything), and while CRIU reads the checkpoint the killed ferry was
// serving it. Each time the record is left "starting" with a cgroup and a
// serve directory; ferry list must say it is stale, kill and rm must clear
// it, and a retried restore under the same name must run the job from its
// checkpoint.
func TestKilledRestoreLeavesNothingStuck(t *testing.T) {
	requireCriu(t)
	e := newEnv(t)
	w := buildWorkload(t)
	e.must("run", "--name", "big", "--", w, "demo", bigMiB)
	e.waitLines("big", "count ", 2)
	ckpt := filepath.Join(t.TempDir(), "big.ferry")
	e.must("checkpoint", "-o", ckpt, "big")
	cs := e.counts("big")
	last := cs[len(cs)-1]

	t.Run("killed while CRIU starts: kill and rm clear it", func(t *testing.T) {
		e := e.in(t)
		mark := filepath.Join(t.TempDir(), "criu-started")
		slow := e.criuWrapper(fmt.Sprintf(`if [ "$1" = restore ]; then touch %s; sleep 2; fi`, mark))
		cmd, out := e.spawnFerry(spawn{}, "--criu", slow, "restore", "--name", "big", ckpt)
		eventually(t, 60*time.Second, "CRIU to start restoring", func() bool {
			_, err := os.Stat(mark)
			return err == nil
		})
		if st, _ := e.record("big"); st != "starting" {
			t.Fatalf("record of big is %q while CRIU starts, want starting", st)
		}
		pid := cmd.Process.Pid
		kill9(t, cmd)
		t.Logf("killed ferry restore (pid %d): %s", pid, out)

		v := e.assertStale("big")
		if len(e.serveLeftovers(pid)) == 0 {
			t.Errorf("the killed restore left no serve directory named after it")
		}
		// A stale record holds neither freeze nor thaw.
		if r := e.ferry("thaw", "big"); r.code != 10 {
			t.Errorf("thaw of a stale job: %s, want exit 10 (not running)", r)
		}
		e.must("kill", "big")
		k := e.job("big")
		if k.State != "exited" || k.Exit == nil || k.Exit.Reason != "start abandoned" {
			t.Fatalf("after ferry kill: state %q exit %+v, want exited, start abandoned", k.State, k.Exit)
		}
		if _, err := os.Stat(v.Cgroup); !os.IsNotExist(err) {
			t.Fatalf("ferry kill left the cgroup %s of the abandoned start (%v)", v.Cgroup, err)
		}
		if left := e.serveLeftovers(pid); len(left) != 0 {
			t.Errorf("ferry kill left the killed restore's serve directories %v", left)
		}
		e.must("rm", "big")
		if _, ok := e.list()["big"]; ok {
			t.Fatalf("ferry rm left the record of big")
		}
		assertNoJobCgroups(t, "big")

		e.must("restore", "--name", "big", ckpt)
		e.assertCountsFrom("big", 0, last+1)
		e.must("kill", "big")
	})

	t.Run("killed while CRIU reads the stream: a retried restore replaces it", func(t *testing.T) {
		e := e.in(t)
		skip := len(e.counts("big"))
		cmd, out := e.spawnFerry(spawn{}, "restore", "--name", "big", ckpt)
		pid := cmd.Process.Pid
		// The restored tree's first task is in the job's cgroup beside
		// CRIU: CRIU has read the tree and now reads its memory from the
		// stream. Stop the ferry serving it there, then kill it.
		eventually(t, 60*time.Second, "CRIU to fork the restored tree", func() bool {
			_, cg := e.record("big")
			data, err := os.ReadFile(filepath.Join(cg, "cgroup.procs"))
			return err == nil && len(strings.Fields(string(data))) >= 2
		})
		if err := cmd.Process.Signal(syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		if st, _ := e.record("big"); st != "starting" {
			t.Fatalf("the restore was over (record %q) before it could be interrupted", st)
		}
		kill9(t, cmd)
		t.Logf("killed ferry restore (pid %d) mid-stream: %s", pid, out)

		v := e.assertStale("big")
		if len(e.serveLeftovers(pid)) == 0 {
			t.Errorf("the killed restore left no serve directory named after it")
		}
		e.must("restore", "--name", "big", ckpt)
		e.assertCountsFrom("big", skip, last+1)
		if _, err := os.Stat(v.Cgroup); !os.IsNotExist(err) {
			t.Errorf("the retried restore left the cgroup %s of the abandoned start (%v)", v.Cgroup, err)
		}
		if left := e.serveLeftovers(pid); len(left) != 0 {
			t.Errorf("the retried restore left the killed restore's serve directories %v", left)
		}
	})
}

// TestKilledSnapshotLeavesNothingInShm kills `ferry checkpoint --store`
// with SIGKILL while the job's image sits in /dev/shm, a `ferry checkpoint
// -o DIR` while its images fill a directory beside its output, and a
// `ferry restore --store` while it rebuilds the snapshot in /dev/shm: the
// next ferry command must remove what each left, the job must run on (the
// checkpoints) and come back from its snapshot (the restore).
func TestKilledSnapshotLeavesNothingInShm(t *testing.T) {
	requireCriu(t)
	e := newEnv(t)
	w := buildWorkload(t)
	st := filepath.Join(t.TempDir(), "store")
	e.must("run", "--name", "snap", "--", w, "demo", bigMiB)
	e.waitLines("snap", "count ", 2)

	t.Run("checkpoint --store", func(t *testing.T) {
		e := e.in(t)
		cmd, out := e.spawnFerry(spawn{}, "checkpoint", "--store", st, "--leave-running", "snap")
		pid := cmd.Process.Pid
		var scratch string
		eventually(t, 60*time.Second, "the checkpoint's scratch directory in /dev/shm to fill", func() bool {
			if scratch == "" {
				scratch = openUnder(pid, "/dev/shm")
			}
			return scratch != "" && dirSize(t, scratch) > 32<<20
		})
		t.Cleanup(func() { os.RemoveAll(scratch) }) // made by the ferry this test started
		kids := descendants(pid)
		kill9(t, cmd)
		t.Logf("killed ferry checkpoint (pid %d) with %s in /dev/shm: %s", pid, scratch, out)
		waitGone(t, kids)
		if _, err := os.Stat(scratch); err != nil {
			t.Fatalf("the killed checkpoint left nothing in /dev/shm (%v): the test tests nothing", err)
		}
		if !strings.HasPrefix(filepath.Base(scratch), ".ferry-scratch-") {
			t.Fatalf("dump's scratch space %s is not named after its owner (internal/scratch)", scratch)
		}
		eventually(t, 15*time.Second, "the job's shim to give the job back", func() bool {
			v := e.job("snap")
			return v.State == "running" && v.Operation == ""
		})
		n := len(e.counts("snap"))
		e.waitLines("snap", "count ", n+2)
		assertConsecutive(t, e.counts("snap"))

		e.snapshot(st, "snap")
		if _, err := os.Stat(scratch); !os.IsNotExist(err) {
			t.Errorf("the next checkpoint left the killed one's %s (%v)", scratch, err)
		}
		if left := ownedBy("/dev/shm", pid); len(left) != 0 {
			t.Errorf("left in /dev/shm: %v", left)
		}
	})

	t.Run("checkpoint beside its output", func(t *testing.T) {
		e := e.in(t)
		outDir := t.TempDir()
		// The scratch directory is found by its name, which says its
		// owner; a checkpoint that ends before it is caught filling
		// (it took a few hundred ms) is tried again, into a new output.
		var (
			cmd     *exec.Cmd
			out     *bytes.Buffer
			pid     int
			scratch string
		)
		for try := 0; scratch == ""; try++ {
			if try == 5 {
				t.Fatal("five checkpoints ended before their directory beside the output was caught filling")
			}
			output := filepath.Join(outDir, fmt.Sprintf("snap%d.ckpt", try))
			cmd, out = e.spawnFerry(spawn{}, "checkpoint", "--format", "dir", "--leave-running", "-o", output, "snap")
			pid = cmd.Process.Pid
			for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
				if left := ownedBy(outDir, pid); len(left) == 1 && dirSize(t, left[0]) > 32<<20 {
					scratch = left[0]
					break
				}
				if _, err := os.Stat(output); err == nil {
					break // done already
				}
			}
			if scratch != "" {
				break
			}
			if _, err := os.Stat(output); err != nil {
				t.Fatalf("checkpoint %d neither filled a directory beside its output nor ended within 60s: %s", try, out)
			}
			if err := cmd.Wait(); err != nil {
				t.Fatalf("checkpoint %d: %v\n%s", try, err, out)
			}
		}
		t.Cleanup(func() { os.RemoveAll(scratch) }) // made by the ferry this test started
		kids := descendants(pid)
		kill9(t, cmd)
		t.Logf("killed ferry checkpoint (pid %d) with %s: %s", pid, scratch, out)
		waitGone(t, kids)
		if _, err := os.Stat(scratch); err != nil {
			t.Fatalf("the killed checkpoint left nothing beside its output (%v): the test tests nothing", err)
		}
		if !strings.HasPrefix(filepath.Base(scratch), ".ferry-scratch-") {
			t.Fatalf("dump's scratch space %s is not named after its owner (internal/scratch)", scratch)
		}
		eventually(t, 15*time.Second, "the job's shim to give the job back", func() bool {
			v := e.job("snap")
			return v.State == "running" && v.Operation == ""
		})
		e.must("checkpoint", "--format", "dir", "--leave-running", "-o", filepath.Join(outDir, "again.ckpt"), "snap")
		if _, err := os.Stat(scratch); !os.IsNotExist(err) {
			t.Errorf("the next checkpoint into %s left the killed one's %s (%v)", outDir, scratch, err)
		}
		if _, err := os.Stat(filepath.Join(outDir, "again.ckpt", "ferry.json")); err != nil {
			t.Errorf("the next checkpoint: %v", err)
		}
	})

	t.Run("restore --store", func(t *testing.T) {
		e := e.in(t)
		before := e.counts("snap")
		e.snapshot(st, "snap")
		after := e.counts("snap")
		cmd, out := e.spawnFerry(spawn{}, "restore", "--store", st, "--name", "snap2", "snap")
		pid := cmd.Process.Pid
		var scratch string
		eventually(t, 60*time.Second, "the restore to rebuild the snapshot in /dev/shm", func() bool {
			scratch = openUnder(pid, "/dev/shm")
			return scratch != "" && dirSize(t, scratch) > 16<<20
		})
		t.Cleanup(func() { os.RemoveAll(scratch) }) // made by the ferry this test started
		if err := cmd.Process.Signal(syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		if st, _ := e.record("snap2"); st != "" {
			t.Fatalf("the snapshot was rebuilt (record %q) before the restore could be interrupted", st)
		}
		kill9(t, cmd)
		t.Logf("killed ferry restore --store (pid %d) with %s in /dev/shm: %s", pid, scratch, out)
		if _, err := os.Stat(scratch); err != nil {
			t.Fatalf("the killed restore left nothing in /dev/shm (%v): the test tests nothing", err)
		}

		e.must("restore", "--store", st, "--name", "snap2", "snap")
		if _, err := os.Stat(scratch); !os.IsNotExist(err) {
			t.Errorf("the next restore left the killed one's %s (%v)", scratch, err)
		}
		if left := ownedBy("/dev/shm", pid); len(left) != 0 {
			t.Errorf("left in /dev/shm: %v", left)
		}
		// The snapshot was taken between the two readings: the restored
		// counter carries on from a value in between.
		e.waitLines("snap2", "count ", 2)
		got := e.counts("snap2")
		if got[0] <= before[len(before)-1] || got[0] > after[len(after)-1]+1 {
			t.Fatalf("snap2 counts from %d, want a value in (%d, %d]", got[0], before[len(before)-1], after[len(after)-1]+1)
		}
		assertConsecutive(t, got)
	})
}

// abandoned writes the record a `ferry run` killed mid-start leaves for
// job name: "starting", owned by a process that is gone, with a cgroup of
// its own (made beside the probe job's, as ferry names them, or named
// cgName when given) holding a task the test started. It returns the
// cgroup and the task.
func (e *env) abandoned(probeCgroup, name, cgName string) (string, *exec.Cmd) {
	e.t.Helper()
	owner := exec.Command("sleep", "600")
	if err := owner.Start(); err != nil {
		e.t.Fatal(err)
	}
	ost, err := proc.ReadStat(owner.Process.Pid)
	if err != nil {
		e.t.Fatal(err)
	}
	_ = owner.Process.Kill()
	_ = owner.Wait()

	id := fmt.Sprintf("%016x", time.Now().UnixNano())
	if cgName == "" {
		cgName = name + "-" + id[:8]
	}
	cg := filepath.Join(filepath.Dir(probeCgroup), cgName)
	if err := os.Mkdir(cg, 0o755); err != nil {
		e.t.Fatal(err)
	}
	left := exec.Command("sleep", "600")
	if err := left.Start(); err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() {
		_ = left.Process.Kill()
		_ = left.Wait()
		_ = os.Remove(cg)
	})
	if err := os.WriteFile(filepath.Join(cg, "cgroup.procs"), []byte(strconv.Itoa(left.Process.Pid)), 0o644); err != nil {
		e.t.Fatal(err)
	}
	rec := map[string]any{
		"name": name, "id": id, "command": []string{"/bin/sh"}, "dir": "/",
		"created": time.Now().UTC(), "status": "starting",
		"cgroup": cg, "cgroupVersion": e.job("probe").CgroupVersion,
		"ownerPid": ost.PID, "ownerStart": ost.StartTime,
	}
	data, _ := json.Marshal(rec)
	dir := filepath.Join(e.root, "jobs", name)
	if err := os.Mkdir(dir, 0o700); err != nil {
		e.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "job.json"), data, 0o600); err != nil {
		e.t.Fatal(err)
	}
	return cg, left
}

// TestAbandonedStartWithLeftovers: a start abandoned with a task still in
// the job's cgroup. A fresh `ferry run` under that name kills the task,
// removes the cgroup and runs; a record whose cgroup is not the job's own
// is never acted on.
func TestAbandonedStartWithLeftovers(t *testing.T) {
	e := newEnv(t)
	e.must("run", "--name", "probe", "--", "sleep", "600")
	probe := e.job("probe").Cgroup

	cg, left := e.abandoned(probe, "again", "")
	if v := e.job("again"); v.State != "stale" {
		t.Fatalf("abandoned start listed as %q, want stale", v.State)
	}
	e.must("run", "--name", "again", "--", "sh", "-c", counter)
	if st, err := proc.ReadStat(left.Process.Pid); err == nil && st.State != 'Z' {
		t.Errorf("the task left in the abandoned cgroup survived (state %c)", st.State)
	}
	if _, err := os.Stat(cg); !os.IsNotExist(err) {
		t.Errorf("the abandoned cgroup %s is still there (%v)", cg, err)
	}
	eventually(t, 10*time.Second, "the new job to count", func() bool { return e.logLines("again") >= 3 })
	if n := numbers(t, e.must("logs", "again")); n[0] != 1 {
		t.Errorf("the new job's log starts at %d: the abandoned one's log was kept", n[0])
	}

	// A record naming a cgroup that is not ferry/NAME-ID: left alone.
	other, task := e.abandoned(probe, "foreign", "not-ferrys")
	r := e.ferry("rm", "foreign")
	if r.code == 0 || !strings.Contains(r.stderr, "left alone") {
		t.Errorf("rm of a record naming another cgroup: %s", r)
	}
	if !proc.Alive(task.Process.Pid, mustStart(t, task.Process.Pid)) {
		t.Errorf("rm killed a task outside the job's own cgroup")
	}
	if _, err := os.Stat(other); err != nil {
		t.Errorf("rm removed a cgroup that is not the job's own: %v", err)
	}
	// Let env's cleanup forget it: the test's cleanup ends the task and
	// removes the cgroup.
	_ = os.RemoveAll(filepath.Join(e.root, "jobs", "foreign"))
}

func mustStart(t *testing.T, pid int) uint64 {
	t.Helper()
	st, err := proc.ReadStat(pid)
	if err != nil {
		t.Fatal(err)
	}
	return st.StartTime
}

// TestKilledServeRetriedMigration kills the destination's `ferry serve`
// with SIGKILL while its CRIU starts to restore a migrated job: the job
// runs on at the source, the destination's record is stale, and a second
// migration under the same name, to a new serve on the same state
// directory, goes through with the job's counter carried on.
func TestKilledServeRetriedMigration(t *testing.T) {
	requireCriu(t)
	w := buildWorkload(t)
	h := newHosts(t)
	src, dst := newEnv(t), newEnv(t)
	token := writeToken(t, "correct horse battery staple 42")
	listen := net.JoinHostPort(h.addrB, "7072")
	if r := src.ferryIn(h.a, "run", "--name", "mk", "--", w, "demo", "64"); r.code != 0 {
		t.Fatalf("run: %s", r)
	}
	src.waitLines("mk", "count ", 2)

	mark := filepath.Join(t.TempDir(), "criu-started")
	slow := dst.criuWrapper(fmt.Sprintf(`if [ "$1" = restore ]; then touch %s; sleep 2; fi`, mark))
	logPath := filepath.Join(t.TempDir(), "serve.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	serve := exec.Command("nsenter", "--net=/run/netns/"+h.b, ferryBin, "--root", dst.root, "serve", "--listen", listen, "--token-file", token)
	serve.Env = append(os.Environ(), "FERRY_CRIU="+slow)
	serve.Stdout, serve.Stderr = logf, logf
	if err := serve.Start(); err != nil {
		t.Fatal(err)
	}
	reapLazyDaemonsAtEnd(t, serve.Process.Pid)
	t.Cleanup(func() { _ = serve.Process.Kill(); _ = serve.Wait() })
	eventually(t, 10*time.Second, "ferry serve to listen", func() bool {
		b, _ := os.ReadFile(logPath)
		return strings.Contains(string(b), "serving migrations")
	})

	mig, out := src.startFerryIn(h.a, "migrate", "mk", "--to", listen, "--token-file", token)
	eventually(t, 60*time.Second, "the destination's CRIU to start restoring", func() bool {
		_, err := os.Stat(mark)
		return err == nil
	})
	if st, _ := dst.record("mk"); st != "starting" {
		t.Fatalf("destination record of mk is %q while its CRIU starts, want starting", st)
	}
	kill9(t, serve)
	done := make(chan error, 1)
	go func() { done <- mig.Wait() }()
	select {
	case err := <-done:
		if err == nil {
			t.Fatalf("migrate to a destination killed mid-restore succeeded: %s", out)
		}
	case <-time.After(120 * time.Second):
		t.Fatalf("migrate did not end within 120s of its destination's death")
	}
	t.Logf("migrate to a killed destination: %s", out)
	if v := src.job("mk"); v.State != "running" {
		t.Fatalf("source job after its destination died: %q", v.State)
	}
	old := dst.assertStale("mk")

	dst.serve(h.b, listen, token)
	if r := src.ferryIn(h.a, "migrate", "mk", "--to", listen, "--token-file", token); r.code != 0 {
		t.Fatalf("retried migration onto the abandoned name: %s", r)
	}
	cs := src.counts("mk")
	dst.assertCountsFrom("mk", 0, cs[len(cs)-1]+1)
	if _, err := os.Stat(old.Cgroup); !os.IsNotExist(err) {
		t.Errorf("the retried migration left the abandoned cgroup %s (%v)", old.Cgroup, err)
	}
}
