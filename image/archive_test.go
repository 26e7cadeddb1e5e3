package image

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	pb "github.com/ferry-cr/ferry/proto"
)

// openBoth indexes data as a file would be (OpenArchive) and as a pipe
// would be (ReadArchive).
func openBoth(data []byte) map[string]func() (*Archive, error) {
	return map[string]func() (*Archive, error){
		"file": func() (*Archive, error) { return OpenArchive(bytes.NewReader(data)) },
		"pipe": func() (*Archive, error) { return ReadArchive(bytes.NewReader(data)) },
	}
}

// serveAll reads every file of a through WriteTo.
func serveAll(a *Archive, files []file) (map[string][]byte, error) {
	out := map[string][]byte{}
	for _, f := range files {
		var b bytes.Buffer
		if _, err := a.WriteTo(f.name, &b); err != nil {
			return nil, err
		}
		out[f.name] = b.Bytes()
	}
	return out, nil
}

func TestArchiveServesEveryFile(t *testing.T) {
	for _, opts := range []WriterOptions{{ChunkSize: 64 << 10}, {ChunkSize: 50000, NoCompress: true}, {}, {NoDigests: true}} {
		files := testFiles(3, 1<<20+12345)
		data := write(t, files, opts)
		for kind, open := range openBoth(data) {
			a, err := open()
			if err != nil {
				t.Fatalf("%s: %v", kind, err)
			}
			if a.Manifest().GetJob() != "j" {
				t.Errorf("%s: manifest %v", kind, a.Manifest())
			}
			// In reverse: CRIU does not ask in stream order.
			for i := len(files) - 1; i >= 0; i-- {
				f := files[i]
				if size, ok := a.Size(f.name); !ok || size != uint64(len(f.data)) {
					t.Errorf("%s: Size(%s) = %d, %v", kind, f.name, size, ok)
				}
				var b bytes.Buffer
				n, err := a.WriteTo(f.name, &b)
				if err != nil || n != int64(len(f.data)) || !bytes.Equal(b.Bytes(), f.data) {
					t.Errorf("%s: %s: %d bytes, %v", kind, f.name, n, err)
				}
			}
			if _, err := a.WriteTo("missing.img", &bytes.Buffer{}); err == nil {
				t.Errorf("%s: a file not in the stream was served", kind)
			}
			if a.Digests() == opts.NoDigests {
				t.Errorf("%s: Digests() = %v for a stream written with NoDigests %v", kind, a.Digests(), opts.NoDigests)
			}
			a.Close()
		}
	}
}

func TestArchiveTruncated(t *testing.T) {
	data := small(t)
	for n := range len(data) {
		for kind, open := range openBoth(data[:n]) {
			if _, err := open(); err == nil {
				t.Fatalf("%s: stream cut at %d of %d bytes opened", kind, n, len(data))
			}
		}
	}
}

// A flipped byte anywhere is caught by opening or, at the latest, by
// serving the file it belongs to: never handed out as good data.
func TestArchiveFlippedByte(t *testing.T) {
	files := testFiles(2, 3000)
	for _, opts := range []WriterOptions{{ChunkSize: 1000}, {ChunkSize: 1000, NoDigests: true}} {
		flipArchive(t, files, write(t, files, opts))
	}
}

func flipArchive(t *testing.T, files []file, data []byte) {
	for i := range data {
		bad := bytes.Clone(data)
		bad[i] ^= 0x20
		for kind, open := range openBoth(bad) {
			a, err := open()
			if err == nil {
				var got map[string][]byte
				got, err = serveAll(a, files)
				if err == nil {
					for _, f := range files {
						if !bytes.Equal(got[f.name], f.data) {
							t.Fatalf("%s: flipped byte %d served %s wrong", kind, i, f.name)
						}
					}
					// Bytes no check covers would have to be
					// meaningless; the manifest is not.
					if a.Manifest().GetJob() != "j" {
						t.Fatalf("%s: flipped byte %d changed the manifest unnoticed", kind, i)
					}
					continue
				}
			}
			if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrBadMagic) && !errors.Is(err, ErrUnsupportedVersion) &&
				!errors.Is(err, ErrRecordTooLarge) && !errors.Is(err, ErrTruncated) {
				t.Fatalf("%s: flipped byte %d: unexpected error %v", kind, i, err)
			}
		}
	}
}

