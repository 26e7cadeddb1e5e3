package dump

import (
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// flusher starts the writeback of a file being written, a slice at a
// time, in the background (sync_file_range, SYNC_FILE_RANGE_WRITE), so
// that the fsync that makes the file durable finds little left to write.
// A checkpoint writes its .ferry file while the job is frozen and syncs
// it once the job runs again: on this project's test machines that
// fsync of 512 MiB of dirty pages was a quarter of a checkpoint's wall
// time, with the disk idle while the job was frozen. The writer never
// waits for it: a slice is handed over only when the one before has
// gone, else the next one covers both.
type flusher struct {
	fd   int
	kick chan int64
	done chan struct{}

	mu      sync.Mutex
	handed  int64 // bytes handed to writeback so far
	stopped bool
}

// flushEvery is the slice: large enough that a call is cheap, small
// enough that little is left at the end.
const flushEvery = 32 << 20

func newFlusher(f *os.File) *flusher {
	fl := &flusher{fd: int(f.Fd()), kick: make(chan int64, 1), done: make(chan struct{})}
	go fl.run()
	return fl
}

// wrote tells the flusher the file now holds n bytes.
func (fl *flusher) wrote(n int64) {
	fl.mu.Lock()
	defer fl.mu.Unlock()
	if fl.stopped || n-fl.handed < flushEvery {
		return
	}
	select {
	case fl.kick <- n:
		fl.handed = n
	default: // the last slice is still being handed over
	}
}

func (fl *flusher) run() {
	defer close(fl.done)
	var from int64
	for to := range fl.kick {
		// Errors do not matter here: the fsync reports any that do.
		_ = unix.SyncFileRange(fl.fd, from, to-from, unix.SYNC_FILE_RANGE_WRITE)
		from = to
	}
}

// stop ends the flusher (none: nothing to do); the file may be closed
// once it returns.
func (fl *flusher) stop() {
	if fl == nil {
		return
	}
	fl.mu.Lock()
	if fl.stopped {
		fl.mu.Unlock()
		return
	}
	fl.stopped = true
	close(fl.kick)
	fl.mu.Unlock()
	<-fl.done
}
