package store

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// countFiles counts the regular files under dir/sub.
func countFiles(t testing.TB, dir, sub string) int {
	t.Helper()
	n := 0
	filepath.WalkDir(filepath.Join(dir, sub), func(_ string, d os.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			n++
		}
		return nil
	})
	return n
}

// TestAbandonedWriter: a writer that never commits (its process is
// stuck, or about to die) leaves no snapshot; the store verifies clean
// from another handle meanwhile.
func TestAbandonedWriter(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir, Options{PackSize: 1 << 20})
	w, err := s.Begin(context.Background(), "job")
	if err != nil {
		t.Fatal(err)
	}
	f, _ := w.Create("pages-1.img")
	if _, err := f.Write(randBytes(1, 8<<20)); err != nil {
		t.Fatal(err)
	}
	other := openStore(t, dir, Options{})
	if snaps, err := other.Snapshots(context.Background(), ""); err != nil || len(snaps) != 0 {
		t.Fatalf("snapshots while a writer is open: %v %v", snaps, err)
	}
	verifyClean(t, other)
	if err := w.Abort(); err != nil {
		t.Fatal(err)
	}
	if err := w.Abort(); err != nil {
		t.Fatalf("second Abort: %v", err)
	}
	if _, err := f.Write([]byte("x")); err == nil {
		t.Fatal("Write after Abort succeeded")
	}
	if _, err := w.Commit(nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("Commit after Abort: %v", err)
	}
	if n := countFiles(t, dir, "tmp"); n != 0 {
		t.Fatalf("Abort left %d files in tmp", n)
	}
	rep, err := other.GC(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if n := countFiles(t, dir, "packs"); n != 0 || rep.PacksDeleted == 0 {
		t.Fatalf("GC left %d packs of an aborted snapshot (report %+v)", n, rep)
	}
}

const crashChildEnv = "FERRY_STORE_CRASH_CHILD"

// TestCrashKill SIGKILLs a process in the middle of adding a snapshot,
// once it has sealed packs and has one half written: the store opens,
// verifies clean, lists no new snapshot, still reads the old one, and GC
// gives back every byte the dead writer wrote.
func TestCrashKill(t *testing.T) {
	if dir := os.Getenv(crashChildEnv); dir != "" {
		crashChild(dir)
		return
	}
	if testing.Short() {
		t.Skip("re-executes the test binary")
	}
	dir := t.TempDir()
	s := openStore(t, dir, Options{})
	old := criuLikeFiles(20, 4<<20)
	keep := add(t, s, "job", nil, old...)
	before := diskUsage(t, dir)
	packsBefore := countFiles(t, dir, "packs")

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestCrashKill$", "-test.count=1")
	cmd.Env = append(os.Environ(), crashChildEnv+"="+dir)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Make sure to not leave a zombie.
		cmd.Process.Kill()
		cmd.Wait()
	})
	deadline := time.Now().Add(30 * time.Second)
	for countFiles(t, dir, "packs") < packsBefore+3 || countFiles(t, dir, "tmp") == 0 {
		if time.Now().After(deadline) {
			t.Fatal("child wrote no packs in 30s")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	err := cmd.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("child: %v, want killed", err)
	}

	s2 := openStore(t, dir, Options{})
	snaps, err := s2.Snapshots(context.Background(), "")
	if err != nil || len(snaps) != 1 || snaps[0].ID != keep.ID {
		t.Fatalf("after the crash: %v %v, want only %s", snaps, err, keep.ID)
	}
	verifyClean(t, s2)
	checkSnapshot(t, s2, keep, old...)
	rep, err := s2.GC(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("GC after the crash: %+v", rep)
	if rep.TempRemoved == 0 || rep.PacksDeleted < 3 {
		t.Errorf("GC removed %d temporary files and %d packs, want the dead writer's", rep.TempRemoved, rep.PacksDeleted)
	}
	if after := diskUsage(t, dir); after != before {
		t.Errorf("store is %d bytes after GC, %d before the crashed snapshot", after, before)
	}
	verifyClean(t, s2)
	checkSnapshot(t, s2, keep, old...)
}

// crashChild adds a snapshot that never ends, packing every MiB, until
// it is killed (or a minute passes, so it cannot run away).
func crashChild(dir string) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s, err := Open(ctx, dir, Options{PackSize: 1 << 20})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	w, err := s.Begin(ctx, "job")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	f, err := w.Create("pages-1.img")
	if err != nil {
		os.Exit(2)
	}
	for i := uint64(100); ctx.Err() == nil; i++ {
		if _, err := f.Write(randBytes(i, 1<<20)); err != nil {
			os.Exit(2)
		}
	}
	os.Exit(3)
}

// failingBackend is the directory backend with a disk that fills up:
// writes fail with ENOSPC once limit bytes were written through it, and
// it can refuse to commit objects whose name has a given prefix.
type failingBackend struct {
	*dirBackend
	limit      int64
	written    atomic.Int64
	failCommit string
}