// A stream larger than a few arena blocks is held outside the heap and
// served back intact; Close gives the blocks back.
func TestArchiveHeldInArena(t *testing.T) {
	if testing.Short() {
		t.Skip("140 MiB stream")
	}
	files := testFiles(4, 70<<20)
	a, err := ReadArchive(bytes.NewReader(write(t, files, WriterOptions{NoCompress: true, NoDigests: true})))
	if err != nil {
		t.Fatal(err)
	}
	if n := len(a.mem.blocks); n < 2 {
		t.Fatalf("%d arena blocks for a 140 MiB stream", n)
	}
	got, err := serveAll(a, files)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		if !bytes.Equal(got[f.name], f.data) {
			t.Fatalf("%s served wrong", f.name)
		}
	}
	a.Close()
	if a.mem.blocks != nil {
		t.Fatal("Close kept the blocks")
	}
	a.Close() // twice is harmless
}

// SpliceTo delivers every file through a pipe, raw held chunks by
// vmsplice and the rest by write, and counts every byte.
func TestArchiveSpliceTo(t *testing.T) {
	files := testFiles(6, 3<<20+777)
	data := write(t, files, WriterOptions{ChunkSize: 256 << 10, NoDigests: true, Adaptive: true})
	for kind, open := range openBoth(data) {
		a, err := open()
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range files {
			r, w, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			var counted atomic.Int64
			done := make(chan error, 1)
			go func() {
				_, err := a.SpliceTo(f.name, w, func(n int64) { counted.Add(n) })
				w.Close()
				done <- err
			}()
			got, rerr := io.ReadAll(r)
			r.Close()
			if err := <-done; err != nil || rerr != nil {
				t.Fatalf("%s: %s: %v, %v", kind, f.name, err, rerr)
			}
			if !bytes.Equal(got, f.data) || counted.Load() != int64(len(f.data)) {
				t.Fatalf("%s: %s: %d bytes through the pipe (%d counted), want %d", kind, f.name, len(got), counted.Load(), len(f.data))
			}
		}
		a.Close()
	}
}

