package image

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
	gproto "google.golang.org/protobuf/proto"

	pb "github.com/ferry-cr/ferry/proto"
)

// writeRemaining writes first whole, then a REMAINING record naming last,
// then last; gate, when not nil, is waited for between the two parts.
func writeRemaining(t *testing.T, w io.Writer, first, last []file, opts WriterOptions, gate <-chan struct{}) error {
	t.Helper()
	wr, err := NewWriter(w, &pb.Manifest{Job: "j"}, opts)
	if err != nil {
		return err
	}
	put := func(f file) error {
		fw, err := wr.Create(f.name)
		if err != nil {
			return err
		}
		for p := f.data; len(p) > 0; {
			n := min(len(p), 100000)
			if _, err := fw.Write(p[:n]); err != nil {
				return err
			}
			p = p[n:]
		}
		return fw.Close()
	}
	for _, f := range first {
		if err := put(f); err != nil {
			return err
		}
	}
	var names []string
	var sizes []uint64
	for _, f := range last {
		names, sizes = append(names, f.name), append(sizes, uint64(len(f.data)))
	}
	if err := wr.Remaining(names, sizes); err != nil {
		return err
	}
	if gate != nil {
		<-gate
	}
	for _, f := range last {
		if err := put(f); err != nil {
			return err
		}
	}
	return wr.Close()
}

// splitFiles puts the pages files last, as a migration does.
func splitFiles(files []file) (first, last []file) {
	for _, f := range files {
		if strings.HasPrefix(f.name, "pages-") {
			last = append(last, f)
		} else {
			first = append(first, f)
		}
	}
	return first, last
}

// StreamArchive returns at the REMAINING record, before the remaining
// files have been written, serves the files it has, and then the
// remaining ones as they arrive: a restore starts while memory is on its
// way. A remaining file is served once.
func TestStreamArchiveServesRemainingFilesAsTheyArrive(t *testing.T) {
	for _, opts := range []WriterOptions{{NoDigests: true, NoCompress: true}, {}, {NoDigests: true, ChunkSize: 64 << 10}} {
		files := testFiles(5, 3<<20+4321)
		first, last := splitFiles(files)
		pr, pw := io.Pipe()
		gate := make(chan struct{})
		wrote := make(chan error, 1)
		go func() {
			err := writeRemaining(t, pw, first, last, opts, gate)
			pw.CloseWithError(err)
			wrote <- err
		}()
		a, err := StreamArchive(pr)
		if err != nil {
			t.Fatal(err)
		}
		// The remaining files have not been written yet: the gate is shut.
		if got := a.Remaining(); len(got) != 2 || got[0] != "pages-1.img" || got[1] != "pages-2.img" {
			t.Fatalf("Remaining() = %v", got)
		}
		// Without digests a whole file is served at once; with them its
		// last chunk waits for the trailer's SHA-256.
		firstDone := make(chan error, 1)
		go func() {
			for _, f := range first {
				var b bytes.Buffer
				if _, err := a.WriteTo(f.name, &b); err != nil || !bytes.Equal(b.Bytes(), f.data) {
					firstDone <- fmt.Errorf("%s: %v", f.name, err)
					return
				}
			}
			firstDone <- nil
		}()
		if opts.NoDigests {
			if err := <-firstDone; err != nil {
				t.Fatalf("%+v: before the rest came: %v", opts, err)
			}
			firstDone <- nil
		}
		if !a.Has("pages-2.img") || a.Has("nothing.img") {
			t.Errorf("Has: remaining file %v, unknown file %v", a.Has("pages-2.img"), a.Has("nothing.img"))
		}
		type result struct {
			f   file
			b   []byte
			err error
		}
		served := make(chan result, len(last))
		for _, f := range last {
			go func() {
				var b bytes.Buffer
				_, err := a.WriteTo(f.name, &b)
				served <- result{f, b.Bytes(), err}
			}()
		}
		time.Sleep(20 * time.Millisecond) // the servers wait for data
		close(gate)
		for range last {
			r := <-served
			if r.err != nil {
				t.Fatalf("%+v: serving %s: %v", opts, r.f.name, r.err)
			}
			if !bytes.Equal(r.b, r.f.data) {
				t.Errorf("%+v: %s differs", opts, r.f.name)
			}
		}
		if err := <-wrote; err != nil {
			t.Fatal(err)
		}
		if err := <-firstDone; err != nil {
			t.Fatalf("%+v: %v", opts, err)
		}
		if err := a.Wait(); err != nil {
			t.Fatalf("Wait: %v", err)
		}
		if a.Trailer() == nil {
			t.Error("no trailer after Wait")
		}
		if _, err := a.WriteTo("pages-1.img", io.Discard); err == nil {
			t.Error("a remaining file was served twice")
		}
		a.Close()
	}
}

