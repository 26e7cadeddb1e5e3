package store

import (
	"bytes"
	"context"
	"fmt"
	"testing"
)

// TestDedupScattered is the product requirement: a second snapshot of a
// job whose memory changed by 1% (pages rewritten at random places) costs
// at most 5% of the first, by the snapshot's own stats and by the growth
// of the directory; a second job with the same memory costs nothing but
// its record.
func TestDedupScattered(t *testing.T) {
	pagesSize := size(64<<20, 16<<20)
	dir := t.TempDir()
	s := openStore(t, dir, Options{})
	base := diskUsage(t, dir)

	v1 := criuLikeFiles(10, pagesSize)
	s1 := add(t, s, "job", nil, v1...)
	used1 := diskUsage(t, dir)
	grow1 := used1 - base

	v2 := append([]testFile(nil), v1...)
	var changed int
	v2[3].data, changed = changePages(v1[3].data, 0.01, 11)
	v2[1].data = compressible(99, 100<<10) // core image: rewritten every dump
	s2 := add(t, s, "job", nil, v2...)
	used2 := diskUsage(t, dir)
	grow2 := used2 - used1

	t.Logf("first: raw %d, new %d, stored %d, disk +%d", s1.RawBytes, s1.NewBytes, s1.StoredBytes, grow1)
	t.Logf("second (%d pages changed): raw %d, new %d, stored %d (%.2f%%), disk +%d (%.2f%%)",
		changed, s2.RawBytes, s2.NewBytes, s2.StoredBytes, 100*float64(s2.StoredBytes)/float64(s1.StoredBytes),
		grow2, 100*float64(grow2)/float64(grow1))
	if s2.StoredBytes > s1.StoredBytes/20 {
		t.Errorf("second snapshot stored %d bytes, more than 5%% of the first's %d", s2.StoredBytes, s1.StoredBytes)
	}
	if grow2 > grow1/20 {
		t.Errorf("second snapshot grew the store by %d bytes, more than 5%% of the first's %d", grow2, grow1)
	}
	// Every changed page is new (random bytes), and nothing else of the
	// pages file is; plus the rewritten core image.
	if lo, hi := int64(changed*page), int64(changed*page+len(v2[1].data)); s2.NewBytes < lo || s2.NewBytes > hi {
		t.Errorf("second snapshot NewBytes %d, want between %d and %d", s2.NewBytes, lo, hi)
	}
	// Stored bytes are what the directory grew by, but for the record.
	if d := grow2 - s2.StoredBytes; d < 0 || d > 4096 {
		t.Errorf("disk grew %d bytes, stats say %d", grow2, s2.StoredBytes)
	}

	// Another job with identical memory: nothing new at all, not even
	// ref lists; the directory grows by one record.
	s3 := add(t, s, "twin", nil, v2...)
	grow3 := diskUsage(t, dir) - used2
	t.Logf("twin job: new %d, stored %d, disk +%d", s3.NewBytes, s3.StoredBytes, grow3)
	if s3.NewBytes != 0 || s3.StoredBytes != 0 || grow3 > 4096 {
		t.Errorf("identical job: NewBytes %d StoredBytes %d disk +%d, want 0, 0, one record", s3.NewBytes, s3.StoredBytes, grow3)
	}

	checkSnapshot(t, s, s1, v1...)
	checkSnapshot(t, s, s2, v2...)
	checkSnapshot(t, s, s3, v2...)
	verifyClean(t, s)
}

