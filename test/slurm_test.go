package test

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"
)

// A real Slurm (Debian's slurm-wlm 22.05 and munge, unpacked into
// .deps/slurm by scripts/provision-slurm.sh; `make slurm-deps`), configured
// single-node by this test on private ports and sockets, runs the README's
// batch script: the job is preempted, snapshots itself into the store,
// requeues, resumes from the store and ends with the result of an
// uninterrupted run.

// slurmCluster is the munged, slurmctld and slurmd this test started.
type slurmCluster struct {
	t    *testing.T
	bin  string // wrappers of the Slurm commands
	conf string
	env  []string
}

func startSlurm(t *testing.T) *slurmCluster {
	t.Helper()
	prefix, _ := filepath.Abs("../.deps/slurm")
	if _, err := os.Stat(filepath.Join(prefix, "bin", "sbatch")); err != nil {
		// make test provisions it (make test-deps): missing, the test
		// fails rather than pass for want of a Slurm.
		t.Fatal("no Slurm provisioned: run `make slurm-deps` (scripts/provision-slurm.sh) for this test")
	}
	host, err := os.Hostname()
	if err != nil {
		t.Fatal(err)
	}
	host, _, _ = strings.Cut(host, ".")
	dir := t.TempDir()
	c := &slurmCluster{t: t, bin: filepath.Join(prefix, "bin"), conf: filepath.Join(dir, "slurm.conf")}
	for _, d := range []string{"munge", "state", "spool", "log"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	// munge: a fresh key; munged daemonizes and leaves its pid.
	key := make([]byte, 1024)
	if f, err := os.Open("/dev/urandom"); err == nil {
		_, _ = f.Read(key)
		f.Close()
	}
	m := filepath.Join(dir, "munge")
	if err := os.WriteFile(filepath.Join(m, "key"), key, 0o400); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(m, "sock")
	if out, err := exec.Command(filepath.Join(c.bin, "munged"), "--force", "--socket="+sock, "--key-file="+filepath.Join(m, "key"),
		"--pid-file="+filepath.Join(m, "pid"), "--log-file="+filepath.Join(m, "log"), "--seed-file="+filepath.Join(m, "seed")).CombinedOutput(); err != nil {
		t.Fatalf("munged: %v\n%s", err, out)
	}
	t.Cleanup(func() {
		if b, err := os.ReadFile(filepath.Join(m, "pid")); err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid > 1 {
				_ = killPid(pid)
			}
		}
	})
	ctlPort, dPort := tcpPort(t), tcpPort(t)
	conf := fmt.Sprintf(`ClusterName=ferrytest
SlurmctldHost=%[1]s(127.0.0.1)
SlurmctldPort=%[2]d
SlurmdPort=%[3]d
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=%[4]s
PluginDir=%[5]s
StateSaveLocation=%[6]s/state
SlurmdSpoolDir=%[6]s/spool
SlurmctldPidFile=%[6]s/slurmctld.pid
SlurmdPidFile=%[6]s/slurmd.pid
SlurmctldLogFile=%[6]s/log/slurmctld.log
SlurmdLogFile=%[6]s/log/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
KillWait=60
NodeName=%[1]s NodeAddr=127.0.0.1 CPUs=%[7]d State=UNKNOWN
PartitionName=test Nodes=%[1]s Default=YES MaxTime=INFINITE State=UP
`, host, ctlPort, dPort, sock, filepath.Join(prefix, "plugins"), dir, runtime.NumCPU())
	if err := os.WriteFile(c.conf, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	c.env = append(os.Environ(), "SLURM_CONF="+c.conf, "PATH="+c.bin+":"+filepath.Dir(ferryBin)+":"+os.Getenv("PATH"))
	for _, argv := range [][]string{
		{filepath.Join(c.bin, "slurmctld"), "-D", "-i"},
		{filepath.Join(c.bin, "slurmd"), "-D", "-d", filepath.Join(c.bin, "slurmstepd")},
	} {
		cmd := exec.Command(argv[0], argv[1:]...)
		cmd.Env = c.env
		log, err := os.Create(filepath.Join(dir, "log", filepath.Base(argv[0])+".out"))
		if err != nil {
			t.Fatal(err)
		}
		cmd.Stdout, cmd.Stderr = log, log
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		log.Close()
		t.Cleanup(func() { _ = cmd.Process.Signal(os.Interrupt); waitOrKill(cmd, 10*time.Second) })
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, l := range []string{"log/slurmctld.log", "log/slurmd.log"} {
				b, _ := os.ReadFile(filepath.Join(dir, l))
				t.Logf("%s:\n%s", l, tail(string(b), 30))
			}
		}
	})
	eventually(t, 30*time.Second, "the Slurm node to be idle", func() bool {
		out, _ := c.run("sinfo", "-h", "-o", "%t")
		return strings.TrimSpace(out) == "idle"
	})
	return c
}

func (c *slurmCluster) run(name string, args ...string) (string, error) {
	cmd := exec.Command(filepath.Join(c.bin, name), args...)
	cmd.Env = c.env
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}

