package image

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	gproto "google.golang.org/protobuf/proto"

	pb "github.com/ferry-cr/ferry/proto"
)

// rec is one record of a stream as it lies in the bytes.
type rec struct {
	at      int // offset of its frame
	h       *pb.RecordHeader
	payload []byte
}

// records splits a well-formed stream into its records (the trailer's
// among them), for tests that inspect or rewrite them.
func records(t *testing.T, data []byte) []rec {
	t.Helper()
	var out []rec
	end := len(data) - FooterSize
	for off := HeaderSize; off < end; {
		n := int(binary.LittleEndian.Uint32(data[off:]))
		h := &pb.RecordHeader{}
		if err := gproto.Unmarshal(data[off+frameSize:off+frameSize+n], h); err != nil {
			t.Fatalf("record at %d: %v", off, err)
		}
		p := off + frameSize + n
		out = append(out, rec{at: off, h: h, payload: data[p : p+int(h.GetPayloadLen())]})
		off = p + int(h.GetPayloadLen())
	}
	return out
}

// rewrite returns data with record r replaced by h and payload (framed
// and checksummed anew). Offsets after it shift if its length changes.
func rewrite(t *testing.T, data []byte, r rec, h *pb.RecordHeader, payload []byte) []byte {
	t.Helper()
	head, err := frameHead(h, payload)
	if err != nil {
		t.Fatal(err)
	}
	end := r.at + frameSize + int(binary.LittleEndian.Uint32(data[r.at:])) + len(r.payload)
	out := append(bytes.Clone(data[:r.at]), head...)
	out = append(out, payload...)
	return append(out, data[end:]...)
}

// codecsOf counts a stream's chunks by compression.
func codecsOf(t *testing.T, data []byte) map[pb.Compression]int {
	n := map[pb.Compression]int{}
	for _, r := range records(t, data) {
		if r.h.GetKind() == pb.RecordHeader_CHUNK {
			n[r.h.GetCompression()]++
		}
	}
	return n
}

var s2Opts = WriterOptions{Compression: pb.Compression_COMPRESSION_S2}

func TestS2RoundTrip(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts WriterOptions
	}{
		{"64 KiB chunks", WriterOptions{Compression: pb.Compression_COMPRESSION_S2, ChunkSize: 64 << 10}},
		{"defaults", s2Opts},
		{"one core, odd chunks", WriterOptions{Compression: pb.Compression_COMPRESSION_S2, ChunkSize: 100000, Concurrency: 1}},
		{"no digests", WriterOptions{Compression: pb.Compression_COMPRESSION_S2, NoDigests: true}},
		{"adaptive", WriterOptions{Compression: pb.Compression_COMPRESSION_S2, Adaptive: true, ChunkSize: 64 << 10}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			files := testFiles(4, 3<<20+777)
			var out bytes.Buffer
			w := writeTo(t, &out, files, tc.opts)
			data := out.Bytes()
			got, _, err := readAll(data)
			if err != nil {
				t.Fatal(err)
			}
			for _, f := range files {
				if !bytes.Equal(got[f.name], f.data) {
					t.Errorf("reader: %s: %d bytes back, want %d", f.name, len(got[f.name]), len(f.data))
				}
			}
			for kind, open := range openBoth(data) {
				a, err := open()
				if err != nil {
					t.Fatalf("%s: %v", kind, err)
				}
				served, err := serveAll(a, files)
				if err != nil {
					t.Fatalf("%s: %v", kind, err)
				}
				for _, f := range files {
					if !bytes.Equal(served[f.name], f.data) {
						t.Errorf("%s: %s: %d bytes served, want %d", kind, f.name, len(served[f.name]), len(f.data))
					}
				}
				a.Close()
			}
			codecs := codecsOf(t, data)
			for _, r := range records(t, data) {
				// zstd only for long runs, in chunks past a small one (runChunk).
				if r.h.GetCompression() == pb.Compression_COMPRESSION_ZSTD && (r.h.GetRawLen() <= smallChunk || r.h.GetPayloadLen() >= r.h.GetRawLen()/runRatio) {
					t.Errorf("an s2 stream holds a zstd chunk of %d bytes in %d", r.h.GetPayloadLen(), r.h.GetRawLen())
				}
			}
			if !tc.opts.Adaptive {
				// The text compresses (in s2, or in zstd: it is one long
				// run, see runChunk), the random data is stored raw.
				if codecs[pb.Compression_COMPRESSION_S2]+codecs[pb.Compression_COMPRESSION_ZSTD] == 0 || codecs[pb.Compression_COMPRESSION_NONE] == 0 {
					t.Errorf("chunks by codec: %v", codecs)
				}
				if w.StoredBytes() >= w.RawBytes()*3/4 {
					t.Errorf("stored %d of %d raw bytes", w.StoredBytes(), w.RawBytes())
				}
			}
		})
	}
}

