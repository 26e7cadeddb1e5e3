package store

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// packFiles lists the pack files under dir.
func packFiles(t *testing.T, dir string) []string {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(dir, "packs", "*", "*"))
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// entryOf finds the index entry of the chunk with digest d in pack p.
func entryOf(t *testing.T, p string, d digest) (packEntry, bool) {
	t.Helper()
	obj, err := (&dirBackend{root: filepath.Dir(filepath.Dir(filepath.Dir(p)))}).Open(context.Background(), "packs/"+filepath.Base(filepath.Dir(p))+"/"+filepath.Base(p))
	if err != nil {
		t.Fatal(err)
	}
	defer obj.Close()
	entries, err := readPackIndex(obj, p)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if e.d == d {
			return e, true
		}
	}
	return packEntry{}, false
}

func flipByte(t *testing.T, path string, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var b [1]byte
	if _, err := f.ReadAt(b[:], off); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0x40
	if _, err := f.WriteAt(b[:], off); err != nil {
		t.Fatal(err)
	}
}

// TestCorruptBlob flips one byte of one stored page: Verify names the
// pack, the offset, the chunk and the snapshot file and chunk number that
// need it; reading that file fails on that chunk with ErrCorrupt; other
// files read fine.
func TestCorruptBlob(t *testing.T) {
	for _, tc := range []struct {
		name string
		data []byte
	}{
		{"raw page", randBytes(90, 4<<20)},
		{"zstd page", compressible(91, 4<<20)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			dir := t.TempDir()
			s := openStore(t, dir, Options{})
			files := []testFile{{"pages-1.img", tc.data}, {"core-1.img", compressible(92, 10000)}}
			snap := add(t, s, "c", nil, files...)

			const victim = 10 // the 11th page
			d := digest(sumSHA256(tc.data[victim*page : (victim+1)*page]))
			var pack string
			var e packEntry
			for _, p := range packFiles(t, dir) {
				if found, ok := entryOf(t, p, d); ok {
					pack, e = p, found
				}
			}
			if pack == "" {
				t.Fatal("page not found in any pack")
			}
			flipByte(t, pack, int64(e.off+e.stored/2))

			rep, err := s.Verify(ctx)
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("Verify: %v, want ErrCorrupt", err)
			}
			packName := "packs/" + filepath.Base(filepath.Dir(pack)) + "/" + filepath.Base(pack)
			var blobProblem, refProblem bool
			for _, p := range rep.Problems {
				t.Log(p)
				if p.Object == packName && p.Offset == int64(e.off) && p.Digest == d.String() && p.Job == "" {
					blobProblem = true
				}
				if p.Job == "c" && p.ID == snap.ID && p.File == "pages-1.img" && strings.Contains(p.Err.Error(), "chunk 10 ") && strings.Contains(p.Err.Error(), d.String()) {
					refProblem = true
				}
			}
			if !blobProblem || !refProblem || len(rep.Problems) != 2 {
				t.Fatalf("Verify did not pinpoint the bad page (blob %v, ref %v): %v", blobProblem, refProblem, rep.Problems)
			}

			r, err := s.OpenSnapshot(ctx, snap)
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			rc, _ := r.Open("pages-1.img")
			got, err := io.ReadAll(rc)
			rc.Close()
			var ce *CorruptError
			if !errors.Is(err, ErrCorrupt) || !errors.As(err, &ce) || ce.Digest != d.String() || ce.Offset != int64(e.off) {
				t.Fatalf("reading the bad file: %v, want a CorruptError on chunk %s", err, d)
			}
			if len(got) > victim*page || !bytes.Equal(got, tc.data[:len(got)]) {
				t.Fatalf("read returned %d bytes before the bad chunk at %d, or wrong ones", len(got), victim*page)
			}
			rc, _ = r.Open("core-1.img")
			if got, err := io.ReadAll(rc); err != nil || !bytes.Equal(got, files[1].data) {
				t.Fatalf("reading a good file: %v", err)
			}
			rc.Close()
		})
	}
}

// TestCorruptIndex: a flipped byte in a pack's index, a truncated pack
// and a damaged record are each reported, and GC deletes nothing it
// cannot prove dead.
func TestCorruptIndex(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		desc   string
		damage func(t *testing.T, dir string)
		want   string
	}{
		{"pack index", func(t *testing.T, dir string) {
			p := packFiles(t, dir)[0]
			st, _ := os.Stat(p)
			flipByte(t, p, st.Size()-packFooterSize-10)
		}, "pack index checksum mismatch"},
		{"pack truncated", func(t *testing.T, dir string) {
			p := packFiles(t, dir)[0]
			st, _ := os.Stat(p)
			os.Truncate(p, st.Size()-1)
		}, "truncated pack"},
		{"record", func(t *testing.T, dir string) {
			m, _ := filepath.Glob(filepath.Join(dir, "snapshots", "*", "*"))
			flipByte(t, m[0], 30)
		}, "record checksum mismatch"},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			dir := t.TempDir()
			s := openStore(t, dir, Options{})
			add(t, s, "c", nil, testFile{"pages-1.img", randBytes(93, 1<<20)})
			tc.damage(t, dir)
			s2 := openStore(t, dir, Options{})
			rep, err := s2.Verify(ctx)
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("Verify: %v", err)
			}
			found := false
			for _, p := range rep.Problems {
				t.Log(p)
				found = found || strings.Contains(p.String(), tc.want)
			}
			if !found {
				t.Fatalf("no problem mentions %q", tc.want)
			}
			// GC refuses to run when it cannot tell what a snapshot
			// needs (a damaged record or ref list); when only data
			// chunks are lost, it runs, reports them, and keeps the
			// damaged pack. Either way it deletes nothing here.
			before := diskUsage(t, dir)
			gc, err := s2.GC(ctx)
			t.Logf("GC: %+v, %v", gc, err)
			if err == nil && (gc.MissingChunks == 0 || len(gc.SkippedPacks) == 0) && tc.desc != "record" {
				t.Fatalf("GC over a damaged pack reports no missing chunk or skipped pack: %+v", gc)
			}
			if err == nil && tc.desc == "record" {
				t.Fatal("GC ran over a snapshot record it cannot read")
			}
			if after := diskUsage(t, dir); after != before {
				t.Fatalf("GC changed a damaged store: %d -> %d bytes", before, after)
			}
		})
	}
}
