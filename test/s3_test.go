package test

import (
	"bytes"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The snapshot store on S3: every store command against a real S3 server,
// Versity's gateway (versitygw), which scripts/provision-versitygw.sh
// builds into .deps/bin (make test runs it first). The tests start and
// stop it themselves, on loopback or in a network namespace they made.

const s3Access, s3Secret = "ferrytest", "ferrytestsecret"

// s3Server is a versitygw this test started, serving dir (a bucket is a
// subdirectory of it).
type s3Server struct {
	endpoint string
	dir      string
}

// startS3 starts versitygw on addr ("" for a free loopback port), inside
// network namespace ns unless ns is "", with the given buckets. A missing
// versitygw fails the test: it is provisioned, not optional.
func startS3(t *testing.T, ns, addr string, buckets ...string) *s3Server {
	t.Helper()
	gw, err := filepath.Abs("../.deps/bin/versitygw")
	if err == nil {
		_, err = os.Stat(gw)
	}
	if err != nil {
		t.Fatalf("no S3 server for the S3 store tests (%v): run scripts/provision-versitygw.sh (make test does)", err)
	}
	if addr == "" {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr = l.Addr().String()
		l.Close()
	}
	dir := t.TempDir()
	for _, b := range buckets {
		if err := os.Mkdir(filepath.Join(dir, b), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	argv := []string{gw, "--access", s3Access, "--secret", s3Secret, "--port", addr, "posix", dir}
	if ns != "" {
		argv = append([]string{"nsenter", "--net=/run/netns/" + ns}, argv...)
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	var log syncBuffer
	cmd.Stdout, cmd.Stderr = &log, &log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	eventually(t, 20*time.Second, "versitygw to listen on "+addr, func() bool {
		return strings.Contains(log.String(), "listening on")
	})
	if ns == "" {
		eventually(t, 10*time.Second, "versitygw to answer", func() bool {
			c, err := net.Dial("tcp", addr)
			if err == nil {
				c.Close()
			}
			return err == nil
		})
	} else {
		time.Sleep(200 * time.Millisecond) // bound just after the line above
	}
	return &s3Server{endpoint: "http://" + addr, dir: dir}
}

// env is what ferry needs to reach s: the standard AWS variables, and
// nothing from this machine's own AWS configuration.
func (s *s3Server) env() []string {
	return []string{
		"AWS_ACCESS_KEY_ID=" + s3Access, "AWS_SECRET_ACCESS_KEY=" + s3Secret,
		"AWS_ENDPOINT_URL=" + s.endpoint, "AWS_REGION=us-east-1", "AWS_EC2_METADATA_DISABLED=true",
		"AWS_CONFIG_FILE=" + filepath.Join(s.dir, "no-config"),
		"AWS_SHARED_CREDENTIALS_FILE=" + filepath.Join(s.dir, "no-credentials"),
	}
}

// setEnv puts s.env() into this process's environment for the test, so
// that every ferry it starts, and the shims those start, reach s.
func (s *s3Server) setEnv(t *testing.T) {
	for _, kv := range s.env() {
		k, v, _ := strings.Cut(kv, "=")
		t.Setenv(k, v)
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// exitsWithLine checks that a failure exited code and said one clear line.
func exitsWithLine(t *testing.T, r result, code int, want string) {
	t.Helper()
	if r.code != code {
		t.Fatalf("want exit %d: %s", code, r)
	}
	oneLine(t, "ferry", r, want)
}

func TestS3Store(t *testing.T) {
	requireCriu(t)
	w := buildWorkload(t)
	e := newEnv(t)
	srv := startS3(t, "", "", "ferry")
	srv.setEnv(t)
	url := "s3://ferry/site/store"
	bucket := filepath.Join(srv.dir, "ferry")

	e.must("run", "--name", "churn", "--", w, "churn", "256")
	e.waitLines("churn", "ready", 1)

	t.Run("a missing bucket and wrong credentials say so in one line", func(t *testing.T) {
		for _, args := range [][]string{{"checkpoint", "--store", "s3://nobucket/x", "churn"}, {"snapshots", "--store", "s3://nobucket/x"}} {
			exitsWithLine(t, e.ferry(args...), 24, `S3 bucket "nobucket" does not exist`)
		}
		bad := []string{"AWS_SECRET_ACCESS_KEY=not-the-secret"}
		for _, args := range [][]string{{"checkpoint", "--store", url, "churn"}, {"verify", "--store", url}, {"restore", "--store", url, "churn"}} {
			exitsWithLine(t, e.ferryEnv(bad, args...), 24, "refused access")
		}
		exitsWithLine(t, e.ferry("snapshots", "--store", url), 24, "no snapshot store")
		if v := e.job("churn"); v.State != "running" {
			t.Fatalf("job after failed snapshots: %s", v.State)
		}
	})

	var sums []string
	var last snapshotInfo
	t.Run("a 1% change costs at most 5% of the first snapshot", func(t *testing.T) {
		first := e.snapshot(url, "churn")
		grew1 := dirSize(t, bucket)
		e.signalJob("churn", unix.SIGUSR1)
		e.waitLines("churn", "churned ", 1)
		sums = append(sums, e.lastField("churn", "churned "))
		last = e.snapshot(url, "churn")
		grew2 := dirSize(t, bucket) - grew1
		t.Logf("first: %d raw, %d stored (bucket grew %d); second: %d new, %d stored (bucket grew %d)",
			first.RawBytes, first.StoredBytes, grew1, last.NewBytes, last.StoredBytes, grew2)
		if first.RawBytes < 256<<20 || grew1 < 200<<20 {
			t.Fatalf("first snapshot: %d raw bytes, bucket grew %d: want the whole 256 MiB of random memory", first.RawBytes, grew1)
		}
		if last.StoredBytes*20 > first.StoredBytes || grew2*20 > grew1 {
			t.Fatalf("second snapshot wrote %d bytes (bucket grew %d), over 5%% of the first's %d (%d)",
				last.StoredBytes, grew2, first.StoredBytes, grew1)
		}
		if got := len(e.snapshots(url, "churn")); got != 2 {
			t.Fatalf("%d snapshots listed, want 2", got)
		}
		if out := e.must("verify", "--store", url); !strings.Contains(out, "ok") {
			t.Fatalf("verify --store: %s", out)
		}
	})
	if len(sums) != 1 {
		t.FailNow()
	}

	t.Run("restore on a host that has nothing but the bucket", func(t *testing.T) {
		other := newEnv(t)
		other.must("restore", "--store", url, "--name", "moved", "churn")
		other.signalJob("moved", unix.SIGUSR2)
		other.waitLines("moved", "sum ", 1)
		if got := other.lastField("moved", "sum "); got != sums[0] {
			t.Fatalf("restored memory %s, want %s", got, sums[0])
		}
		other.must("kill", "moved")
	})

	t.Run("prune during another host's upload waits and keeps what it needs", func(t *testing.T) {
		other := newEnv(t)
		e.must("run", "--name", "twin1", "--", w, "memory", "64")
		e.must("run", "--name", "twin2", "--", w, "memory", "64")
		e.waitLines("twin1", "sum ", 1)
		e.waitLines("twin2", "sum ", 1)
		sum := e.lines("twin2", "sum ")[0]
		first := e.snapshot(url, "twin1")
		// This host adds twin2, whose memory is twin1's: it stores
		// references to twin1's chunks. It is stopped in the middle.
		leases := filepath.Join(bucket, "site", "store", "locks", "shared", "*")
		cmd := exec.Command(ferryBin, "--root", e.root, "checkpoint", "--store", url, "--json", "twin2")
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		// Stopped as soon as its lease is in the bucket: it takes the
		// lease before it reads what the bucket holds.
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(time.Millisecond) {
			if m, _ := filepath.Glob(leases); len(m) > 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("no lease of the snapshot in the bucket after 30s\n%s", out.String())
			}
		}
		if err := cmd.Process.Signal(unix.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		stopped := true
		defer func() {
			if stopped {
				_ = cmd.Process.Signal(unix.SIGCONT)
			}
			_ = cmd.Wait()
		}()
		// The other host prunes twin1 away: its chunks are garbage but
		// for the snapshot in progress.
		prune := exec.Command(ferryBin, "--root", other.root, "prune", "--store", url, "--keep", "0", "twin1")
		var pout bytes.Buffer
		prune.Stdout, prune.Stderr = &pout, &pout
		if err := prune.Start(); err != nil {
			t.Fatal(err)
		}
		pruned := make(chan error, 1)
		go func() { pruned <- prune.Wait() }()
		t.Cleanup(func() { _ = prune.Process.Kill() })
		select {
		case err := <-pruned:
			t.Fatalf("prune finished while another host's snapshot was in progress: %v\n%s", err, pout.String())
		case <-time.After(3 * time.Second):
		}
		_ = cmd.Process.Signal(unix.SIGCONT)
		stopped = false
		if err := cmd.Wait(); err != nil {
			t.Fatalf("checkpoint of twin2: %v\n%s", err, out.String())
		}
		select {
		case err := <-pruned:
			if err != nil {
				t.Fatalf("prune: %v\n%s", err, pout.String())
			}
		case <-time.After(60 * time.Second):
			_ = prune.Process.Kill()
			t.Fatal("prune did not finish after the upload ended")
		}
		if got := e.snapshots(url, "twin1"); len(got) != 0 {
			t.Fatalf("twin1's snapshots after prune --keep 0: %+v (first %s)", got, first.ID)
		}
		if out := other.must("verify", "--store", url); !strings.Contains(out, "ok") {
			t.Fatalf("verify after prune: %s", out)
		}
		other.must("restore", "--store", url, "--name", "twin2b", "twin2")
		other.assertContinues("twin2b", sum, 0)
		other.must("kill", "twin2b")
		e.must("kill", "twin1")
		e.must("kill", "twin2")
	})

	t.Run("run --checkpoint-every and --checkpoint-on-term into the bucket", func(t *testing.T) {
		// The shim runs `ferry checkpoint --store URL` itself: the
		// credentials must reach it through the environment.
		e.runPeriodic(url, "tick", w, 60*time.Second)
		e.must("kill", "tick")

		cmd, out := e.spawnFerry(spawn{}, "run", "--name", "term", "--store", url, "--checkpoint-on-term", "--", w, "memory", "16")
		eventually(t, 20*time.Second, "ferry run to start the job", func() bool {
			_, ok := e.list()["term"]
			return ok
		})
		e.waitLines("term", "verify ", 2)
		sum := e.lines("term", "sum ")[0]
		if err := cmd.Process.Signal(unix.SIGTERM); err != nil {
			t.Fatal(err)
		}
		if code := waitExit(t, cmd); code != 26 {
			t.Fatalf("ferry run --checkpoint-on-term after SIGTERM: exit %d (want 26)\n%s", code, out)
		}
		e.must("restore", "--store", url, "term")
		e.assertContinues("term", sum, 0)
		e.must("kill", "term")
	})

	t.Run("checkpoint --all and restore --all", func(t *testing.T) {
		e.must("checkpoint", "--all", "--store", url)
		if v := e.job("churn"); v.State != "exited" {
			t.Fatalf("churn after checkpoint --all: %s", v.State)
		}
		out := e.must("restore", "--all", "--store", url)
		if !strings.Contains(out, "restored churn") {
			t.Fatalf("restore --all did not restore churn:\n%s", out)
		}
		e.signalJob("churn", unix.SIGUSR2)
		e.waitLines("churn", "sum ", 1)
		if got := e.lastField("churn", "sum "); got != sums[0] {
			t.Fatalf("churn after restore --all has memory %s, want %s", got, sums[0])
		}
	})

	// Last: the killed snapshot's lease stays in the bucket until it
	// expires, which would hold up a prune for a minute.
	t.Run("kill -9 in the middle of an upload leaves no trace in the listing", func(t *testing.T) {
		before := e.snapshots(url, "")
		e.must("run", "--name", "fresh", "--", w, "churn", "128") // all new pages
		e.waitLines("fresh", "ready", 1)
		started := time.Now()
		cmd := exec.Command(ferryBin, "--root", e.root, "checkpoint", "--store", url, "fresh")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		// Kill it once the server holds part of a pack: a multipart
		// upload (versitygw keeps those under .sgwtmp).
		eventually(t, 60*time.Second, "a multipart upload in progress", func() bool {
			found := false
			_ = filepath.Walk(filepath.Join(bucket, ".sgwtmp", "multipart"), func(p string, fi os.FileInfo, err error) error {
				if err == nil && fi.Mode().IsRegular() && fi.Size() > 0 {
					found = true
				}
				return nil
			})
			return found
		})
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		for _, d := range []string{"/dev/shm", os.TempDir()} {
			leftovers, _ := filepath.Glob(filepath.Join(d, ".ferry-scratch-checkpoint-*"))
			for _, l := range leftovers {
				if fi, err := os.Stat(l); err == nil && fi.ModTime().After(started) {
					_ = os.RemoveAll(l)
				}
			}
		}
		after := e.snapshots(url, "")
		if len(after) != len(before) {
			t.Fatalf("snapshots after the killed upload: %+v, before: %+v", after, before)
		}
		if out := e.must("verify", "--store", url); !strings.Contains(out, "ok") {
			t.Fatalf("verify --store after the kill: %s", out)
		}
		for _, name := range []string{"fresh", "churn"} {
			if v := e.job(name); v.State != "running" {
				t.Fatalf("%s after the killed snapshot: %s", name, v.State)
			}
			e.must("kill", name)
		}
	})
}

// TestS3TwoHosts: two hosts (two FERRY_ROOTs, each in its own network
// namespace) add snapshots of different jobs with the same memory to one
// bucket at once; each restores the other's.
func TestS3TwoHosts(t *testing.T) {
	requireCriu(t)
	w := buildWorkload(t)
	h := newHosts(t)
	srv := startS3(t, h.a, h.addrA+":9000", "shared")
	url := "s3://shared/fleet"
	a, b := newEnv(t), newEnv(t)
	in := func(e *env, ns string, args ...string) result {
		return e.runFerry([]string{"nsenter", "--net=/run/netns/" + ns}, srv.env(), args...)
	}
	must := func(e *env, ns string, args ...string) string {
		t.Helper()
		r := in(e, ns, args...)
		if r.code != 0 {
			t.Fatalf("ferry %s in %s: %s", strings.Join(args, " "), ns, r)
		}
		return r.stdout
	}
	must(a, h.a, "run", "--name", "ja", "--", w, "memory", "64")
	must(b, h.b, "run", "--name", "jb", "--", w, "memory", "64")
	a.waitLines("ja", "sum ", 1)
	b.waitLines("jb", "sum ", 1)
	sum := a.lines("ja", "sum ")[0]
	if got := b.lines("jb", "sum ")[0]; got != sum {
		t.Fatalf("the two jobs' memory differs: %s, %s", sum, got)
	}

	for round := range 2 {
		var wg sync.WaitGroup
		res := make([]result, 2)
		wg.Go(func() { res[0] = in(a, h.a, "checkpoint", "--store", url, "ja") })
		wg.Go(func() { res[1] = in(b, h.b, "checkpoint", "--store", url, "jb") })
		wg.Wait()
		for i, r := range res {
			if r.code != 0 {
				t.Fatalf("round %d, host %d: %s", round, i, r)
			}
		}
		t.Logf("round %d: %s%s", round, res[0].stdout, res[1].stdout)
	}
	out := must(b, h.b, "snapshots", "--store", url)
	if strings.Count(out, "\nja ") != 2 || strings.Count(out, "\njb ") != 2 {
		t.Fatalf("snapshots of both hosts, two rounds each:\n%s", out)
	}
	// Host b alone adds one more of jb: everything is in the bucket.
	var third snapshotInfo
	r := in(b, h.b, "checkpoint", "--store", url, "--json", "jb")
	if r.code != 0 {
		t.Fatalf("checkpoint --json: %s", r)
	}
	third = parseSnapshot(t, r.stdout)
	if third.NewBytes*50 > third.RawBytes {
		t.Fatalf("a third snapshot of the same memory stored %d new bytes of %d", third.NewBytes, third.RawBytes)
	}
	if out := must(a, h.a, "verify", "--store", url); !strings.Contains(out, "ok") {
		t.Fatalf("verify: %s", out)
	}
	// Each host restores the other's job.
	must(a, h.a, "restore", "--store", url, "--name", "jb-on-a", "jb")
	must(b, h.b, "restore", "--store", url, "--name", "ja-on-b", "ja")
	a.assertContinues("jb-on-a", sum, 0)
	b.assertContinues("ja-on-b", sum, 0)
	for _, x := range []struct {
		e    *env
		ns   string
		jobs []string
	}{{a, h.a, []string{"ja", "jb-on-a"}}, {b, h.b, []string{"jb", "ja-on-b"}}} {
		for _, j := range x.jobs {
			must(x.e, x.ns, "kill", j)
		}
	}
}

// parseSnapshot reads the snapshot of `checkpoint --store --json`.
func parseSnapshot(t *testing.T, out string) snapshotInfo {
	t.Helper()
	var res struct {
		Snapshot *snapshotInfo `json:"snapshot"`
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil || res.Snapshot == nil {
		t.Fatalf("checkpoint --store --json: %v\n%s", err, out)
	}
	return *res.Snapshot
}