// Chunks that do not shrink are stored raw with either codec; zstd's
// probe (incompressible) spares it the pass over random data, and gets
// text right.
func TestIncompressibleChunksRaw(t *testing.T) {
	r := rand.New(rand.NewPCG(9, 9))
	random := make([]byte, 4<<20)
	for i := range random {
		random[i] = byte(r.Uint32())
	}
	text := bytes.Repeat([]byte("ferry carries a process across the water. "), 4<<20/42+1)[:4<<20]
	if !incompressible(random) || incompressible(text) {
		t.Fatalf("probe: random incompressible %v, text incompressible %v", incompressible(random), incompressible(text))
	}
	for _, c := range []pb.Compression{pb.Compression_COMPRESSION_ZSTD, pb.Compression_COMPRESSION_S2} {
		data := write(t, []file{{"pages-1.img", random}, {"pages-2.img", text}}, WriterOptions{Compression: c, ChunkSize: 1 << 20})
		textCodec := c
		if c == pb.Compression_COMPRESSION_S2 {
			textCodec = pb.Compression_COMPRESSION_ZSTD // a long run (runChunk)
		}
		var rawRandom, codedText int
		recs := records(t, data)
		names := map[uint32]string{}
		for _, r := range recs {
			switch r.h.GetKind() {
			case pb.RecordHeader_FILE:
				names[r.h.GetFile()] = r.h.GetName()
			case pb.RecordHeader_CHUNK:
				if names[r.h.GetFile()] == "pages-1.img" && r.h.GetCompression() == pb.Compression_COMPRESSION_NONE {
					rawRandom++
				}
				if names[r.h.GetFile()] == "pages-2.img" && r.h.GetCompression() == textCodec {
					codedText++
				}
			}
		}
		if rawRandom != 4 || codedText != 4 {
			t.Errorf("%s: %d of 4 random chunks raw, %d of 4 text chunks compressed", c, rawRandom, codedText)
		}
		got, _, err := readAll(data)
		if err != nil || !bytes.Equal(got["pages-1.img"], random) || !bytes.Equal(got["pages-2.img"], text) {
			t.Fatalf("%s: read back: %v", c, err)
		}
	}
}

// An S2 stream stores in zstd the chunks S2 shrinks most (long runs:
// zero pages, repeated text), which zstd decodes several times faster;
// other compressible chunks stay S2, random ones raw, small ones S2
// whatever they hold; all read back.
func TestS2RunsInZstd(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 5))
	random := make([]byte, 2<<20)
	for i := range random {
		random[i] = byte(r.Uint32())
	}
	// Words drawn at random from a small vocabulary: S2 shrinks it a few
	// times, far from a run.
	vocab := strings.Fields("ferry carries a process across the water page by page frozen thawed restored dumped memory kernel socket pipe file lock timer signal thread")
	var words bytes.Buffer
	for words.Len() < 2<<20 {
		words.WriteString(vocab[r.IntN(len(vocab))])
		words.WriteByte(' ')
	}
	text := words.Bytes()[:2<<20]
	zeros := make([]byte, 2<<20)
	files := []file{{"pages-1.img", zeros}, {"pages-2.img", text}, {"pages-3.img", random}, {"core-1.img", make([]byte, 4096)}}
	for _, adaptive := range []bool{false, true} {
		t.Run(fmt.Sprintf("adaptive=%v", adaptive), func(t *testing.T) {
			testS2RunsInZstd(t, files, adaptive)
		})
	}
}