// A chunk that fails its check, or a stream that breaks off, in the
// remaining files cuts the file being served and is what Wait reports.
func TestStreamArchiveBadRemainingFile(t *testing.T) {
	files := testFiles(6, 2<<20)
	first, last := splitFiles(files)
	var buf bytes.Buffer
	if err := writeRemaining(t, &buf, first, last, WriterOptions{NoDigests: true, NoCompress: true}, nil); err != nil {
		t.Fatal(err)
	}
	data := buf.Bytes()
	// A byte in the middle of the random pages (pages-1.img's payload).
	at := bytes.Index(data, files[2].data[1<<20:1<<20+64])
	if at < 0 {
		t.Fatal("pages data not found raw in the stream")
	}
	for name, bad := range map[string][]byte{
		"flipped": func() []byte { b := bytes.Clone(data); b[at] ^= 1; return b }(),
		"cut":     data[:at],
	} {
		want := ErrCorrupt
		if name == "cut" {
			want = ErrTruncated
		}
		// The bytes before the damage go first; the rest only once the
		// archive is open, so the reader meets it afterwards.
		pr, pw := io.Pipe()
		gate := make(chan struct{})
		go func() {
			pw.Write(bad[:at-10])
			<-gate
			pw.Write(bad[at-10:])
			pw.Close()
		}()
		a, err := StreamArchive(pr)
		close(gate)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if _, err := a.WriteTo("inventory.img", io.Discard); err != nil {
			t.Fatalf("%s: a whole file: %v", name, err)
		}
		_, serr := a.WriteTo("pages-1.img", io.Discard)
		werr := a.Wait()
		if !errors.Is(serr, want) || !errors.Is(werr, want) {
			t.Errorf("%s: served %v, Wait %v; want %v", name, serr, werr, want)
		}
		a.Close()
	}
}

// The rules of REMAINING: a writer refuses it while a file is open; a
// reader refuses a file that was not named, and a named file that never
// came. A stream with the record reads as any other, whole or from a file.
func TestRemainingRules(t *testing.T) {
	wr, err := NewWriter(&bytes.Buffer{}, &pb.Manifest{}, WriterOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := wr.Create("open.img"); err != nil {
		t.Fatal(err)
	}
	if err := wr.Remaining([]string{"x"}, nil); err == nil {
		t.Error("REMAINING written while a file was open")
	}
	if err := wr.Remaining([]string{"x", "y"}, []uint64{1}); err == nil {
		t.Error("REMAINING written with a size missing")
	}

	// "data of pages-1.img" is 19 bytes.
	for name, c := range map[string]struct {
		named, written []string
		sizes          []uint64
	}{
		"unnamed file":       {[]string{"pages-1.img"}, []string{"pages-1.img", "core-9.img"}, nil},
		"never came":         {[]string{"pages-1.img", "pages-2.img"}, []string{"pages-1.img"}, nil},
		"longer than said":   {[]string{"pages-1.img"}, []string{"pages-1.img"}, []uint64{18}},
		"shorter than said":  {[]string{"pages-1.img"}, []string{"pages-1.img"}, []uint64{20}},
		"a size left out":    {[]string{"pages-1.img", "pages-2.img"}, []string{"pages-1.img", "pages-2.img"}, []uint64{19}},
		"said empty, is not": {[]string{"pages-1.img"}, []string{"pages-1.img"}, []uint64{0}},
	} {
		var buf bytes.Buffer
		wr, err := NewWriter(&buf, &pb.Manifest{}, WriterOptions{})
		if err != nil {
			t.Fatal(err)
		}
		payload, err := gproto.Marshal(&pb.Remaining{Names: c.named, Sizes: c.sizes})
		if err != nil {
			t.Fatal(err)
		}
		rec, err := frame(&pb.RecordHeader{Kind: pb.RecordHeader_REMAINING}, payload)
		if err != nil {
			t.Fatal(err)
		}
		// Written as it is, past Remaining's own checks: a hostile writer's.
		if err := wr.submit(&pending{ready: make(chan struct{}), record: rec}, nil); err != nil {
			t.Fatal(err)
		}
		for _, n := range c.written {
			fw, _ := wr.Create(n)
			fw.Write([]byte("data of " + n))
			fw.Close()
		}
		if err := wr.Close(); err != nil {
			t.Fatal(err)
		}
		if _, _, err := readAll(buf.Bytes()); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: read %v, want ErrCorrupt", name, err)
		}
		// StreamArchive may return before the reader meets the damage.
		a, err := StreamArchive(bytes.NewReader(buf.Bytes()))
		if err == nil {
			err = a.Wait()
			a.Close()
		}
		if !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: StreamArchive and Wait: %v, want ErrCorrupt", name, err)
		}
	}

	files := testFiles(7, 300000)
	first, last := splitFiles(files)
	var buf bytes.Buffer
	if err := writeRemaining(t, &buf, first, last, WriterOptions{}, nil); err != nil {
		t.Fatal(err)
	}
	got, _, err := readAll(buf.Bytes())
	if err != nil {
		t.Fatalf("Reader: %v", err)
	}
	for _, f := range files {
		if !bytes.Equal(got[f.name], f.data) {
			t.Errorf("Reader: %s differs", f.name)
		}
	}
	for kind, open := range openBoth(buf.Bytes()) {
		a, err := open()
		if err != nil {
			t.Fatalf("%s: %v", kind, err)
		}
		out, err := serveAll(a, files)
		if err != nil {
			t.Fatalf("%s: %v", kind, err)
		}
		for _, f := range files {
			if !bytes.Equal(out[f.name], f.data) {
				t.Errorf("%s: %s differs", kind, f.name)
			}
		}
		a.Close()
	}
}