// TestZeroPages: all-zero chunks, of pages files and of other files, cost
// nothing but their refs.
func TestZeroPages(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir, Options{})
	before := diskUsage(t, dir)
	zeros := []testFile{
		{"pages-1.img", make([]byte, 32<<20)},
		{"tmpfs-dev-1.tar.img", make([]byte, 1<<20+123)},
	}
	snap := add(t, s, "z", nil, zeros...)
	grow := diskUsage(t, dir) - before
	t.Logf("zero snapshot: raw %d zero %d new %d stored %d, disk +%d", snap.RawBytes, snap.ZeroBytes, snap.NewBytes, snap.StoredBytes, grow)
	if snap.ZeroBytes != snap.RawBytes || snap.NewBytes != 0 {
		t.Fatalf("ZeroBytes %d NewBytes %d of %d raw", snap.ZeroBytes, snap.NewBytes, snap.RawBytes)
	}
	if snap.StoredBytes > 1024 || grow > 8192 {
		t.Fatalf("33 MiB of zeros cost %d stored bytes, %d on disk", snap.StoredBytes, grow)
	}
	checkSnapshot(t, s, snap, zeros...)

	// Half zero, half data: only the data is stored.
	half := randBytes(5, 8<<20)
	for i := 0; i < len(half)/page; i += 2 {
		clear(half[i*page : (i+1)*page])
	}
	h := add(t, s, "z", nil, testFile{"pages-2.img", half})
	if h.ZeroBytes != int64(len(half)/2) || h.NewBytes != int64(len(half)/2) {
		t.Fatalf("half zero: ZeroBytes %d NewBytes %d", h.ZeroBytes, h.NewBytes)
	}
	checkSnapshot(t, s, h, testFile{"pages-2.img", half})
	verifyClean(t, s)
}

// TestDuplicateWithinSnapshot: the same page many times in one snapshot,
// across files written at once, is stored once.
func TestDuplicateWithinSnapshot(t *testing.T) {
	s := openStore(t, t.TempDir(), Options{})
	p := randBytes(6, page)
	data := bytes.Repeat(p, 2048)
	snap := add(t, s, "d", nil, testFile{"pages-1.img", data}, testFile{"pages-2.img", data}, testFile{"pages-3.img", data})
	if snap.NewBytes != page {
		t.Fatalf("NewBytes %d, want one page", snap.NewBytes)
	}
	checkSnapshot(t, s, snap, testFile{"pages-1.img", data}, testFile{"pages-2.img", data}, testFile{"pages-3.img", data})
}

// TestConcurrentWriters: two snapshots of the same new data at once, in
// one store, each claiming the same chunks: both read back, GC keeps what
// they need and Verify is clean.
func TestConcurrentWriters(t *testing.T) {
	s := openStore(t, t.TempDir(), Options{PackSize: 1 << 20})
	files := criuLikeFiles(7, 8<<20)
	snaps := make(chan Snapshot, 2)
	for _, job := range []string{"a", "b"} {
		go func() { snaps <- add(t, s, job, nil, files...) }()
	}
	a, b := <-snaps, <-snaps
	if _, err := s.GC(context.Background()); err != nil {
		t.Fatal(err)
	}
	checkSnapshot(t, s, a, files...)
	checkSnapshot(t, s, b, files...)
	verifyClean(t, s)
}

// TestConcurrentCreate: one snapshot's files created and written from
// many goroutines at once.
func TestConcurrentCreate(t *testing.T) {
	s := openStore(t, t.TempDir(), Options{})
	w, err := s.Begin(context.Background(), "many")
	if err != nil {
		t.Fatal(err)
	}
	const n = 64
	files := make([]testFile, n)
	errs := make(chan error, n)
	for i := range n {
		files[i] = testFile{fmt.Sprintf("core-%d.img", i), compressible(uint64(i), 1000+i*3000)}
		if i%4 == 0 {
			files[i] = testFile{fmt.Sprintf("pages-%d.img", i), randBytes(uint64(i), 1<<20+i*page)}
		}
		go func() {
			fw, err := w.Create(files[i].name)
			if err == nil {
				_, err = fw.Write(files[i].data)
			}
			if err == nil {
				err = fw.Close()
			}
			errs <- err
		}()
	}
	for range n {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	snap, err := w.Commit(nil)
	if err != nil {
		t.Fatal(err)
	}
	if snap.Files != n {
		t.Fatalf("%d files, want %d", snap.Files, n)
	}
	checkSnapshot(t, s, snap, files...)
}
