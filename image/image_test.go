package image

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"testing/iotest"
	"time"

	pb "github.com/ferry-cr/ferry/proto"
)

type file struct {
	name string
	data []byte
}

func testFiles(seed uint64, big int) []file {
	r := rand.New(rand.NewPCG(seed, 7))
	random := make([]byte, big)
	for i := range random {
		random[i] = byte(r.Uint32())
	}
	text := bytes.Repeat([]byte("ferry carries a process across the water. "), big/40+1)[:big]
	return []file{
		{"inventory.img", []byte("inventory")},
		{"empty.img", nil},
		{"pages-1.img", random},
		{"pages-2.img", text},
		{"core-1.img", []byte("core")},
	}
}

// write makes a stream of files, written concurrently (as CRIU does).
func write(t testing.TB, files []file, opts WriterOptions) []byte {
	t.Helper()
	var buf bytes.Buffer
	writeTo(t, &buf, files, opts)
	return buf.Bytes()
}

// writeTo is write to out; it returns the closed writer, for its figures.
func writeTo(t testing.TB, out io.Writer, files []file, opts WriterOptions) *Writer {
	t.Helper()
	w, err := NewWriter(out, &pb.Manifest{Job: "j", CriuVersion: "4.2.1"}, opts)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, len(files))
	for _, f := range files {
		fw, err := w.Create(f.name)
		if err != nil {
			t.Fatal(err)
		}
		wg.Go(func() {
			// Odd write sizes cross chunk boundaries.
			for p := f.data; len(p) > 0; {
				n := min(len(p), 7777)
				if _, err := fw.Write(p[:n]); err != nil {
					errs <- err
					return
				}
				p = p[n:]
			}
			errs <- fw.Close()
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return w
}

// readAll reads a stream back into files.
func readAll(data []byte) (map[string][]byte, *Reader, error) {
	rd, err := NewReader(bytes.NewReader(data))
	if err != nil {
		return nil, nil, err
	}
	defer rd.Close()
	out := map[string][]byte{}
	for {
		c, err := rd.Next()
		if errors.Is(err, io.EOF) {
			return out, rd, nil
		}
		if err != nil {
			return nil, nil, err
		}
		if uint64(len(out[c.File])) != c.Offset {
			return nil, nil, fmt.Errorf("chunk of %s at %d after %d bytes", c.File, c.Offset, len(out[c.File]))
		}
		out[c.File] = append(out[c.File], c.Data...)
	}
}

func TestRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts WriterOptions
	}{
		{"zstd", WriterOptions{ChunkSize: 64 << 10}},
		{"zstd level 3, one core", WriterOptions{ChunkSize: 100000, Level: 3, Concurrency: 1}},
		{"none", WriterOptions{ChunkSize: 64 << 10, NoCompress: true}},
		{"defaults", WriterOptions{}},
		{"no digests", WriterOptions{NoDigests: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			files := testFiles(1, 1<<20)
			data := write(t, files, tc.opts)
			got, rd, err := readAll(data)
			if err != nil {
				t.Fatal(err)
			}
			for _, f := range files {
				if !bytes.Equal(got[f.name], f.data) {
					t.Errorf("%s: %d bytes back, want %d", f.name, len(got[f.name]), len(f.data))
				}
			}
			if rd.Manifest().GetJob() != "j" {
				t.Errorf("manifest %v", rd.Manifest())
			}
			tr := rd.Trailer()
			if len(tr.GetFiles()) != len(files) {
				t.Fatalf("trailer lists %d files", len(tr.GetFiles()))
			}
			for i, fi := range tr.GetFiles() {
				sum := sha256.Sum256(files[i].data)
				want := sum[:]
				if tc.opts.NoDigests {
					want = nil
				}
				if fi.GetName() != files[i].name || fi.GetSize() != uint64(len(files[i].data)) || !bytes.Equal(fi.GetSha256(), want) {
					t.Errorf("index entry %d: %v", i, fi)
				}
			}
			if rd.Digests() == tc.opts.NoDigests || (len(tr.GetStreamSha256()) == 0) != tc.opts.NoDigests {
				t.Errorf("digests %v, stream digest %x, written with NoDigests %v", rd.Digests(), tr.GetStreamSha256(), tc.opts.NoDigests)
			}
			if !tc.opts.NoCompress && tr.GetStoredBytes() >= tr.GetRawBytes() {
				t.Errorf("zstd stored %d of %d raw bytes", tr.GetStoredBytes(), tr.GetRawBytes())
			}
		})
	}
}

// small is a stream small enough to damage at every byte.
func small(t testing.TB) []byte {
	return write(t, testFiles(2, 3000), WriterOptions{ChunkSize: 1000})
}

