package store

import (
	"context"
	"fmt"
	"io"
	"testing"
)

// BenchmarkBackends sets the S3 backend (a local versitygw serving a
// directory on the same disk, so the figures are ferry's and the
// protocol's cost, not a network's) next to the directory store: a
// 256 MiB pages file of random data as a first snapshot into an empty
// store, as a snapshot with 1% of its pages rewritten, and read back
// whole (a restore). make bench runs it.
func BenchmarkBackends(b *testing.B) {
	const size = 256 << 20
	data := randBytes(1, size)
	startS3(b, "bench") // here: its environment lasts for every sub-benchmark
	n := 0
	open := func(b *testing.B, backend string) *Store {
		b.Helper()
		n++
		loc := b.TempDir()
		if backend == "s3" {
			loc = fmt.Sprintf("s3://bench/run%d", n)
		}
		s, err := Open(context.Background(), loc, Options{})
		if err != nil {
			b.Fatal(err)
		}
		return s
	}
	for _, backend := range []string{"dir", "s3"} {
		b.Run(backend+"/first-snapshot", func(b *testing.B) {
			b.SetBytes(size)
			for b.Loop() {
				b.StopTimer()
				s := open(b, backend)
				b.StartTimer()
				writePages(b, s, "bench", data)
				b.StopTimer()
				s.Close()
				b.StartTimer()
			}
		})
		s := open(b, backend)
		writePages(b, s, "bench", data)
		seed := uint64(100)
		b.Run(backend+"/1pct-changed", func(b *testing.B) {
			b.SetBytes(size)
			for b.Loop() {
				b.StopTimer()
				seed++
				v, _ := changePages(data, 0.01, seed)
				b.StartTimer()
				writePages(b, s, "bench", v)
			}
		})
		b.Run(backend+"/restore", func(b *testing.B) {
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
		s.Close()
	}
}