// ReadArchiveFrom takes over a stream whose manifest was read already.
func TestReadArchiveFrom(t *testing.T) {
	files := testFiles(9, 300<<10)
	data := write(t, files, WriterOptions{NoDigests: true})
	rd, err := NewReader(bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	if rd.Manifest().GetJob() != "j" {
		t.Fatalf("manifest job %q", rd.Manifest().GetJob())
	}
	a, err := ReadArchiveFrom(rd)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	for _, f := range files {
		var buf bytes.Buffer
		if _, err := a.WriteTo(f.name, &buf); err != nil || !bytes.Equal(buf.Bytes(), f.data) {
			t.Fatalf("%s: %d of %d bytes back: %v", f.name, buf.Len(), len(f.data), err)
		}
	}
}

// An aborted writer leaves a stream that readers refuse.
func TestWriterAbort(t *testing.T) {
	var buf bytes.Buffer
	w, err := NewWriter(&buf, &pb.Manifest{Job: "j"}, WriterOptions{})
	if err != nil {
		t.Fatal(err)
	}
	fw, err := w.Create("inventory.img")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := fw.Write([]byte("inventory")); err != nil {
		t.Fatal(err)
	}
	if err := fw.Close(); err != nil {
		t.Fatal(err)
	}
	w.Abort()
	w.Abort() // idempotent
	if err := w.Close(); err == nil {
		t.Fatal("Close after Abort succeeded")
	}
	if _, err := ReadArchive(bytes.NewReader(buf.Bytes())); err == nil {
		t.Fatalf("an aborted stream of %d bytes was read as whole", buf.Len())
	}
}

// countingReaderAt counts its reads.
type countingReaderAt struct {
	*bytes.Reader
	reads atomic.Int64
}

func (c *countingReaderAt) ReadAt(p []byte, off int64) (int, error) {
	c.reads.Add(1)
	return c.Reader.ReadAt(p, off)
}

// ReadAhead decodes the first chunks of the files named before they are
// asked for, within its bound; the files are then served whole and
// right, a second time too, and a damaged chunk read ahead still fails
// the file it belongs to.
func TestArchiveReadAhead(t *testing.T) {
	files := testFiles(3, 10000)
	for _, opts := range []WriterOptions{{ChunkSize: 1000}, {ChunkSize: 1000, NoDigests: true, Compression: pb.Compression_COMPRESSION_S2}} {
		data := write(t, files, opts)
		src := &countingReaderAt{Reader: bytes.NewReader(data)}
		a, err := OpenArchive(src)
		if err != nil {
			t.Fatal(err)
		}
		src.reads.Store(0)
		// pages-2.img has 10 chunks: 3 of pages-1.img's follow.
		a.ReadAhead([]string{files[3].name, "missing.img", files[2].name}, 13)
		for i := 0; src.reads.Load() < 13; i++ {
			if i > 60000 { // a minute: a bound on waiting, not a measure
				t.Fatalf("ReadAhead read %d chunks ahead, want 13", src.reads.Load())
			}
			time.Sleep(time.Millisecond)
		}
		time.Sleep(20 * time.Millisecond)
		if n := src.reads.Load(); n != 13 {
			t.Fatalf("ReadAhead read %d chunks, bound 13", n)
		}
		for range 2 {
			got, err := serveAll(a, files)
			if err != nil {
				t.Fatal(err)
			}
			for _, f := range files {
				if !bytes.Equal(got[f.name], f.data) {
					t.Fatalf("%s served wrong after ReadAhead", f.name)
				}
			}
		}
	}
	// A flipped byte in a chunk decoded ahead.
	data := write(t, files, WriterOptions{ChunkSize: 1000, NoDigests: true})
	a, err := OpenArchive(bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	c := a.files[files[2].name].chunks[2]
	bad := bytes.Clone(data)
	bad[c.at+10] ^= 0x01
	if a, err = OpenArchive(bytes.NewReader(bad)); err != nil {
		t.Fatal(err)
	}
	a.ReadAhead([]string{files[2].name}, 4)
	if _, err := a.WriteTo(files[2].name, io.Discard); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("a damaged chunk read ahead: %v, want ErrCorrupt", err)
	}
}

// readSlowly reads r to its end, 48 KiB at a time with a pause between
// reads: a pipe's reader that lags its writer.
func readSlowly(r io.Reader, pause time.Duration) []byte {
	var got []byte
	buf := make([]byte, 48<<10)
	for {
		n, err := r.Read(buf)
		got = append(got, buf[:n]...)
		if err != nil {
			return got
		}
		time.Sleep(pause)
	}
}

// pipeMismatch says how the bytes of file name that came through a pipe
// differ from want, if they do.
func pipeMismatch(name string, got, want []byte) error {
	if bytes.Equal(got, want) {
		return nil
	}
	i := 0
	for i < min(len(got), len(want)) && got[i] == want[i] {
		i++
	}
	return fmt.Errorf("%s: %d bytes through the pipe, want %d; they differ from byte %d", name, len(got), len(want), i)
}

// spliceAll reads every file of a through SpliceTo into a pipe.
func spliceAll(t *testing.T, a *Archive, files []file) error {
	t.Helper()
	for _, f := range files {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() {
			_, err := a.SpliceTo(f.name, w, nil)
			w.Close()
			done <- err
		}()
		got, rerr := io.ReadAll(r)
		r.Close()
		if err := <-done; err != nil {
			return err
		}
		if rerr != nil || !bytes.Equal(got, f.data) {
			t.Fatalf("%s: %d bytes through the pipe, want %d (%v)", f.name, len(got), len(f.data), rerr)
		}
	}
	return nil
}

// An archive of a regular file is served from the file mapped in memory
// (raw chunks by reference): every file comes back whole, through a pipe
// too; a damaged chunk is refused; a file cut short while it is served
// fails the file, and the process lives on.
func TestArchiveMappedFile(t *testing.T) {
	files := testFiles(8, 3<<20+777)
	for _, opts := range []WriterOptions{{ChunkSize: 256 << 10, NoDigests: true, Compression: pb.Compression_COMPRESSION_S2}, {ChunkSize: 100000}} {
		data := write(t, files, opts)
		path := filepath.Join(t.TempDir(), "c.ferry")
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		a, err := OpenArchive(f)
		if err != nil {
			t.Fatal(err)
		}
		if a.mapped == nil {
			t.Fatal("the file was not mapped")
		}
		if err := spliceAll(t, a, files); err != nil {
			t.Fatal(err)
		}
		got, err := serveAll(a, files)
		if err != nil {
			t.Fatal(err)
		}
		for _, fl := range files {
			if !bytes.Equal(got[fl.name], fl.data) {
				t.Fatalf("%s served wrong", fl.name)
			}
		}
		// Cut short under the mapping, at a page: the pages past the cut
		// fault. (Cut inside a page, the rest of that page reads as
		// zeros, which the chunk's CRC-32C refuses.)
		if err := os.Truncate(path, int64(len(data)/4/os.Getpagesize()*os.Getpagesize())); err != nil {
			t.Fatal(err)
		}
		if err := spliceAll(t, a, files); !errors.Is(err, ErrTruncated) {
			t.Fatalf("serving a file cut short: %v, want ErrTruncated", err)
		}
		f.Close()
	}
	// A flipped byte in a raw chunk (random data) and in a compressed one.
	data := write(t, files, WriterOptions{ChunkSize: 256 << 10, NoDigests: true, Compression: pb.Compression_COMPRESSION_S2})
	recs := records(t, data)
	for _, want := range []pb.Compression{pb.Compression_COMPRESSION_NONE, pb.Compression_COMPRESSION_S2} {
		for _, r := range recs {
			if r.h.GetKind() != pb.RecordHeader_CHUNK || r.h.GetCompression() != want || r.h.GetPayloadLen() < 1000 {
				continue
			}
			bad := bytes.Clone(data)
			payloadAt := r.at + frameSize + int(binary.LittleEndian.Uint32(data[r.at:]))
			bad[payloadAt+500] ^= 0x10
			path := filepath.Join(t.TempDir(), "bad.ferry")
			if err := os.WriteFile(path, bad, 0o600); err != nil {
				t.Fatal(err)
			}
			f, err := os.Open(path)
			if err != nil {
				t.Fatal(err)
			}
			a, err := OpenArchive(f)
			if err != nil {
				t.Fatal(err)
			}
			if err := spliceAll(t, a, files); !errors.Is(err, ErrCorrupt) {
				t.Fatalf("a flipped byte in a %s chunk: %v, want ErrCorrupt", want, err)
			}
			f.Close()
			break
		}
	}
}

// SpliceTo hands decoded chunks to the pipe by reference and takes their
// buffers back only once the reader has read them: files served at once
// to slow readers, while other serving churns the buffers, all come
// through whole. A buffer taken back while the pipe still held it would
// carry another chunk's bytes by the time the reader got there.
func TestArchiveSpliceToSlowReaders(t *testing.T) {
	var files []file
	for k := range 4 {
		b := make([]byte, 5*DefaultChunkSize+12345)
		for i := 0; i < len(b); i += 4096 {
			copy(b[i:], fmt.Sprintf("file %d, page %d: ferry carries a process across the water. ", k, i/4096))
		}
		files = append(files, file{fmt.Sprintf("pages-%d.img", k+1), b})
	}
	path := filepath.Join(t.TempDir(), "c.ferry")
	if err := os.WriteFile(path, write(t, files, WriterOptions{Compression: pb.Compression_COMPRESSION_S2, NoDigests: true}), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	a, err := OpenArchive(f)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	var wg sync.WaitGroup
	errs := make(chan error, 2*len(files))
	for _, fl := range files[1:] {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		wg.Go(func() {
			_, err := a.SpliceTo(fl.name, w, nil)
			w.Close()
			if err != nil {
				errs <- err
			}
		})
		wg.Go(func() {
			defer r.Close()
			if err := pipeMismatch(fl.name, readSlowly(r, 50*time.Microsecond), fl.data); err != nil {
				errs <- err
			}
		})
	}
	// Churn: the first file decoded again and again meanwhile.
	stop := make(chan struct{})
	churned := make(chan struct{})
	go func() {
		defer close(churned)
		for {
			select {
			case <-stop:
				return
			default:
			}
			if _, err := a.WriteTo(files[0].name, io.Discard); err != nil {
				errs <- err
				return
			}
		}
	}()
	wg.Wait()
	close(stop)
	<-churned
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}