// smallNoDigests is small without SHA-256: its CRCs alone must catch
// every damage.
func smallNoDigests(t testing.TB) []byte {
	return write(t, testFiles(2, 3000), WriterOptions{ChunkSize: 1000, NoDigests: true})
}

func TestTruncationAtEveryByte(t *testing.T) {
	data := small(t)
	for n := range len(data) {
		_, _, err := readAll(data[:n])
		if !errors.Is(err, ErrTruncated) {
			t.Fatalf("stream cut at %d of %d bytes: %v, want ErrTruncated", n, len(data), err)
		}
	}
}

func TestFlippedByteEverywhere(t *testing.T) {
	for _, data := range [][]byte{small(t), smallNoDigests(t)} {
		flipEverywhere(t, data)
	}
}

func flipEverywhere(t *testing.T, data []byte) {
	for i := range data {
		bad := bytes.Clone(data)
		bad[i] ^= 0x20
		_, _, err := readAll(bad)
		if err == nil {
			t.Fatalf("flipped byte %d of %d went unnoticed", i, len(data))
		}
		if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrBadMagic) && !errors.Is(err, ErrUnsupportedVersion) &&
			!errors.Is(err, ErrRecordTooLarge) && !errors.Is(err, ErrTruncated) {
			t.Fatalf("flipped byte %d: unexpected error %v", i, err)
		}
	}
}

func TestHeaderChecks(t *testing.T) {
	data := small(t)
	future := bytes.Clone(data)
	binary.LittleEndian.PutUint16(future[8:], Version+1)
	if _, err := NewReader(bytes.NewReader(future)); !errors.Is(err, ErrUnsupportedVersion) {
		t.Errorf("future version: %v", err)
	}
	if _, err := NewReader(bytes.NewReader([]byte("PK\x03\x04 not an image at all"))); !errors.Is(err, ErrBadMagic) {
		t.Errorf("zip file: %v", err)
	}
	if _, err := NewReader(bytes.NewReader(nil)); !errors.Is(err, ErrTruncated) {
		t.Errorf("empty input: %v", err)
	}
	huge := bytes.Clone(data)
	binary.LittleEndian.PutUint32(huge[HeaderSize:], maxHeaderLen+1)
	if _, err := NewReader(bytes.NewReader(huge)); !errors.Is(err, ErrRecordTooLarge) {
		t.Errorf("oversized record header: %v", err)
	}
	extra := append(bytes.Clone(data), 0)
	if _, _, err := readAll(extra); !errors.Is(err, ErrCorrupt) {
		t.Errorf("byte after the footer: %v", err)
	}
}

