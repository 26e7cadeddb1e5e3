package image

import (
	"hash"
	"os"
	"runtime"
	"unsafe"

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
