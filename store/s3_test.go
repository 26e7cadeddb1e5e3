package store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
)

// The S3 backend against a real S3 server: Versity's gateway, which
// scripts/provision-versitygw.sh builds into .deps/bin (make test runs it
// first). Without it these tests fail, except under -short (make
// unit-test, which provisions nothing).

const testS3Access, testS3Secret = "ferrytest", "ferrytestsecret"

// s3Server is a versitygw this test started on a free loopback port,
// serving a temporary directory (one subdirectory per bucket).
type s3Server struct {
	endpoint string
	dir      string
}

func startS3(t testing.TB, buckets ...string) *s3Server {
	t.Helper()
	if testing.Short() {
		t.Skip("needs the versitygw S3 server: skipped with -short")
	}
	gw, err := filepath.Abs("../.deps/bin/versitygw")
	if err == nil {
		_, err = os.Stat(gw)
	}
	if err != nil {
		t.Fatalf("no S3 server to test against (%v): run scripts/provision-versitygw.sh (make test does)", err)
	}
	dir := t.TempDir()
	for _, b := range buckets {
		if err := os.Mkdir(filepath.Join(dir, b), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	cmd := exec.Command(gw, "--access", testS3Access, "--secret", testS3Secret, "--port", addr, "posix", dir)
	var log bytes.Buffer
	cmd.Stdout, cmd.Stderr = &log, &log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	srv := &s3Server{endpoint: "http://" + addr, dir: dir}
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := http.Get(srv.endpoint)
		if err == nil {
			resp.Body.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("versitygw did not answer on %s: %v\n%s", addr, err, log.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Setenv("AWS_ACCESS_KEY_ID", testS3Access)
	t.Setenv("AWS_SECRET_ACCESS_KEY", testS3Secret)
	t.Setenv("AWS_ENDPOINT_URL", srv.endpoint)
	t.Setenv("AWS_REGION", "us-east-1")
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
	t.Setenv("AWS_CONFIG_FILE", filepath.Join(dir, "no-config"))
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", filepath.Join(dir, "no-credentials"))
	return srv
}

// openS3Store opens the store at loc with a lease of ttl (tests shorten
// it to see dead holders expire).
func openS3Store(t *testing.T, loc string, ttl time.Duration, opts Options) (*Store, *s3Backend) {
	t.Helper()
	b, err := newS3Backend(context.Background(), loc, false)
	if err != nil {
		t.Fatalf("opening %s: %v", loc, err)
	}
	if ttl > 0 {
		b.lease = ttl
	}
	s, err := OpenBackend(context.Background(), b, opts)
	if err != nil {
		t.Fatalf("opening %s: %v", loc, err)
	}
	t.Cleanup(func() { s.Close() })
	return s, b
}

func TestS3RoundTrip(t *testing.T) {
	startS3(t, "bkt")
	s, b := openS3Store(t, "s3://bkt/some/prefix", 0, Options{PackSize: 24 << 20})
	// 40 MiB of pages: packs of 24 MiB go up as multipart uploads of 8
	// MiB parts.
	files := criuLikeFiles(7, 40<<20)
	snap := add(t, s, "job", []byte("meta"), files...)
	checkSnapshot(t, s, snap, files...)
	verifyClean(t, s)
	objs, err := b.List(context.Background(), "packs/")
	if err != nil {
		t.Fatal(err)
	}
	var big bool
	for _, o := range objs {
		big = big || o.Size > s3PartSize
	}
	if !big {
		t.Fatalf("no pack larger than one part (%d): multipart uploads untested: %+v", s3PartSize, objs)
	}

	// Another host: nothing but the bucket.
	s2, _ := openS3Store(t, "s3://bkt/some/prefix/", 0, Options{})
	snaps, err := s2.Snapshots(context.Background(), "job")
	if err != nil || len(snaps) != 1 || snaps[0].ID != snap.ID {
		t.Fatalf("second client lists %+v, %v", snaps, err)
	}
	checkSnapshot(t, s2, snap, files...)

	// An unchanged second snapshot costs (almost) nothing.
	again := add(t, s2, "job", nil, files...)
	if again.NewBytes != 0 {
		t.Fatalf("an identical snapshot stored %d new bytes", again.NewBytes)
	}
	// No lease object is left behind by the holders that finished.
	locks, err := b.list(context.Background(), locksPrefix)
	if err != nil || len(locks) != 0 {
		t.Fatalf("lease objects left: %+v, %v", locks, err)
	}
}

func TestS3Unusable(t *testing.T) {
	startS3(t, "bkt")
	ctx := context.Background()
	_, err := Open(ctx, "s3://nobucket/p", Options{})
	if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), `bucket "nobucket" does not exist`) {
		t.Fatalf("missing bucket: %v", err)
	}
	if _, err := Open(ctx, "s3://bkt/p", Options{NoCreate: true}); !errors.Is(err, ErrNoStore) {
		t.Fatalf("NoCreate on an empty prefix: %v", err)
	}
	t.Setenv("AWS_ACCESS_KEY_ID", "")
	_, err = Open(ctx, "s3://bkt/p", Options{})
	if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "no AWS credentials") {
		t.Fatalf("no credentials: %v", err)
	}
	t.Setenv("AWS_ACCESS_KEY_ID", testS3Access)
	t.Setenv("AWS_SECRET_ACCESS_KEY", "wrong")
	_, err = Open(ctx, "s3://bkt/p", Options{})
	if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "refused access") {
		t.Fatalf("wrong secret: %v", err)
	}
	for _, bad := range []string{"s3://", "s3:///p", "s3://b/../x", "s3://b/.hidden"} {
		if _, err := Open(ctx, bad, Options{}); err == nil || errors.Is(err, ErrUnavailable) {
			t.Fatalf("Open(%q): %v, want a usage error", bad, err)
		}
	}
}