// slowLink takes bytes at about rate a second: an Adaptive writer
// compresses for it.
type slowLink struct {
	w    io.Writer
	rate float64
}

func (l slowLink) Write(p []byte) (int, error) {
	time.Sleep(time.Duration(float64(len(p)) / l.rate * float64(time.Second)))
	return l.w.Write(p)
}

func testS2RunsInZstd(t *testing.T, files []file, adaptive bool) {
	opts := WriterOptions{Compression: pb.Compression_COMPRESSION_S2, ChunkSize: 1 << 20, NoDigests: true, Adaptive: adaptive}
	want := map[string]pb.Compression{"pages-1.img": pb.Compression_COMPRESSION_ZSTD, "pages-2.img": pb.Compression_COMPRESSION_S2,
		"pages-3.img": pb.Compression_COMPRESSION_NONE, "core-1.img": pb.Compression_COMPRESSION_S2}
	var buf bytes.Buffer
	if adaptive {
		// A link slower than compressing (32 MB/s), so that it
		// compresses; a small file goes raw all the same.
		writeTo(t, slowLink{&buf, 32e6}, files, opts)
		want["core-1.img"] = pb.Compression_COMPRESSION_NONE
	} else {
		writeTo(t, &buf, files, opts)
	}
	data := buf.Bytes()
	names := map[uint32]string{}
	for _, r := range records(t, data) {
		switch r.h.GetKind() {
		case pb.RecordHeader_FILE:
			names[r.h.GetFile()] = r.h.GetName()
		case pb.RecordHeader_CHUNK:
			if name := names[r.h.GetFile()]; r.h.GetCompression() != want[name] {
				t.Errorf("%s: a chunk in %s, want %s", name, r.h.GetCompression(), want[name])
			}
		}
	}
	got, _, err := readAll(data)
	if err != nil {
		t.Fatal(err)
	}
	for kind, open := range openBoth(data) {
		a, err := open()
		if err != nil {
			t.Fatalf("%s: %v", kind, err)
		}
		served, err := serveAll(a, files)
		if err != nil {
			t.Fatalf("%s: %v", kind, err)
		}
		for _, f := range files {
			if !bytes.Equal(got[f.name], f.data) || !bytes.Equal(served[f.name], f.data) {
				t.Errorf("%s: %s read back wrong", kind, f.name)
			}
		}
		a.Close()
	}
}

// A stream written by ferry before s2 existed (zstd, testdata/zstd-v1.ferry:
// testFiles(3, 40000) in 16 KiB chunks, written by commit 5090a6d) still
// reads, whole and through both archives.
func TestReadsStreamWrittenBeforeS2(t *testing.T) {
	data, err := os.ReadFile("testdata/zstd-v1.ferry")
	if err != nil {
		t.Fatal(err)
	}
	if n := codecsOf(t, data)[pb.Compression_COMPRESSION_ZSTD]; n == 0 {
		t.Fatal("the golden stream holds no zstd chunk")
	}
	files := testFiles(3, 40000)
	got, _, err := readAll(data)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		if !bytes.Equal(got[f.name], f.data) {
			t.Errorf("reader: %s differs", f.name)
		}
	}
	for kind, open := range openBoth(data) {
		a, err := open()
		if err != nil {
			t.Fatalf("%s: %v", kind, err)
		}
		served, err := serveAll(a, files)
		if err != nil {
			t.Fatalf("%s: %v", kind, err)
		}
		for _, f := range files {
			if !bytes.Equal(served[f.name], f.data) {
				t.Errorf("%s: %s differs", kind, f.name)
			}
		}
		a.Close()
	}
}

