package store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"testing/iotest"
	"time"
)

const page = 4096

// testFile is one file of a test snapshot.
type testFile struct {
	name string
	data []byte
}

func openStore(t testing.TB, dir string, opts Options) *Store {
	t.Helper()
	s, err := Open(context.Background(), dir, opts)
	if err != nil {
		t.Fatalf("Open(%q): %v", dir, err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// randBytes returns n pseudo-random bytes from seed (ChaCha8: fast enough
// for hundreds of MiB).
func randBytes(seed uint64, n int) []byte {
	b := make([]byte, n)
	var key [32]byte
	key[0], key[1] = byte(seed), byte(seed>>8)
	key[2], key[3] = byte(seed>>16), byte(seed>>24)
	rand.NewChaCha8(key).Read(b)
	return b
}

// compressible returns n bytes that zstd and S2 shrink (text-like).
func compressible(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 1))
	words := []string{"ferry ", "checkpoint ", "restore ", "page ", "pagemap ", "core ", "mm ", "criu ", "\n"}
	var b bytes.Buffer
	for b.Len() < n {
		b.WriteString(words[r.IntN(len(words))])
	}
	return b.Bytes()[:n]
}

// changePages rewrites frac of data's pages, picked at random, with new
// random bytes; it returns a copy and the number of pages changed.
func changePages(data []byte, frac float64, seed uint64) ([]byte, int) {
	out := bytes.Clone(data)
	pages := len(data) / page
	n := int(float64(pages) * frac)
	r := rand.New(rand.NewPCG(seed, 2))
	fresh := randBytes(seed+1000, n*page)
	for i, p := range r.Perm(pages)[:n] {
		copy(out[p*page:(p+1)*page], fresh[i*page:])
	}
	return out, n
}

// add writes files as one snapshot of job, each from its own goroutine in
// uneven pieces, and commits it.
func add(t testing.TB, s *Store, job string, meta []byte, files ...testFile) Snapshot {
	t.Helper()
	w, err := s.Begin(context.Background(), job)
	if err != nil {
		t.Fatalf("Begin(%q): %v", job, err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, len(files))
	for i, f := range files {
		fw, err := w.Create(f.name)
		if err != nil {
			t.Fatalf("Create(%q): %v", f.name, err)
		}
		wg.Go(func() {
			if i%2 == 1 { // through io.Copy, which uses ReadFrom
				_, err := io.Copy(fw, iotest.HalfReader(bytes.NewReader(f.data)))
				errs <- errors.Join(err, fw.Close())
				return
			}
			piece := 4093 + 7919*i // not a multiple of anything
			for p := f.data; len(p) > 0; {
				k := min(piece, len(p))
				if _, err := fw.Write(p[:k]); err != nil {
					errs <- err
					return
				}
				p = p[k:]
			}
			errs <- fw.Close()
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			w.Abort()
			t.Fatalf("writing snapshot of %q: %v", job, err)
		}
	}
	snap, err := w.Commit(meta)
	if err != nil {
		t.Fatalf("Commit: %v", err)
	}
	return snap
}

// readSnapshot reads every file of snap back.
func readSnapshot(t testing.TB, s *Store, snap Snapshot) (map[string][]byte, []byte) {
	t.Helper()
	r, err := s.OpenSnapshot(context.Background(), snap)
	if err != nil {
		t.Fatalf("OpenSnapshot(%s/%s): %v", snap.Job, snap.ID, err)
	}
	defer r.Close()
	out := make(map[string][]byte)
	for _, name := range r.Names() {
		rc, err := r.Open(name)
		if err != nil {
			t.Fatalf("Open(%q): %v", name, err)
		}
		b, err := io.ReadAll(rc)
		rc.Close()
		if err != nil {
			t.Fatalf("reading %q of %s/%s: %v", name, snap.Job, snap.ID, err)
		}
		if int64(len(b)) != r.Size(name) {
			t.Fatalf("%q: read %d bytes, Size says %d", name, len(b), r.Size(name))
		}
		out[name] = b
	}
	return out, bytes.Clone(r.Meta())
}

// checkSnapshot asserts snap reads back as files.
func checkSnapshot(t testing.TB, s *Store, snap Snapshot, files ...testFile) {
	t.Helper()
	got, _ := readSnapshot(t, s, snap)
	if len(got) != len(files) {
		t.Fatalf("snapshot %s/%s has %d files, want %d", snap.Job, snap.ID, len(got), len(files))
	}
	for _, f := range files {
		if !bytes.Equal(got[f.name], f.data) {
			t.Fatalf("snapshot %s/%s: %q differs from what was written (%d vs %d bytes)", snap.Job, snap.ID, f.name, len(got[f.name]), len(f.data))
		}
	}
}

func verifyClean(t testing.TB, s *Store) VerifyReport {
	t.Helper()
	rep, err := s.Verify(context.Background())
	if err != nil {
		for _, p := range rep.Problems {
			t.Log(p)
		}
		t.Fatalf("Verify: %v", err)
	}
	return rep
}

// diskUsage is the size of every file under dir: what the store costs.
func diskUsage(t testing.TB, dir string) int64 {
	t.Helper()
	var n int64
	err := filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.Type().IsRegular() {
			info, err := d.Info()
			if err != nil {
				return err
			}
			n += info.Size()
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// size is full, or short under -short (make unit-test runs -short -race).
func size(full, short int) int {
	if testing.Short() {
		return short
	}
	return full
}

func criuLikeFiles(seed uint64, pagesBytes int) []testFile {
	pages := randBytes(seed, pagesBytes)
	// A few zero pages, as real memory has.
	for i := 0; i < len(pages)/page; i += 37 {
		clear(pages[i*page : (i+1)*page])
	}
	return []testFile{
		{"inventory.img", compressible(seed, 300)},
		{"core-1.img", compressible(seed+1, 100<<10)},
		{"pagemap-1.img", compressible(seed+2, 70001)},
		{"pages-1.img", pages},
		{"empty.img", nil},
	}
}

func TestRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		name  string
		comp  Compression
		pages int
	}{
		{"zstd-64MiB", CompressionDefault, size(64<<20, 16<<20)},
		{"s2", CompressionS2, 8 << 20},
		{"none", CompressionNone, 8 << 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			s := openStore(t, dir, Options{Compression: tc.comp})
			files := criuLikeFiles(1, tc.pages)
			meta := []byte(`{"job":"a"}`)
			snap := add(t, s, "a", meta, files...)
			if snap.Files != len(files) || snap.Job != "a" {
				t.Fatalf("snapshot %+v", snap)
			}
			var raw int64
			for _, f := range files {
				raw += int64(len(f.data))
			}
			if snap.RawBytes != raw {
				t.Fatalf("RawBytes %d, want %d", snap.RawBytes, raw)
			}
			if snap.ZeroBytes < int64(tc.pages/page/37*page) {
				t.Fatalf("ZeroBytes %d: zero pages were stored", snap.ZeroBytes)
			}
			checkSnapshot(t, s, snap, files...)
			_, gotMeta := readSnapshot(t, s, snap)
			if !bytes.Equal(gotMeta, meta) {
				t.Fatalf("meta %q, want %q", gotMeta, meta)
			}
			// A second handle on the same directory (another process)
			// sees and reads it too.
			s2 := openStore(t, dir, Options{})
			latest, err := s2.Latest(context.Background(), "a")
			if err != nil || latest.ID != snap.ID {
				t.Fatalf("Latest: %v, %v", latest, err)
			}
			checkSnapshot(t, s2, latest, files...)
			r, err := s2.OpenSnapshot(context.Background(), latest)
			if err != nil {
				t.Fatal(err)
			}
			if got, want := r.Names(), []string{"inventory.img", "core-1.img", "pagemap-1.img", "pages-1.img", "empty.img"}; strings.Join(got, ",") != strings.Join(want, ",") {
				t.Fatalf("Names %v, want %v", got, want)
			}
			if r.Mode("core-1.img") != 0o600 || r.Size("nope") != -1 {
				t.Fatalf("Mode %v Size %d", r.Mode("core-1.img"), r.Size("nope"))
			}
			if _, err := r.Open("nope"); !errors.Is(err, fs.ErrNotExist) {
				t.Fatalf("Open of a missing file: %v", err)
			}
			r.Close()
			rep := verifyClean(t, s2)
			if rep.Snapshots != 1 || rep.Blobs == 0 {
				t.Fatalf("verify report %+v", rep)
			}
		})
	}
}

// TestReadPartial closes a file mid-read and the Reader with a file still
// open: nothing hangs, nothing leaks the lock (GC runs afterwards).
func TestReadPartial(t *testing.T) {
	s := openStore(t, t.TempDir(), Options{})
	files := criuLikeFiles(2, 16<<20)
	snap := add(t, s, "a", nil, files...)
	r, err := s.OpenSnapshot(context.Background(), snap)
	if err != nil {
		t.Fatal(err)
	}
	rc, err := r.Open("pages-1.img")
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 3*page+5)
	if _, err := io.ReadFull(rc, buf); err != nil || !bytes.Equal(buf, files[3].data[:len(buf)]) {
		t.Fatalf("partial read: %v", err)
	}
	rc.Close()
	if _, err := rc.Read(buf); !errors.Is(err, ErrClosed) {
		t.Fatalf("Read after Close: %v", err)
	}
	if _, err := r.Open("pages-1.img"); err != nil {
		t.Fatal(err)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := s.GC(ctx); err != nil {
		t.Fatalf("GC after Reader.Close: %v", err)
	}
}

func TestOpen(t *testing.T) {
	ctx := context.Background()
	t.Run("missing dir is created", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "a", "b")
		openStore(t, dir, Options{})
		for _, name := range []string{"config", "packs", "snapshots", "tmp"} {
			if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
				t.Fatal(err)
			}
		}
	})
	t.Run("reopen", func(t *testing.T) {
		dir := t.TempDir()
		openStore(t, dir, Options{}).Close()
		openStore(t, dir, Options{})
	})
	t.Run("NoCreate opens only an existing store and writes nothing", func(t *testing.T) {
		for _, dir := range []string{filepath.Join(t.TempDir(), "missing"), t.TempDir()} {
			if _, err := Open(ctx, dir, Options{NoCreate: true}); !errors.Is(err, ErrNoStore) {
				t.Fatalf("Open(%s, NoCreate): %v, want ErrNoStore", dir, err)
			}
			if entries, err := os.ReadDir(dir); err == nil && len(entries) > 0 {
				t.Fatalf("NoCreate wrote %d entries into %s", len(entries), dir)
			} else if err != nil && !os.IsNotExist(err) {
				t.Fatal(err)
			}
		}
		dir := t.TempDir()
		openStore(t, dir, Options{}).Close()
		openStore(t, dir, Options{NoCreate: true})
	})
	for _, tc := range []struct {
		desc  string
		setup func(dir string) string
		want  error
	}{
		{"foreign file", func(dir string) string {
			os.WriteFile(filepath.Join(dir, "notes.txt"), []byte("hi"), 0o600)
			return dir
		}, ErrNotStore},
		{"a file, not a dir", func(dir string) string {
			p := filepath.Join(dir, "f")
			os.WriteFile(p, nil, 0o600)
			return p
		}, ErrNotStore},
		{"packs without config", func(dir string) string {
			os.MkdirAll(filepath.Join(dir, "packs", "ab"), 0o700)
			return dir
		}, ErrNotStore},
		{"newer version", func(dir string) string {
			s, err := Open(ctx, dir, Options{})
			if err != nil {
				panic(err)
			}
			s.Close()
			b, _ := os.ReadFile(filepath.Join(dir, "config"))
			b[8] = 9
			os.WriteFile(filepath.Join(dir, "config"), b, 0o600)
			return dir
		}, ErrUnsupportedVersion},
		{"corrupt config", func(dir string) string {
			s, err := Open(ctx, dir, Options{})
			if err != nil {
				panic(err)
			}
			s.Close()
			b, _ := os.ReadFile(filepath.Join(dir, "config"))
			b[len(b)-1] ^= 1
			os.WriteFile(filepath.Join(dir, "config"), b, 0o600)
			return dir
		}, ErrCorrupt},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			dir := tc.setup(t.TempDir())
			s, err := Open(ctx, dir, Options{})
			if err == nil {
				s.Close()
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("Open: %v, want %v", err, tc.want)
			}
		})
	}
	t.Run("bad compression", func(t *testing.T) {
		if _, err := Open(ctx, t.TempDir(), Options{Compression: "lz5"}); err == nil {
			t.Fatal("no error")
		}
	})
}