func TestWriterMisuse(t *testing.T) {
	var buf bytes.Buffer
	w, err := NewWriter(&buf, &pb.Manifest{}, WriterOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Create("open.img"); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err == nil {
		t.Error("Close with an unclosed file succeeded")
	}
	if _, err := NewWriter(&buf, &pb.Manifest{}, WriterOptions{ChunkSize: maxChunkRaw + 1}); !errors.Is(err, ErrRecordTooLarge) {
		t.Errorf("oversized chunk size: %v", err)
	}
}

// TestWriteSeedCorpus keeps testdata/fuzz in step with the format; run
// with FERRY_WRITE_CORPUS=1 to regenerate.
func TestWriteSeedCorpus(t *testing.T) {
	if os.Getenv("FERRY_WRITE_CORPUS") == "" {
		t.Skip("set FERRY_WRITE_CORPUS=1 to regenerate the fuzz seed corpus")
	}
	dir := filepath.Join("testdata", "fuzz", "FuzzReader")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, data := range map[string][]byte{
		"small-zstd": small(t),
		"small-none": write(t, testFiles(3, 2000), WriterOptions{ChunkSize: 700, NoCompress: true}),
		"small-s2":   smallS2(t),
	} {
		content := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", data)
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// FuzzReader: no input may crash the reader, allocate past the limits, or
// be accepted unless it is a well-formed stream that reads back the same.
func FuzzReader(f *testing.F) {
	f.Add(small(f))
	f.Add(smallS2(f))
	f.Fuzz(func(t *testing.T, data []byte) {
		files, _, err := readAll(data)
		if err != nil {
			return
		}
		// Accepted: writing the same files again must give a stream that
		// reads back equal.
		var total int
		for _, d := range files {
			total += len(d)
		}
		if total > 1<<26 {
			t.Fatalf("accepted %d bytes of file data from %d bytes of input", total, len(data))
		}
	})
}

// warmBuffer is an empty buffer with n bytes of room already faulted in:
// where first touches of pages are slow (a VM), writing into fresh memory
// would itself be slower than compressing.
func warmBuffer(n int) *bytes.Buffer {
	m := make([]byte, n)
	for i := 0; i < n; i += 4096 {
		m[i] = 1
	}
	b := bytes.NewBuffer(m)
	b.Reset()
	return b
}

// slowWriter is a link slower than compression.
type slowWriter struct{ bytes.Buffer }

func (w *slowWriter) Write(p []byte) (int, error) {
	time.Sleep(2 * time.Millisecond)
	return w.Buffer.Write(p)
}

// Adaptive compression sends raw chunks to an output that keeps up and
// compressed ones to one that lags; either stream reads back whole.
func TestAdaptiveCompression(t *testing.T) {
	// Like memory: chunks half random, half text.
	r := rand.New(rand.NewPCG(5, 7))
	var text []byte
	for range 16 << 20 / (64 << 10) {
		for range 32 << 10 {
			text = append(text, byte(r.Uint32()))
		}
		text = append(text, bytes.Repeat([]byte("ferry carries a process. "), 32<<10/25+1)[:32<<10]...)
	}
	for _, tc := range []struct {
		name string
		out  interface {
			io.Writer
			Bytes() []byte
		}
		compressed bool
	}{
		{"fast output", warmBuffer(40 << 20), false},
		{"slow output", &slowWriter{}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := writeTo(t, tc.out, []file{{"pages-1.img", text}}, WriterOptions{ChunkSize: 64 << 10, Concurrency: 1, Adaptive: true})
			ratio := float64(w.StoredBytes()) / float64(w.RawBytes())
			if tc.compressed != (ratio < 0.7) {
				t.Errorf("stored %.2f of the raw bytes", ratio)
			}
			got, _, err := readAll(tc.out.Bytes())
			if err != nil || !bytes.Equal(got["pages-1.img"], text) {
				t.Fatalf("read back %d of %d bytes: %v", len(got["pages-1.img"]), len(text), err)
			}
		})
	}
}

// Adaptive compression sends a small file raw even to a slow output (it
// would save a few KiB); plain zstd compresses it.
func TestAdaptiveSmallFileRaw(t *testing.T) {
	text := bytes.Repeat([]byte("ferry carries a process. "), 16<<10/25)
	for _, adaptive := range []bool{true, false} {
		out := &slowWriter{}
		w := writeTo(t, out, []file{{"core-1.img", text}}, WriterOptions{Adaptive: adaptive})
		if raw := w.StoredBytes() == w.RawBytes(); raw != adaptive {
			t.Errorf("adaptive %v: stored %d of %d raw bytes", adaptive, w.StoredBytes(), w.RawBytes())
		}
		if got, _, err := readAll(out.Bytes()); err != nil || !bytes.Equal(got["core-1.img"], text) {
			t.Fatalf("adaptive %v: read back %d of %d bytes: %v", adaptive, len(got["core-1.img"]), len(text), err)
		}
	}
}

// TestSmallFirstBuffer crosses the boundary where a file outgrows the
// small buffer it starts in (FileWriter.room), by Write in odd pieces and
// by ReadFrom, at the default chunk size, compressed and not.
func TestSmallFirstBuffer(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	var files []file
	for i, n := range []int{1, smallChunk - 1, smallChunk, smallChunk + 1, 3*smallChunk + 5, DefaultChunkSize + smallChunk + 9} {
		data := make([]byte, n)
		for j := range data {
			data[j] = byte(r.Uint32() % 7) // compressible, not trivially
		}
		files = append(files, file{fmt.Sprintf("f%d.img", i), data})
	}
	for _, opts := range []WriterOptions{{}, {NoCompress: true}} {
		check := func(t *testing.T, data []byte) {
			got, _, err := readAll(data)
			if err != nil {
				t.Fatal(err)
			}
			for _, f := range files {
				if !bytes.Equal(got[f.name], f.data) {
					t.Fatalf("%s: got %d bytes back, want %d (or they differ)", f.name, len(got[f.name]), len(f.data))
				}
			}
		}
		t.Run(fmt.Sprintf("write/%v", opts.NoCompress), func(t *testing.T) { check(t, write(t, files, opts)) })
		t.Run(fmt.Sprintf("readfrom/%v", opts.NoCompress), func(t *testing.T) {
			var buf bytes.Buffer
			w, err := NewWriter(&buf, &pb.Manifest{Job: "j"}, opts)
			if err != nil {
				t.Fatal(err)
			}
			for _, f := range files {
				fw, err := w.Create(f.name)
				if err != nil {
					t.Fatal(err)
				}
				// A reader that returns odd amounts, as a pipe does.
				if _, err := io.Copy(fw, iotest.OneByteReader(bytes.NewReader(f.data[:min(len(f.data), 100)]))); err != nil {
					t.Fatal(err)
				}
				if _, err := fw.ReadFrom(bytes.NewReader(f.data[min(len(f.data), 100):])); err != nil {
					t.Fatal(err)
				}
				if err := fw.Close(); err != nil {
					t.Fatal(err)
				}
			}
			if err := w.Close(); err != nil {
				t.Fatal(err)
			}
			check(t, buf.Bytes())
		})
	}
}

// countingWriter counts its Write calls and bytes, safely for polling;
// each call takes delay.
type countingWriter struct {
	delay        time.Duration
	mu           sync.Mutex
	calls, bytes int
}

func (w *countingWriter) Write(p []byte) (int, error) {
	time.Sleep(w.delay)
	w.mu.Lock()
	defer w.mu.Unlock()
	w.calls++
	w.bytes += len(p)
	return len(p), nil
}

func (w *countingWriter) get() (calls, bytes int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.calls, w.bytes
}

// Small records are gathered into few writes while the output lags, and
// nothing gathered waits for more: a file's records reach the output
// while the writer is idle.
func TestSmallRecordsGathered(t *testing.T) {
	out := &countingWriter{delay: time.Millisecond}
	w, err := NewWriter(out, &pb.Manifest{Job: "j"}, WriterOptions{NoDigests: true, Adaptive: true})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 50 {
		fw, err := w.Create(fmt.Sprintf("core-%d.img", i))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := fw.Write(bytes.Repeat([]byte{byte(i)}, 3000)); err != nil {
			t.Fatal(err)
		}
		if err := fw.Close(); err != nil {
			t.Fatal(err)
		}
	}
	// The writer is idle now, not closed: all 50 files must be out.
	deadline := time.Now().Add(5 * time.Second)
	for _, n := out.get(); n < 50*3000; _, n = out.get() {
		if time.Now().After(deadline) {
			t.Fatalf("only %d bytes reached the output of an idle writer", n)
		}
		time.Sleep(time.Millisecond)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	// 150 records (start, chunk, end of each file) and the header: one
	// write each, ungathered. The output is slower than the files come,
	// so the queue stays full and each write takes several records.
	if calls, _ := out.get(); calls > 75 {
		t.Errorf("%d writes for 50 small files", calls)
	}
}

// gateWriter is an output that, once stalled, takes nothing more until
// opened; everything it takes goes into buf.
type gateWriter struct {
	stalled atomic.Bool
	open    chan struct{}
	buf     bytes.Buffer
}

func (g *gateWriter) Write(p []byte) (int, error) {
	if g.stalled.Load() {
		<-g.open
	}
	return g.buf.Write(p)
}

// A writer with a Backlog takes that many chunks more while its output
// takes nothing (a --leave-running checkpoint's job must not wait for a
// slow disk); without one it waits for the output. Either way the stream
// reads back whole once the output takes it.
func TestBacklogWhileOutputStalls(t *testing.T) {
	const chunk, chunks = 64 << 10, 40
	data := make([]byte, chunk*chunks)
	for i := range data {
		data[i] = byte(i * 7 / 5) // compressible: payloads are copies, not the chunk buffers
	}
	for _, backlog := range []int{0, chunks} {
		out := &gateWriter{open: make(chan struct{})}
		opened := false
		open := func() {
			if !opened {
				opened = true
				close(out.open)
			}
		}
		t.Cleanup(open)
		w, err := NewWriter(out, &pb.Manifest{Job: "j"}, WriterOptions{Compression: pb.Compression_COMPRESSION_S2, ChunkSize: chunk, Concurrency: 2, Backlog: backlog, NoDigests: true})
		if err != nil {
			t.Fatal(err)
		}
		out.stalled.Store(true) // the header is out; from here the output takes nothing
		fw, err := w.Create("pages-1.img")
		if err != nil {
			t.Fatal(err)
		}
		wrote := make(chan error, 1)
		go func() {
			_, err := fw.Write(data)
			wrote <- err
		}()
		select {
		case err := <-wrote:
			if backlog == 0 {
				t.Fatalf("without a backlog, %d chunks went in while the output took nothing (%v)", chunks, err)
			}
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(map[bool]time.Duration{true: 300 * time.Millisecond, false: 30 * time.Second}[backlog == 0]):
			if backlog != 0 {
				t.Fatalf("a backlog of %d chunks did not take %d while the output stalled", backlog, chunks)
			}
		}
		open()
		if backlog == 0 {
			if err := <-wrote; err != nil {
				t.Fatal(err)
			}
		}
		if err := fw.Close(); err != nil {
			t.Fatal(err)
		}
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
		files, _, err := readAll(out.buf.Bytes())
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(files["pages-1.img"], data) {
			t.Fatalf("backlog %d: the file read back differs", backlog)
		}
	}
}
