package store

import (
	"context"
	"errors"
	"testing"
	"time"
)

// TestPrune: pruning keeps every chunk a remaining snapshot refers to
// (each reads back byte for byte and Verify is clean) and frees the rest:
// each version rewrites 60% of the pages, so the oldest packs end up
// mostly dead and are repacked.
func TestPrune(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s := openStore(t, dir, Options{PackSize: 4 << 20})
	type version struct {
		snap  Snapshot
		files []testFile
	}
	var a, b []version
	files := criuLikeFiles(40, 8<<20)
	for i := range 4 {
		if i > 0 {
			files = append([]testFile(nil), files...)
			files[3].data, _ = changePages(files[3].data, 0.6, uint64(41+i))
			files[1].data = compressible(uint64(50+i), 100<<10)
		}
		a = append(a, version{add(t, s, "a", nil, files...), files})
	}
	bfiles := criuLikeFiles(60, 4<<20)
	for range 2 {
		b = append(b, version{add(t, s, "b", nil, bfiles...), bfiles})
	}
	full := diskUsage(t, dir)

	rep, err := s.Prune(ctx, "a", 2)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("prune a to 2: removed %d, kept %d, gc %+v", len(rep.Removed), rep.Kept, rep.GC)
	if len(rep.Removed) != 2 || rep.Removed[0].ID != a[0].snap.ID || rep.Removed[1].ID != a[1].snap.ID || rep.Kept != 2 {
		t.Fatalf("prune report %+v", rep)
	}
	if rep.GC.BytesFreed <= 0 || rep.GC.PacksDeleted == 0 {
		t.Fatalf("GC freed nothing: %+v", rep.GC)
	}
	pruned := diskUsage(t, dir)
	if d := full - pruned - rep.GC.BytesFreed; d < 0 || d > 8192 {
		t.Fatalf("directory shrank by %d, GC says %d (+ two records)", full-pruned, rep.GC.BytesFreed)
	}
	for _, v := range append(a[2:], b...) {
		checkSnapshot(t, s, v.snap, v.files...)
	}
	verifyClean(t, s)

	// Every job down to its newest: b's two identical snapshots share
	// everything, so GC frees no pack for b.
	rep, err = s.Prune(ctx, "", 1)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Removed) != 2 || rep.Kept != 2 {
		t.Fatalf("prune all to 1: %+v", rep)
	}
	checkSnapshot(t, s, a[3].snap, a[3].files...)
	checkSnapshot(t, s, b[1].snap, b[1].files...)
	verifyClean(t, s)

	// Nothing kept: the store is back to its empty size.
	if _, err := s.Prune(ctx, "", 0); err != nil {
		t.Fatal(err)
	}
	if n := countFiles(t, dir, "packs"); n != 0 {
		t.Fatalf("%d packs left in an empty store", n)
	}
	if _, err := s.Prune(ctx, "", -1); err == nil {
		t.Fatal("keep -1 accepted")
	}
}

// TestRepack: a pack that is mostly dead after a prune is rewritten with
// only its live blobs.
func TestRepack(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s := openStore(t, dir, Options{})
	v1 := []testFile{{"pages-1.img", randBytes(70, 8<<20)}}
	first := add(t, s, "r", nil, v1...)
	firstPacks := countFiles(t, dir, "packs") // one per worker
	v2 := []testFile{{"pages-1.img", nil}}
	v2[0].data, _ = changePages(v1[0].data, 0.8, 71)
	second := add(t, s, "r", nil, v2...)
	before := diskUsage(t, dir)
	if err := s.Delete(ctx, "r", first.ID); err != nil {
		t.Fatal(err)
	}
	rep, err := s.GC(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("gc: %+v", rep)
	if rep.PacksRepacked != firstPacks || rep.PacksWritten != 1 || rep.BytesFreed < 6<<20 {
		t.Fatalf("the first snapshot's %d packs (20%% live) were not repacked into one: %+v", firstPacks, rep)
	}
	if after := diskUsage(t, dir); before-after < rep.BytesFreed {
		t.Fatalf("directory shrank by %d, GC says %d", before-after, rep.BytesFreed)
	}
	checkSnapshot(t, s, second, v2...)
	verifyClean(t, s)
	// A second GC has nothing to do.
	rep, err = s.GC(ctx)
	if err != nil || rep.PacksDeleted != 0 || rep.PacksWritten != 0 {
		t.Fatalf("second GC: %+v %v", rep, err)
	}
	// Another handle, opened before the repack, notices the pack is gone
	// and still reads the snapshot.
	checkSnapshot(t, openStore(t, dir, Options{}), second, v2...)
}

// TestPruneWaitsForWriter: Prune does not run while a snapshot is being
// added. With a short deadline it fails with ErrBusy; with a long one it
// waits for the Commit, then keeps every chunk the new snapshot needs,
// including chunks only an older snapshot, pruned by that same call, had
// before.
func TestPruneWaitsForWriter(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir, Options{PackSize: 1 << 20})
	old := criuLikeFiles(80, 4<<20)
	add(t, s, "w", nil, old...)

	w, err := s.Begin(context.Background(), "w")
	if err != nil {
		t.Fatal(err)
	}
	// The new snapshot: the old one's pages (already stored, so only
	// referenced) plus 8 MiB of new ones, sealed in packs as they come.
	pages := append(append([]byte(nil), old[3].data...), randBytes(81, 8<<20)...)
	f, _ := w.Create("pages-1.img")
	if _, err := f.Write(pages); err != nil {
		t.Fatal(err)
	}

	short, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if _, err := s.Prune(short, "w", 0); !errors.Is(err, ErrBusy) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Prune while writing: %v, want ErrBusy", err)
	}
	if _, err := s.GC(short); !errors.Is(err, ErrBusy) {
		t.Fatalf("GC while writing: %v, want ErrBusy", err)
	}

	// Another handle (as another process would) prunes job w to its
	// newest snapshot, and must wait for the writer.
	other := openStore(t, dir, Options{})
	type result struct {
		rep PruneReport
		err error
		at  time.Time
	}
	done := make(chan result, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		rep, err := other.Prune(ctx, "w", 1)
		done <- result{rep, err, time.Now()}
	}()
	select {
	case r := <-done:
		t.Fatalf("Prune did not wait for the writer: %+v", r)
	case <-time.After(300 * time.Millisecond):
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	committed := time.Now()
	snap, err := w.Commit(nil)
	if err != nil {
		t.Fatal(err)
	}
	r := <-done
	if r.err != nil {
		t.Fatal(r.err)
	}
	if r.at.Before(committed) || len(r.rep.Removed) != 1 {
		t.Fatalf("prune %+v ended at %v, commit at %v", r.rep, r.at, committed)
	}
	checkSnapshot(t, other, snap, testFile{"pages-1.img", pages})
	verifyClean(t, other)
}
