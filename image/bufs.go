package image

import (
	"bytes"
	"hash"
	"os"
	"runtime"
	"sync"
	"unsafe"

	"github.com/klauspost/compress/s2"
	"github.com/klauspost/compress/zstd"

	"golang.org/x/sys/unix"
)

// bufList recycles buffers of one size. Unlike a sync.Pool, which the
// garbage collector empties at every cycle, it keeps up to its capacity of
// them: a replacement is fresh memory whose every page faults on first
// touch (see arena), and a checkpoint moves gigabytes through a handful of
// buffers.
type bufList struct {
	size int
	free chan []byte
}

func newBufList(size, keep int) *bufList {
	return &bufList{size: size, free: make(chan []byte, keep)}
}

// chunkBufs serves every writer and archive of the process that uses the
// default chunk size.
var chunkBufs = newBufList(DefaultChunkSize, 4*runtime.GOMAXPROCS(0)+4)

// smallBufs hold the first bytes of each file a Writer writes (see
// FileWriter.room), and the compressed form of a small chunk.
var smallBufs = newBufList(smallChunk, 64)

// s2Bufs and s2SmallBufs hold S2's output for a chunk, and for a small
// one: its worst case is a few bytes over the input, so it needs buffers
// of its own.
var (
	s2Bufs      = newBufList(s2.MaxEncodedLen(DefaultChunkSize), 4*runtime.GOMAXPROCS(0)+4)
	s2SmallBufs = newBufList(s2.MaxEncodedLen(smallChunk), 64)
)

// smallChunk is the size of a small buffer.
const smallChunk = 64 << 10

// get returns an empty buffer of the list's capacity.
func (l *bufList) get() []byte {
	select {
	case b := <-l.free:
		return b[:0]
	default:
		return populated(l.size)[:0]
	}
}

// put gives b back; a buffer of another capacity, or one too many, is
// left to the garbage collector.
func (l *bufList) put(b []byte) {
	if cap(b) != l.size {
		return
	}
	select {
	case l.free <- b[:0]:
	default:
	}
}

// populated is make([]byte, n) with its pages faulted in by the kernel in
// one call rather than one fault per page on first use.
func populated(n int) []byte {
	b := make([]byte, n)
	page := uintptr(os.Getpagesize())
	start := uintptr(unsafe.Pointer(unsafe.SliceData(b)))
	first := (start + page - 1) &^ (page - 1)
	end := (start + uintptr(n)) &^ (page - 1)
	if end > first {
		_ = unix.Madvise(b[first-start:end-start], unix.MADV_POPULATE_WRITE)
	}
	return b
}

// nopHash stands for SHA-256 in a stream written without digests
// (FlagNoDigests): it sums to nothing, which is what such a trailer holds.
type nopHash struct{}

func (nopHash) Write(p []byte) (int, error) { return len(p), nil }
func (nopHash) Sum(b []byte) []byte         { return b }
func (nopHash) Reset()                      {}
func (nopHash) Size() int                   { return 0 }
func (nopHash) BlockSize() int              { return 64 }

var _ hash.Hash = nopHash{}

// Warm readies, ahead of use, n default-size chunk buffers (no more
// than are kept) and the default zstd encoder. A process about to write
// a stream while a job is frozen calls it first: a fresh buffer is
// megabytes whose pages must be faulted in, the first few grow a young
// heap through several garbage collections, and an encoder allocates
// large tables on first use, all of which would otherwise be downtime.
func Warm(n int) {
	var got [][]byte
	for range min(n, cap(chunkBufs.free)) {
		got = append(got, chunkBufs.get())
	}
	for _, b := range got {
		chunkBufs.put(b)
	}
	conc := runtime.GOMAXPROCS(0)
	enc, err := encoder(zstd.SpeedFastest, conc)
	if err != nil {
		return
	}
	// Concurrent calls take distinct encoder states: each allocates its
	// own on its first block.
	sample := bytes.Repeat([]byte("ferry warms its encoder. "), (256<<10)/25)
	var wg sync.WaitGroup
	for range conc {
		wg.Go(func() { enc.EncodeAll(sample, nil) })
	}
	wg.Wait()
}

// encoder returns the process's zstd encoder for level and concurrency.
// Writers share encoders (EncodeAll is safe for concurrent use) so that
// their tables are allocated once per process, and never close them.
func encoder(level zstd.EncoderLevel, concurrency int) (*zstd.Encoder, error) {
	encoders.mu.Lock()
	defer encoders.mu.Unlock()
	k := encoderKey{level, concurrency}
	if e := encoders.m[k]; e != nil {
		return e, nil
	}
	// No frame checksum: every chunk's payload has its CRC-32C in its
	// record already, and zstd's XXH64 over the raw bytes cost a pass on
	// each side (4% of a restore's CPU, here). Frames with one, written
	// before, are still checked by the decoder.
	e, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(level), zstd.WithEncoderConcurrency(concurrency), zstd.WithEncoderCRC(false))
	if err != nil {
		return nil, err
	}
	if encoders.m == nil {
		encoders.m = map[encoderKey]*zstd.Encoder{}
	}
	encoders.m[k] = e
	return e, nil
}

type encoderKey struct {
	level       zstd.EncoderLevel
	concurrency int
}

var encoders struct {
	mu sync.Mutex
	m  map[encoderKey]*zstd.Encoder
}
