package image

import (
	"sync"

	"golang.org/x/sys/unix"
)

// arena hands out memory for an archive held whole (ReadArchive) from
// large blocks mapped outside Go's heap and populated by the kernel in
// one go (MADV_POPULATE_WRITE). Why: the first touch of each page costs a
// page fault, and under a hypervisor that is an exit costing ~10 µs, so
// faulting in a gigabyte page by page takes seconds, while populating it
// in the kernel takes a tenth of that. Kept off the heap, the held stream
// also does not inflate the garbage collector's goal. The next block is
// populated in the background while the current one fills.
type arena struct {
	mu     sync.Mutex
	blocks [][]byte
	cur    []byte      // the unused rest of the current block
	next   chan []byte // the block being populated ahead, if any
	failed bool        // mmap failed once: fall back to the heap
	small  int         // bytes handed out from the heap so far
}

// arenaBlock is the size of a block; the first arenaSmall bytes come from
// the heap, so a small stream costs no mapping at all.
const (
	arenaBlock = 64 << 20
	arenaSmall = 16 << 20
)

// alloc returns n bytes of arena memory (a fresh heap slice for a chunk
// larger than a block or when mapping fails).
func (a *arena) alloc(n int) []byte {
	a.mu.Lock()
	defer a.mu.Unlock()
	if n > arenaBlock || a.failed || a.small+n <= arenaSmall {
		a.small += n
		return make([]byte, n)
	}
	if len(a.cur) < n {
		b := a.take()
		if b == nil {
			a.failed = true
			return make([]byte, n)
		}
		a.blocks = append(a.blocks, b)
		a.cur = b
		a.prefetch()
	}
	out := a.cur[:n:n]
	a.cur = a.cur[n:]
	return out
}

// take is the block populated ahead, or a new one.
func (a *arena) take() []byte {
	if a.next != nil {
		b := <-a.next
		a.next = nil
		if b != nil {
			return b
		}
	}
	return mapBlock()
}

func (a *arena) prefetch() {
	a.next = make(chan []byte, 1)
	go func(ch chan []byte) { ch <- mapBlock() }(a.next)
}

func mapBlock() []byte {
	b, err := unix.Mmap(-1, 0, arenaBlock, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return nil
	}
	// Best effort: without it (kernels before 5.14) pages fault on use.
	_ = unix.Madvise(b, unix.MADV_POPULATE_WRITE)
	return b
}

// release unmaps every block; nothing handed out may be used after it.
func (a *arena) release() {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.next != nil {
		if b := <-a.next; b != nil {
			_ = unix.Munmap(b)
		}
		a.next = nil
	}
	for _, b := range a.blocks {
		_ = unix.Munmap(b)
	}
	a.blocks, a.cur = nil, nil
}