func TestNames(t *testing.T) {
	s := openStore(t, t.TempDir(), Options{})
	ctx := context.Background()
	for _, job := range []string{"", ".hidden", "a/b", "a\x00b", "tab\there", strings.Repeat("x", 256), "bad\xffutf8"} {
		if _, err := s.Begin(ctx, job); !errors.Is(err, ErrBadName) {
			t.Errorf("Begin(%q): %v, want ErrBadName", job, err)
		}
		if _, err := s.Snapshots(ctx, job); job != "" && !errors.Is(err, ErrBadName) {
			t.Errorf("Snapshots(%q): %v, want ErrBadName", job, err)
		}
	}
	w, err := s.Begin(ctx, "job-1.x_y")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Abort()
	for _, name := range []string{"", "..", "../x", "dir/file", ".img"} {
		if _, err := w.Create(name); !errors.Is(err, ErrBadName) {
			t.Errorf("Create(%q): %v, want ErrBadName", name, err)
		}
	}
	if _, err := w.Create("core-1.img"); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Create("core-1.img"); !errors.Is(err, ErrExists) {
		t.Errorf("second Create: %v, want ErrExists", err)
	}
	if _, err := w.CreateFile("odd.img", FileOptions{ChunkSize: 3000}); err == nil {
		t.Error("chunk size 3000 accepted")
	}
	if _, err := w.Commit(nil); err == nil {
		t.Error("Commit with an unclosed file succeeded")
	}
	if snaps, _ := s.Snapshots(ctx, ""); len(snaps) != 0 {
		t.Errorf("snapshots after a failed commit: %v", snaps)
	}
}