// TestS3Lease: writers on two "hosts" (two clients) share the lock; GC
// waits for both; a writer waits for GC; a killed holder's lease expires.
func TestS3Lease(t *testing.T) {
	startS3(t, "bkt")
	ctx := context.Background()
	const ttl = 3 * time.Second
	_, a := openS3Store(t, "s3://bkt/st", ttl, Options{})
	_, b := openS3Store(t, "s3://bkt/st", ttl, Options{})

	_, unlockA, err := a.LockLease(ctx, false)
	if err != nil {
		t.Fatal(err)
	}
	_, unlockB, err := b.LockLease(ctx, false)
	if err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
	_, _, err = b.LockLease(short, true)
	cancel()
	if !errors.Is(err, ErrBusy) {
		t.Fatalf("exclusive lock while two shared are held: %v, want ErrBusy", err)
	}
	got := make(chan error, 1)
	go func() {
		_, unlock, err := b.LockLease(ctx, true)
		if err == nil {
			err = unlock()
		}
		got <- err
	}()
	time.Sleep(300 * time.Millisecond)
	if err := unlockA(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-got:
		t.Fatalf("exclusive lock granted while B still holds it shared: %v", err)
	case <-time.After(300 * time.Millisecond):
	}
	if err := unlockB(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-got:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("exclusive lock not granted after the shared ones were released")
	}

	// An exclusive holder keeps new shared ones out.
	_, unlockX, err := a.LockLease(ctx, true)
	if err != nil {
		t.Fatal(err)
	}
	short, cancel = context.WithTimeout(ctx, 500*time.Millisecond)
	_, _, err = b.LockLease(short, false)
	cancel()
	if !errors.Is(err, ErrBusy) {
		t.Fatalf("shared lock while an exclusive one is held: %v, want ErrBusy", err)
	}
	if err := unlockX(); err != nil {
		t.Fatal(err)
	}

	// A holder that died (its marker never renewed, never removed)
	// delays GC by the lease, no more.
	dead := []byte("host=gone pid=1\n")
	if _, err := a.cli.PutObject(ctx, &s3.PutObjectInput{Bucket: &a.bucket, Key: a.key(locksPrefix + "shared/19700101T000000.000000Z-dead"),
		Body: bytes.NewReader(dead), ContentLength: aws.Int64(int64(len(dead)))}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	check, unlock, err := b.LockLease(ctx, true)
	if err != nil {
		t.Fatal(err)
	}
	if waited := time.Since(start); waited < ttl-time.Second {
		t.Fatalf("exclusive lock granted after %s over a live-looking marker (lease %s)", waited, ttl)
	}
	if err := check(); err != nil {
		t.Fatal(err)
	}
	if err := unlock(); err != nil {
		t.Fatal(err)
	}
	if locks, err := a.list(ctx, locksPrefix); err != nil || len(locks) != 0 {
		t.Fatalf("lease objects left (the dead one is removed by the exclusive holder): %+v, %v", locks, err)
	}
}

// TestS3GCDuringUpload: a prune on one host while another host is adding a
// snapshot that relies on chunks only a pruned snapshot held. The prune
// waits for the upload; nothing the new snapshot needs is deleted.
func TestS3GCDuringUpload(t *testing.T) {
	startS3(t, "bkt")
	ctx := context.Background()
	a, _ := openS3Store(t, "s3://bkt/st", 0, Options{PackSize: 4 << 20})
	b, _ := openS3Store(t, "s3://bkt/st", 0, Options{})
	files := criuLikeFiles(11, 8<<20)
	old := add(t, a, "job", nil, files...)

	// Host A begins a snapshot that dedups against old's chunks.
	w, err := a.Begin(ctx, "job2")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		fw, err := w.Create(f.name)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := fw.Write(f.data); err != nil {
			t.Fatal(err)
		}
		if err := fw.Close(); err != nil {
			t.Fatal(err)
		}
	}
	// Host B prunes job to nothing: old's chunks are dead but for A.
	pruned := make(chan error, 1)
	go func() {
		rep, err := b.Prune(ctx, "job", 0)
		if err == nil && len(rep.Removed) != 1 {
			err = fmt.Errorf("prune removed %d snapshots", len(rep.Removed))
		}
		pruned <- err
	}()
	select {
	case err := <-pruned:
		t.Fatalf("prune ran during another host's upload: %v", err)
	case <-time.After(1500 * time.Millisecond):
	}
	snap, err := w.Commit(nil)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-pruned:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("prune did not run after the upload ended")
	}
	if snaps, _ := b.Snapshots(ctx, "job"); len(snaps) != 0 {
		t.Fatalf("job's snapshots after prune to 0: %+v (%s)", snaps, old.ID)
	}
	checkSnapshot(t, b, snap, files...)
	verifyClean(t, b)
}

// TestS3AbortedUpload: a writer that dies mid-pack leaves a multipart
// upload nobody can see; the snapshot does not exist; GC aborts it.
func TestS3AbortedUpload(t *testing.T) {
	startS3(t, "bkt")
	ctx := context.Background()
	s, b := openS3Store(t, "s3://bkt/st", 0, Options{})
	ow, err := b.Create(ctx, "packs/00/0000000000000000000000000000dead")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(ow, bytes.NewReader(randBytes(3, s3PartSize+1000))); err != nil {
		t.Fatal(err)
	}
	// Neither committed nor aborted: a killed process.
	ow.(*s3Writer).wg.Wait()
	if objs, err := b.List(ctx, ""); err != nil || len(objs) != 1 || objs[0].Name != "config" {
		t.Fatalf("objects with an upload in progress: %+v, %v", objs, err)
	}
	rep, err := s.GC(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if rep.TempRemoved != 1 || rep.TempBytes != s3PartSize {
		t.Fatalf("GC report %+v, want the one upload of one part aborted", rep)
	}
	verifyClean(t, s)
}
