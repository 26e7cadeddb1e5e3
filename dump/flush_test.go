package dump

import (
	"bytes"
	"crypto/sha256"
	"os"
	"path/filepath"
	"testing"
)

// A stream file written through the sink, its writeback started slice by
// slice as it grows, commits whole; an aborted one is removed, and a
// write that comes after the abort fails rather than reach a stopped
// flusher.
func TestSinkFlushesAsItWrites(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "c.ferry")
	s, err := openSink(out, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if s.flush == nil {
		t.Fatal("a file sink without a flusher")
	}
	block := bytes.Repeat([]byte("ferry carries a process across the water. "), 24000) // ~1 MiB
	h := sha256.New()
	var n int64
	for n < 3*flushEvery+5 {
		if _, err := s.Write(block); err != nil {
			t.Fatal(err)
		}
		h.Write(block)
		n += int64(len(block))
	}
	// A slice still being handed over when the next is due is covered
	// by the one after it: at least one has gone.
	if s.flush.handed < flushEvery {
		t.Errorf("%d of %d bytes handed to writeback", s.flush.handed, n)
	}
	if got, err := s.commit(); err != nil || got != n {
		t.Fatalf("commit: %d bytes, %v; want %d", got, err, n)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if sum := sha256.Sum256(b); !bytes.Equal(sum[:], h.Sum(nil)) {
		t.Fatal("the committed file differs from what was written")
	}

	s, err = openSink(filepath.Join(dir, "d.ferry"), Options{})
	if err != nil {
		t.Fatal(err)
	}
	tmp := s.f.Name()
	for range flushEvery/len(block) + 2 {
		if _, err := s.Write(block); err != nil {
			t.Fatal(err)
		}
	}
	s.abort()
	s.abort() // twice: a no-op
	if _, err := os.Stat(tmp); !os.IsNotExist(err) {
		t.Errorf("abort left %s (%v)", tmp, err)
	}
	if _, err := s.Write(block); err == nil {
		t.Error("a write after abort succeeded")
	}
}