func (c *slurmCluster) must(name string, args ...string) string {
	c.t.Helper()
	out, err := c.run(name, args...)
	if err != nil {
		c.t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

func killPid(pid int) error {
	p, err := os.FindProcess(pid)
	if err != nil {
		return err
	}
	return p.Kill()
}

// waitOrKill waits for cmd to exit, killing it after d.
func waitOrKill(cmd *exec.Cmd, d time.Duration) {
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(d):
		_ = cmd.Process.Kill()
		<-done
	}
}

func tail(s string, n int) string {
	ls := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(ls[max(0, len(ls)-n):], "\n")
}

// readmeSlurmScript is the batch script of the README, as printed there.
func readmeSlurmScript(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, rest, ok := strings.Cut(string(b), "A Slurm batch script that requeues itself and resumes:\n\n```sh\n")
	script, _, ok2 := strings.Cut(rest, "```\n")
	if !ok || !ok2 || !strings.HasPrefix(script, "#!/bin/bash\n") {
		t.Fatal("README.md has no Slurm batch script where this test expects it")
	}
	return script
}

// simulate is the job of the README's example: a deterministic
// computation whose state lives only in the memory of a shell, one step
// every 0.1 s.
const simulate = `#!/bin/bash
read -r steps x < "$1"
for ((i = 1; i <= steps; i++)); do
  x=$(( (x * 1103515245 + 12345) % 2147483648 ))
  echo "step $i $x"
  sleep 0.1
done
echo "$x" > result.tmp && mv result.tmp result
`

func simulated(steps int, x uint64) uint64 {
	for range steps {
		x = (x*1103515245 + 12345) % 2147483648
	}
	return x
}

func TestSlurmPreemptRequeueResume(t *testing.T) {
	requireCriu(t)
	e := newEnv(t)
	c := startSlurm(t)
	srv := startS3(t, "", "", "ckpt")
	work := t.TempDir()
	const steps, seed = 200, 12345
	for name, text := range map[string]string{
		"job.sh": readmeSlurmScript(t), "simulate": simulate, "input.dat": fmt.Sprintf("%d %d\n", steps, seed),
	} {
		if err := os.WriteFile(filepath.Join(work, name), []byte(text), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	c.env = append(c.env, srv.env()...)
	c.env = append(c.env, "FERRY_ROOT="+e.root, "STORE=s3://ckpt/slurm")
	id := strings.TrimSpace(c.must("sbatch", "--parsable", "--chdir="+work, "--output="+filepath.Join(work, "out-%j.txt"),
		"--open-mode=append", filepath.Join(work, "job.sh")))
	t.Cleanup(func() { _, _ = c.run("scancel", id) })
	name := "sim-" + id
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(filepath.Join(work, "out-"+id+".txt"))
			t.Logf("batch output:\n%s", b)
			out, _ := c.run("scontrol", "show", "job", id)
			t.Logf("%s", out)
		}
	})

	// Preempt it once it is well under way: SIGTERM to the job step, as
	// --signal=TERM@N sends before the time limit.
	eventually(t, 60*time.Second, name+" to compute", func() bool {
		_, ok := e.list()[name]
		return ok && len(e.lines(name, "step ")) >= 30
	})
	c.must("scancel", "--signal=TERM", id)
	eventually(t, 60*time.Second, name+" to be requeued", func() bool {
		out, _ := c.run("scontrol", "show", "job", id)
		return strings.Contains(out, "Restarts=1")
	})
	// A requeued job waits for its begin time (two minutes); let it
	// start now.
	eventually(t, 60*time.Second, name+" to run again", func() bool {
		out, _ := c.run("scontrol", "show", "job", id)
		if strings.Contains(out, "JobState=PENDING") {
			_, _ = c.run("scontrol", "update", "JobId="+id, "StartTime=now")
		}
		return strings.Contains(out, "JobState=RUNNING")
	})
	eventually(t, 180*time.Second, "the result", func() bool {
		_, err := os.Stat(filepath.Join(work, "result"))
		return err == nil
	})
	got, _ := os.ReadFile(filepath.Join(work, "result"))
	want := simulated(steps, seed)
	if strings.TrimSpace(string(got)) != strconv.FormatUint(want, 10) {
		t.Fatalf("result %q, want %d (an uninterrupted run's)", got, want)
	}
	// It did stop and resume: snapshotted into the store, restored, and
	// the steps went on from where they were, none done twice.
	if r := e.ferryEnv(srv.env(), "snapshots", "--store", "s3://ckpt/slurm", name); r.code != 0 || !strings.Contains(r.stdout, "\n"+name+" ") {
		t.Fatalf("no snapshot of %s in the store: %s", name, r)
	}
	lines := e.lines(name, "step ")
	for i, l := range lines {
		if !strings.HasPrefix(l, strconv.Itoa(i+1)+" ") {
			t.Fatalf("step line %d is %q: steps repeated or skipped across the requeue", i+1, l)
		}
	}
	eventually(t, 60*time.Second, "the Slurm job to complete", func() bool {
		out, _ := c.run("scontrol", "show", "job", id)
		return strings.Contains(out, "JobState=COMPLETED")
	})
}

// tcpPort is a free TCP port on loopback (freePort, as a number).
func tcpPort(t *testing.T) int {
	t.Helper()
	p, err := strconv.Atoi(freePort(t, "tcp"))
	if err != nil {
		t.Fatal(err)
	}
	return p
}