func TestFind(t *testing.T) {
	s := openStore(t, t.TempDir(), Options{})
	ctx := context.Background()
	f := testFile{"core-1.img", []byte("x")}
	a1 := add(t, s, "a", nil, f)
	time.Sleep(2 * time.Millisecond)
	a2 := add(t, s, "a", nil, f)
	b1 := add(t, s, "b", nil, f)
	snaps, err := s.Snapshots(ctx, "")
	if err != nil || len(snaps) != 3 || snaps[0].ID != a1.ID || snaps[1].ID != a2.ID || snaps[2].ID != b1.ID {
		t.Fatalf("Snapshots: %v %v", snaps, err)
	}
	if !(a1.ID < a2.ID) || !a1.Time.Before(a2.Time) {
		t.Fatalf("ids do not sort by time: %s %s", a1.ID, a2.ID)
	}
	for _, tc := range []struct {
		desc, job, id string
		want          string
		err           error
	}{
		{"exact", "a", a1.ID, a1.ID, nil},
		{"unique prefix", "a", a2.ID[:len(a2.ID)-2], a2.ID, nil},
		{"ambiguous prefix", "a", "20", "", ErrAmbiguous},
		{"any job", "", b1.ID, b1.ID, nil},
		{"wrong job", "b", a1.ID, "", ErrNoSnapshot},
		{"unknown", "a", "19990101", "", ErrNoSnapshot},
		{"empty id", "a", "", "", ErrNoSnapshot},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			got, err := s.Find(ctx, tc.job, tc.id)
			if !errors.Is(err, tc.err) || got.ID != tc.want {
				t.Fatalf("Find(%q, %q) = %q, %v; want %q, %v", tc.job, tc.id, got.ID, err, tc.want, tc.err)
			}
		})
	}
	if l, err := s.Latest(ctx, "a"); err != nil || l.ID != a2.ID {
		t.Fatalf("Latest(a) = %v, %v", l.ID, err)
	}
	if _, err := s.Latest(ctx, "zzz"); !errors.Is(err, ErrNoSnapshot) {
		t.Fatalf("Latest(zzz): %v", err)
	}
	if _, err := s.OpenSnapshot(ctx, Snapshot{Job: "a", ID: "nope"}); !errors.Is(err, ErrNoSnapshot) {
		t.Fatalf("OpenSnapshot of a missing snapshot: %v", err)
	}
	if err := s.Delete(ctx, "a", a1.ID); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete(ctx, "a", a1.ID); !errors.Is(err, ErrNoSnapshot) {
		t.Fatalf("second Delete: %v", err)
	}
	if snaps, _ := s.Snapshots(ctx, "a"); len(snaps) != 1 {
		t.Fatalf("after Delete: %v", snaps)
	}
}

func ExampleStore() {
	ctx := context.Background()
	dir, _ := os.MkdirTemp("", "store")
	defer os.RemoveAll(dir)
	s, _ := Open(ctx, dir, Options{})
	defer s.Close()

	w, _ := s.Begin(ctx, "myjob")
	f, _ := w.Create("pages-1.img")
	f.Write(make([]byte, 1<<20)) // zero pages: stored as nothing
	f.Close()
	snap, _ := w.Commit([]byte("manifest"))

	r, _ := s.OpenSnapshot(ctx, snap)
	defer r.Close()
	rc, _ := r.Open("pages-1.img")
	n, _ := io.Copy(io.Discard, rc)
	rc.Close()
	fmt.Println(snap.Job, n, snap.ZeroBytes, string(r.Meta()))
	// Output: myjob 1048576 1048576 manifest
}