// Closing an archive whose stream is still arriving stops its reader
// without a crash, and a file being served is cut.
func TestStreamArchiveClosedEarly(t *testing.T) {
	files := testFiles(8, 2<<20)
	first, last := splitFiles(files)
	pr, pw := io.Pipe()
	gate := make(chan struct{})
	go func() { pw.CloseWithError(writeRemaining(t, pw, first, last, WriterOptions{NoDigests: true}, gate)) }()
	a, err := StreamArchive(pr)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { _, err := a.WriteTo("pages-2.img", io.Discard); served <- err }()
	a.Close()
	close(gate)
	select {
	case err := <-served:
		if err == nil {
			t.Error("a file of a closed archive was served whole")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("serving a closed archive hangs")
	}
	pr.Close()
	if err := a.Wait(); err == nil {
		t.Error("Wait on an archive closed early says nil")
	}
}

// A migration's memory, served from its stream into CRIU's pipe: with
// its size declared, every raw chunk but the last pipeful goes in by
// reference (vmsplice), its recycled buffer taken back only once the
// slow reader has read past it, and the bytes that come out are the
// file's. A buffer taken back early would carry a later chunk's bytes by
// the time the reader got to it. Without sizes (a stream written before
// them) what has not arrived yet is copied, and comes out right too.
func TestStreamArchiveSplicesRemainingByReference(t *testing.T) {
	big := make([]byte, 24<<20+5)
	for i := 0; i < len(big); i += 4096 {
		copy(big[i:], fmt.Sprintf("page %d: ferry carries a process across the water. ", i/4096))
	}
	files := []file{{"inventory.img", []byte("inventory")}, {"pages-1.img", big}, {"pages-2.img", big[:3<<20]}}
	first, last := splitFiles(files)
	for _, declared := range []bool{true, false} {
		var buf bytes.Buffer
		opts := WriterOptions{NoDigests: true, NoCompress: true, ChunkSize: 256 << 10}
		if declared {
			if err := writeRemaining(t, &buf, first, last, opts, nil); err != nil {
				t.Fatal(err)
			}
		} else {
			wr, err := NewWriter(&buf, &pb.Manifest{Job: "j"}, opts)
			if err != nil {
				t.Fatal(err)
			}
			put := func(f file) {
				fw, _ := wr.Create(f.name)
				fw.Write(f.data)
				if err := fw.Close(); err != nil {
					t.Fatal(err)
				}
			}
			put(first[0])
			if err := wr.Remaining([]string{last[0].name, last[1].name}, nil); err != nil {
				t.Fatal(err)
			}
			put(last[0])
			put(last[1])
			if err := wr.Close(); err != nil {
				t.Fatal(err)
			}
		}
		a, err := StreamArchive(iotestSlow(&buf))
		if err != nil {
			t.Fatal(err)
		}
		before := copiedToPipes.Load()
		for _, f := range last {
			r, w, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			pipeSize, err := unix.FcntlInt(w.Fd(), unix.F_SETPIPE_SZ, 1<<20)
			if err != nil {
				t.Fatal(err)
			}
			var wg sync.WaitGroup
			var serr error
			wg.Go(func() {
				_, serr = a.SpliceTo(f.name, w, nil)
				w.Close()
			})
			got := readSlowly(r, 20*time.Microsecond)
			r.Close()
			wg.Wait()
			if serr != nil {
				t.Fatalf("declared %v: %s: %v", declared, f.name, serr)
			}
			if err := pipeMismatch(f.name, got, f.data); err != nil {
				t.Fatalf("declared %v: %v", declared, err)
			}
			copied := copiedToPipes.Load() - before
			before += copied
			// The chunk that crosses into the last pipeful is copied whole.
			if declared && copied > int64(pipeSize+opts.ChunkSize) {
				t.Errorf("%s, size declared: %d bytes copied into a pipe of %d", f.name, copied, pipeSize)
			}
		}
		if err := a.Wait(); err != nil {
			t.Fatal(err)
		}
		a.Close()
	}
}

// iotestSlow hands out r a little at a time, so that the stream arrives
// while it is served.
func iotestSlow(r io.Reader) io.Reader { return &slowReader{r} }

type slowReader struct{ r io.Reader }

func (s *slowReader) Read(p []byte) (int, error) {
	time.Sleep(50 * time.Microsecond)
	return s.r.Read(p[:min(len(p), 64<<10)])
}

// traceChunkBufs records, until the test ends, every buffer an archive
// takes from chunkBufs and gives back: twice says whether one was given
// back again before it was taken out anew, out how many it took that
// have not come back.
func traceChunkBufs(t *testing.T) (twice func() bool, out func() int) {
	var mu sync.Mutex
	back, taken := map[*byte]bool{}, map[*byte]bool{}
	dup := false
	chunkBufTrace = func(b []byte, put bool) {
		p := unsafe.SliceData(b[:cap(b)])
		mu.Lock()
		defer mu.Unlock()
		if put {
			dup = dup || back[p]
			back[p] = true
			delete(taken, p)
		} else {
			delete(back, p)
			taken[p] = true
		}
	}
	t.Cleanup(func() { chunkBufTrace = nil })
	return func() bool { mu.Lock(); defer mu.Unlock(); return dup },
		func() int { mu.Lock(); defer mu.Unlock(); return len(taken) }
}

// A remaining file cut short while it is spliced into a pipe, its chunks
// handed over by reference (compressed ones too, whose payloads are
// recycled buffers of their own), fails, and every recycled buffer goes
// back to the pool exactly once: neither the splicer nor the archive's
// Close gives one back that the other did, or that a pipe still holds.
// Digests on, so chunks wait for the hasher when the stream breaks.
func TestStreamArchiveCutWhileSpliced(t *testing.T) {
	big := make([]byte, 40<<20)
	for i := 0; i < len(big); i += 4096 {
		copy(big[i:], fmt.Sprintf("page %d: ferry carries a process across the water. ", i/4096))
	}
	// Small chunks, all of a stream in memory, and a reader that starts
	// late: the pipe takes chunk after chunk at once, and the hasher is
	// still behind when the stream breaks.
	for _, opts := range []WriterOptions{{NoCompress: true, ChunkSize: 128 << 10}, {Compression: pb.Compression_COMPRESSION_S2, ChunkSize: 128 << 10}} {
		twice, out := traceChunkBufs(t)
		files := []file{{"inventory.img", []byte("inventory")}, {"pages-1.img", big}}
		first, last := splitFiles(files)
		var buf bytes.Buffer
		if err := writeRemaining(t, &buf, first, last, opts, nil); err != nil {
			t.Fatal(err)
		}
		cut := buf.Bytes()[:buf.Len()*3/5]
		a, err := StreamArchive(bytes.NewReader(cut))
		if err != nil {
			t.Fatal(err)
		}
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := unix.FcntlInt(w.Fd(), unix.F_SETPIPE_SZ, 1<<20); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() {
			_, err := a.SpliceTo("pages-1.img", w, nil)
			w.Close()
			done <- err
		}()
		time.Sleep(100 * time.Millisecond)
		got, _ := io.ReadAll(r)
		r.Close()
		if err := <-done; !errors.Is(err, ErrTruncated) {
			t.Errorf("%+v: a file cut short: %v, want ErrTruncated", opts, err)
		}
		if !bytes.HasPrefix(big, got) {
			t.Errorf("%+v: the %d bytes through the pipe are not the file's first", opts, len(got))
		}
		a.Close()
		_ = a.Wait()
		if twice() {
			t.Errorf("%+v: a buffer was given back to the pool twice", opts)
		}
		// The reader read the pipe to its end: no buffer is a stray.
		if n := out(); n != 0 {
			t.Errorf("%+v: %d recycled buffers never came back", opts, n)
		}
	}
}