// A chunk in a codec this ferry does not know is refused, by the reader
// and by both archives, as unsupported (not served as garbage).
func TestUnknownCompressionRefused(t *testing.T) {
	for _, c := range []pb.Compression{pb.Compression_COMPRESSION_ZSTD, pb.Compression_COMPRESSION_S2} {
		text := bytes.Repeat([]byte("ferry carries a process. "), 10000)
		data := write(t, []file{{"pages-1.img", text}}, WriterOptions{Compression: c, ChunkSize: 64 << 10})
		for _, r := range records(t, data) {
			if r.h.GetKind() != pb.RecordHeader_CHUNK || r.h.GetCompression() != c {
				continue
			}
			h := gproto.Clone(r.h).(*pb.RecordHeader)
			h.Compression = 9 // same length as 1 and 2: every offset holds
			data = rewrite(t, data, r, h, r.payload)
			break
		}
		if _, _, err := readAll(data); !errors.Is(err, ErrUnsupportedCompression) || !errors.Is(err, ErrUnsupportedVersion) {
			t.Errorf("%s: reader: %v", c, err)
		}
		for kind, open := range openBoth(data) {
			a, err := open()
			if err == nil {
				_, err = a.WriteTo("pages-1.img", &bytes.Buffer{})
				a.Close()
			}
			if !errors.Is(err, ErrUnsupportedCompression) {
				t.Errorf("%s: %s: %v", c, kind, err)
			}
		}
	}
	if _, err := NewWriter(&bytes.Buffer{}, &pb.Manifest{}, WriterOptions{Compression: 9}); !errors.Is(err, ErrUnsupportedCompression) {
		t.Errorf("writer with codec 9: %v", err)
	}
}

// An s2 block whose own length disagrees with its header's raw_len is
// corrupt, and is refused before memory is taken for the length it
// claims (here 4 GiB).
func TestS2LengthChecked(t *testing.T) {
	text := bytes.Repeat([]byte("ferry carries a process. "), 10000)
	data := write(t, []file{{"pages-1.img", text}}, WriterOptions{Compression: pb.Compression_COMPRESSION_S2, ChunkSize: 64 << 10})
	var first rec
	for _, r := range records(t, data) {
		if r.h.GetKind() == pb.RecordHeader_CHUNK && r.h.GetCompression() == pb.Compression_COMPRESSION_S2 {
			first = r
			break
		}
	}
	if first.h == nil {
		t.Fatal("no s2 chunk")
	}
	_, k := binary.Uvarint(first.payload)
	// The reader: a block claiming 4 GiB.
	huge := binary.AppendUvarint(nil, 1<<32-1)
	payload := append(huge, first.payload[k:]...)
	bad := rewrite(t, data, first, gproto.Clone(first.h).(*pb.RecordHeader), payload)
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	if _, _, err := readAll(bad); !errors.Is(err, ErrCorrupt) {
		t.Errorf("reader: block claiming 4 GiB: %v", err)
	}
	runtime.ReadMemStats(&after)
	if grew := after.TotalAlloc - before.TotalAlloc; grew > 32<<20 {
		t.Errorf("reading a block that claims 4 GiB allocated %d bytes", grew)
	}
	// The archives: a block one byte longer than its header says, in as
	// many bytes as the true length (every offset holds).
	if k != 3 {
		t.Fatalf("length prefix of %d bytes", k)
	}
	longer := binary.AppendUvarint(nil, uint64(first.h.GetRawLen())+1)
	if len(longer) != k {
		t.Fatalf("prefix %d bytes", len(longer))
	}
	payload = append(longer, first.payload[k:]...)
	bad = rewrite(t, data, first, gproto.Clone(first.h).(*pb.RecordHeader), payload)
	if _, _, err := readAll(bad); !errors.Is(err, ErrCorrupt) {
		t.Errorf("reader: block one byte long: %v", err)
	}
	for kind, open := range openBoth(bad) {
		a, err := open()
		if err == nil {
			_, err = a.WriteTo("pages-1.img", &bytes.Buffer{})
			a.Close()
		}
		if !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: block one byte long: %v", kind, err)
		}
	}
}