func (b *failingBackend) Create(ctx context.Context, name string) (ObjectWriter, error) {
	ow, err := b.dirBackend.Create(ctx, name)
	if err != nil {
		return nil, err
	}
	return &failingWriter{ObjectWriter: ow, b: b, name: name}, nil
}

type failingWriter struct {
	ObjectWriter
	b    *failingBackend
	name string
}

func (w *failingWriter) Write(p []byte) (int, error) {
	if w.b.limit > 0 && w.b.written.Add(int64(len(p))) > w.b.limit {
		return 0, &os.PathError{Op: "write", Path: w.name, Err: syscall.ENOSPC}
	}
	return w.ObjectWriter.Write(p)
}

func (w *failingWriter) Commit() error {
	if w.b.failCommit != "" && strings.HasPrefix(w.name, w.b.failCommit) {
		return errors.Join(&os.PathError{Op: "fsync", Path: w.name, Err: syscall.EIO}, w.ObjectWriter.Abort())
	}
	return w.ObjectWriter.Commit()
}

// TestDiskFull: a store whose disk fills up mid-snapshot, or that cannot
// commit a pack or the record, lists no snapshot, verifies clean, and GC
// returns it to what it was.
func TestDiskFull(t *testing.T) {
	for _, tc := range []struct {
		desc       string
		limit      int64
		failCommit string
	}{
		{"ENOSPC mid-pack", 5 << 20, ""},
		{"pack commit fails", 0, "packs/"},
		{"record commit fails", 0, "snapshots/"},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			dir := t.TempDir()
			ctx := context.Background()
			s := openStore(t, dir, Options{})
			old := criuLikeFiles(30, 2<<20)
			keep := add(t, s, "job", nil, old...)
			before := diskUsage(t, dir)

			db, _, err := newDirBackend(dir)
			if err != nil {
				t.Fatal(err)
			}
			fs, err := OpenBackend(ctx, &failingBackend{dirBackend: db, limit: tc.limit, failCommit: tc.failCommit}, Options{PackSize: 1 << 20})
			if err != nil {
				t.Fatal(err)
			}
			defer fs.Close()
			w, err := fs.Begin(ctx, "job")
			if err != nil {
				t.Fatal(err)
			}
			f, _ := w.Create("pages-1.img")
			var werr error
			for i := uint64(0); i < 16 && werr == nil; i++ {
				_, werr = f.Write(randBytes(200+i, 1<<20))
			}
			if werr == nil {
				werr = f.Close()
			}
			if werr == nil {
				_, werr = w.Commit([]byte("meta"))
			} else {
				f.Close()
				if _, err := w.Commit(nil); err == nil {
					t.Fatal("Commit after a failed write succeeded")
				}
			}
			if werr == nil {
				t.Fatal("no error from a failing disk")
			}
			t.Logf("error: %v", werr)
			if err := w.Abort(); err != nil {
				t.Fatalf("Abort after a failed Commit: %v", err)
			}

			snaps, err := s.Snapshots(ctx, "")
			if err != nil || len(snaps) != 1 || snaps[0].ID != keep.ID {
				t.Fatalf("after the failure: %v %v", snaps, err)
			}
			verifyClean(t, s)
			if _, err := s.GC(ctx); err != nil {
				t.Fatal(err)
			}
			if after := diskUsage(t, dir); after != before {
				t.Errorf("store is %d bytes after GC, %d before", after, before)
			}
			checkSnapshot(t, s, keep, old...)
			verifyClean(t, s)
		})
	}
}

// TestCancel: a snapshot whose context ends mid-write fails, leaves
// nothing listed, and releases the lock.
func TestCancel(t *testing.T) {
	s := openStore(t, t.TempDir(), Options{PackSize: 1 << 20})
	ctx, cancel := context.WithCancel(context.Background())
	w, err := s.Begin(ctx, "job")
	if err != nil {
		t.Fatal(err)
	}
	f, _ := w.Create("pages-1.img")
	if _, err := f.Write(randBytes(3, 4<<20)); err != nil {
		t.Fatal(err)
	}
	cancel()
	var werr error
	for i := 0; i < 64 && werr == nil; i++ {
		_, werr = f.Write(randBytes(uint64(4+i), 1<<20))
	}
	if werr == nil {
		werr = f.Close()
	}
	f.Close()
	_, cerr := w.Commit(nil)
	if !errors.Is(werr, context.Canceled) && !errors.Is(cerr, context.Canceled) {
		t.Fatalf("write: %v, commit: %v; want context.Canceled", werr, cerr)
	}
	if snaps, _ := s.Snapshots(context.Background(), ""); len(snaps) != 0 {
		t.Fatalf("snapshots: %v", snaps)
	}
	gctx, gcancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer gcancel()
	if _, err := s.GC(gctx); err != nil {
		t.Fatalf("GC after a cancelled snapshot (lock not released?): %v", err)
	}
	verifyClean(t, s)
}
