package store

import (
	"context"
	"io"
	"testing"
)

// writePages adds a snapshot of one pages file, written in 1 MiB pieces
// as CRIU's image streamer would.
func writePages(b *testing.B, s *Store, job string, data []byte) Snapshot {
	b.Helper()
	w, err := s.Begin(context.Background(), job)
	if err != nil {
		b.Fatal(err)
	}
	f, err := w.Create("pages-1.img")
	if err != nil {
		b.Fatal(err)
	}
	for p := data; len(p) > 0; p = p[min(len(p), 1<<20):] {
		if _, err := f.Write(p[:min(len(p), 1<<20)]); err != nil {
			b.Fatal(err)
		}
	}
	if err := f.Close(); err != nil {
		b.Fatal(err)
	}
	snap, err := w.Commit(nil)
	if err != nil {
		b.Fatal(err)
	}
	return snap
}

// BenchmarkAdd measures ingest of a 256 MiB pages file of random
// (incompressible) data: into an empty store (full: hash, compress
// attempt, write, fsync), then with 1% of its pages rewritten at random
// (the periodic checkpoint), then unchanged (every chunk a dedup hit).
func BenchmarkAdd(b *testing.B) {
	const size = 256 << 20
	data := randBytes(1, size)
	for _, comp := range []Compression{CompressionZstd, CompressionS2} {
		b.Run("full/"+string(comp), func(b *testing.B) {
			b.SetBytes(size)
			var stored int64
			for b.Loop() {
				b.StopTimer()
				s, err := Open(context.Background(), b.TempDir(), Options{Compression: comp})
				if err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
				stored = writePages(b, s, "bench", data).StoredBytes
				b.StopTimer()
				s.Close()
				b.StartTimer()
			}
			b.ReportMetric(float64(stored)/(1<<20), "stored-MiB")
		})
	}
	dir := b.TempDir()
	s, err := Open(context.Background(), dir, Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	writePages(b, s, "bench", data)
	seed := uint64(1) // every iteration a new 1%, even across b.N rounds
	b.Run("1pct-changed", func(b *testing.B) {
		b.SetBytes(size)
		var stored int64
		for b.Loop() {
			b.StopTimer()
			seed++
			v, _ := changePages(data, 0.01, seed)
			b.StartTimer()
			stored = writePages(b, s, "bench", v).StoredBytes
		}
		b.ReportMetric(float64(stored)/(1<<20), "stored-MiB")
	})
	b.Run("unchanged", func(b *testing.B) {
		b.SetBytes(size)
		for b.Loop() {
			writePages(b, s, "bench", data)
		}
	})
	b.Run("read", func(b *testing.B) {
		snap, err := s.Latest(context.Background(), "bench")
		if err != nil {
			b.Fatal(err)
		}
		b.SetBytes(size)
		for b.Loop() {
			r, err := s.OpenSnapshot(context.Background(), snap)
			if err != nil {
				b.Fatal(err)
			}
			rc, _ := r.Open("pages-1.img")
			if n, err := io.Copy(io.Discard, rc); err != nil || n != size {
				b.Fatal(n, err)
			}
			rc.Close()
			r.Close()
		}
	})
}