func TestS2DamageCaught(t *testing.T) {
	flipEverywhere(t, smallS2(t))
	data := smallS2(t)
	for n := range len(data) {
		if _, _, err := readAll(data[:n]); !errors.Is(err, ErrTruncated) {
			t.Fatalf("s2 stream cut at %d of %d bytes: %v, want ErrTruncated", n, len(data), err)
		}
	}
}

// smallS2 is small in s2.
func smallS2(t testing.TB) []byte {
	return write(t, testFiles(2, 3000), WriterOptions{ChunkSize: 1000, Compression: pb.Compression_COMPRESSION_S2})
}

// fileData is the content of file name among files.
func fileData(files []file, name string) []byte {
	for _, f := range files {
		if f.name == name {
			return f.data
		}
	}
	return nil
}

// A file whose bytes pass every CRC but not the trailer's SHA-256 is cut
// before its last chunk (a file of one chunk, or none, writes nothing), from a file and from a pipe, with the file's
// digest computed beside the writes (writeTo's hasher).
func TestArchiveDigestHoldsBackLastChunk(t *testing.T) {
	for _, c := range []pb.Compression{pb.Compression_COMPRESSION_S2, pb.Compression_COMPRESSION_ZSTD, pb.Compression_COMPRESSION_NONE} {
		files := testFiles(6, 1<<20)
		data := write(t, files, WriterOptions{Compression: c, NoCompress: c == pb.Compression_COMPRESSION_NONE, ChunkSize: 64 << 10})
		recs := records(t, data)
		tr := recs[len(recs)-1]
		if tr.h.GetKind() != pb.RecordHeader_TRAILER {
			t.Fatal("last record is not the trailer")
		}
		var trailer pb.Trailer
		if err := gproto.Unmarshal(tr.payload, &trailer); err != nil {
			t.Fatal(err)
		}
		for _, fi := range trailer.GetFiles() {
			// pages-2.img is many chunks; core-1.img one, empty.img none
			// (each served in line: writeSingle).
			if n := fi.GetName(); n == "pages-2.img" || n == "core-1.img" || n == "empty.img" {
				fi.Sha256[0] ^= 1
			}
		}
		payload, err := gproto.MarshalOptions{Deterministic: true}.Marshal(&trailer)
		if err != nil || len(payload) != len(tr.payload) {
			t.Fatalf("trailer of %d bytes, was %d: %v", len(payload), len(tr.payload), err)
		}
		bad := rewrite(t, data, tr, gproto.Clone(tr.h).(*pb.RecordHeader), payload)
		for kind, open := range openBoth(bad) {
			a, err := open()
			if err != nil {
				t.Fatalf("%s: %v", kind, err)
			}
			var b bytes.Buffer
			n, err := a.WriteTo("pages-2.img", &b)
			if !errors.Is(err, ErrCorrupt) || n > 1<<20-64<<10 || int64(b.Len()) != n {
				t.Errorf("%s %s: wrote %d of %d bytes: %v", c, kind, n, 1<<20, err)
			}
			for _, small := range []string{"core-1.img", "empty.img"} {
				var b bytes.Buffer
				if n, err := a.WriteTo(small, &b); !errors.Is(err, ErrCorrupt) || n != 0 || b.Len() != 0 {
					t.Errorf("%s %s: %s wrote %d bytes: %v, want none and ErrCorrupt", c, kind, small, n, err)
				}
			}
			for _, intact := range []string{"pages-1.img", "inventory.img"} {
				var b bytes.Buffer
				if _, err := a.WriteTo(intact, &b); err != nil || !bytes.Equal(b.Bytes(), fileData(files, intact)) {
					t.Errorf("%s %s: an intact file, %s: %v", c, kind, intact, err)
				}
			}
			a.Close()
		}
	}
}
