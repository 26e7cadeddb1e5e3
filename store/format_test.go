package store

import (
	"bytes"
	"errors"
	"testing"
)

// memObject is an Object in memory.
type memObject struct{ *bytes.Reader }

func (m memObject) Close() error { return nil }

func newMemObject(b []byte) memObject { return memObject{bytes.NewReader(b)} }

// testPack builds a small pack with one blob of each codec.
func testPack(t testing.TB) ([]byte, []packEntry) {
	t.Helper()
	var buf bytes.Buffer
	buf.Write(packHeader())
	var entries []packEntry
	add := func(raw []byte, c codec) {
		cod, err := newCodecs(c, 1)
		if err != nil {
			t.Fatal(err)
		}
		defer cod.close()
		var scratch []byte
		stored, got := cod.compress(raw, &scratch)
		entries = append(entries, packEntry{d: sumSHA256(raw), off: uint32(buf.Len()), stored: uint32(len(stored)), raw: uint32(len(raw)), codec: got})
		buf.Write(stored)
	}
	add(randBytes(1, page), codecNone)
	add(compressible(2, page), codecZstd)
	add(compressible(3, 64<<10), codecS2)
	buf.Write(packTrailer(entries, uint32(buf.Len())))
	return buf.Bytes(), entries
}

func TestPackIndexRoundTrip(t *testing.T) {
	b, want := testPack(t)
	got, err := readPackIndex(newMemObject(b), "p")
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(want) {
		t.Fatalf("%d entries, want %d", len(got), len(want))
	}
	cod, _ := newCodecs(codecZstd, 1)
	defer cod.close()
	s := &Store{cod: cod}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("entry %d: %+v, want %+v", i, got[i], want[i])
		}
		if _, err := s.checkBlob("p", got[i], b[got[i].off:got[i].off+got[i].stored], nil); err != nil {
			t.Fatalf("blob %d (%s): %v", i, got[i].codec, err)
		}
	}
	if want[1].codec != codecZstd || want[2].codec != codecS2 || want[0].codec != codecNone {
		t.Fatalf("codecs %v %v %v", want[0].codec, want[1].codec, want[2].codec)
	}
}

// TestPackIndexTruncated: a pack cut at any length is refused, never
// read past its end, never a panic.
func TestPackIndexTruncated(t *testing.T) {
	b, _ := testPack(t)
	for n := range len(b) {
		if _, err := readPackIndex(newMemObject(b[:n]), "p"); err == nil {
			t.Fatalf("pack truncated to %d of %d bytes accepted", n, len(b))
		}
	}
}

// TestPackIndexCorrupt: any single flipped byte outside the blobs is
// caught by the index checks (inside a blob, by the digest).
func TestPackIndexCorrupt(t *testing.T) {
	b, entries := testPack(t)
	last := entries[len(entries)-1]
	blobsEnd := int(last.off + last.stored)
	for i := range len(b) {
		if i >= packHeaderSize && i < blobsEnd {
			continue
		}
		c := bytes.Clone(b)
		c[i] ^= 0x01
		if _, err := readPackIndex(newMemObject(c), "p"); err == nil {
			t.Fatalf("flipped byte %d accepted", i)
		}
	}
}

func TestRefListRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		desc string
		refs []digest
	}{
		{"all stored", []digest{{1}, {2}, {3}}},
		{"all zero", []digest{{}, {}, {}}},
		{"zero first", []digest{{}, {1}, {}, {}, {2}, {3}}},
		{"one", []digest{{9}}},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			var rb refBuilder
			for _, d := range tc.refs {
				rb.add(d)
			}
			raw, err := rb.encode()
			if err != nil {
				t.Fatal(err)
			}
			got, err := decodeRefList(raw)
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != len(tc.refs) {
				t.Fatalf("%d refs, want %d", len(got), len(tc.refs))
			}
			for i := range got {
				if got[i] != tc.refs[i] {
					t.Fatalf("ref %d: %v, want %v", i, got[i], tc.refs[i])
				}
			}
		})
	}
}

func TestRefListLimits(t *testing.T) {
	var rb refBuilder
	rb.runs = []uint64{0, maxRefsPerList + 1}
	raw, _ := rb.encode()
	if _, err := decodeRefList(raw); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("oversized run: %v", err)
	}
	rb.runs = []uint64{2}
	rb.digests = make([]byte, digestSize)
	raw, _ = rb.encode()
	if _, err := decodeRefList(raw); err == nil {
		t.Fatal("digest count mismatch accepted")
	}
	rb.runs = []uint64{1}
	rb.digests = make([]byte, digestSize) // a zero digest named as stored
	raw, _ = rb.encode()
	if _, err := decodeRefList(raw); err == nil {
		t.Fatal("zero digest accepted")
	}
}

func FuzzDecodeRefList(f *testing.F) {
	var rb refBuilder
	for _, d := range []digest{{1}, {}, {2}} {
		rb.add(d)
	}
	raw, _ := rb.encode()
	f.Add(raw)
	f.Fuzz(func(t *testing.T, b []byte) {
		refs, err := decodeRefList(b)
		if err == nil && len(refs) > maxRefsPerList {
			t.Fatalf("%d refs accepted", len(refs))
		}
	})
}

func FuzzReadPackIndex(f *testing.F) {
	b, _ := testPack(f)
	f.Add(b)
	f.Fuzz(func(t *testing.T, b []byte) {
		entries, err := readPackIndex(newMemObject(b), "p")
		if err != nil {
			return
		}
		for _, e := range entries {
			if uint64(e.off)+uint64(e.stored) > uint64(len(b)) {
				t.Fatalf("entry %+v past the end of %d bytes", e, len(b))
			}
		}
	})
}

func TestCheckComponent(t *testing.T) {
	for _, tc := range []struct {
		name string
		ok   bool
	}{
		{"job-1", true}, {"pages-1.img", true}, {"ünïcode", true}, {"a b", true},
		{"", false}, {".", false}, {"..", false}, {".x", false}, {"a/b", false},
		{"a\nb", false}, {"a\x7f", false}, {"\xff", false}, {string(make([]byte, 256)), false},
	} {
		if err := checkComponent(tc.name); (err == nil) != tc.ok {
			t.Errorf("checkComponent(%q) = %v, want ok=%v", tc.name, err, tc.ok)
		}
	}
}
