package dump

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/ferry-cr/ferry/image"
	"github.com/ferry-cr/ferry/internal/criu"
)

// Pages last: CRIU writes a stream in the order it dumps, with the job's
// memory (pages-N.img) in the middle and the images a restore reads first
// (inventory, pstree, files) at the end, so a restore cannot start until
// the whole stream is there. For a migration the source therefore holds
// the pages files back and sends them after everything else, behind a
// REMAINING record: the destination starts CRIU at that record and
// restores the memory while it arrives (image.StreamArchive), and the
// transfer of the memory overlaps the restore's faulting it in.
//
// The pages are held where CRIU put them, in kernel pipes: spliced from
// CRIU's pipe into pipes of our own, they stay references to the frozen
// job's pages, neither copied nor backed by new memory. (Memory touched
// for the first time costs a fault per page, which under a hypervisor is
// most of what moving a page costs.) The job stays frozen, and its pages
// unchanged, until they have been sent.

// isPages says whether CRIU's image name is a pages file, the job's memory.
func isPages(name string) bool {
	return strings.HasPrefix(name, "pages-") && strings.HasSuffix(name, ".img")
}

// heldPipeSize is the size asked of each holding pipe: root may exceed
// fs.pipe-max-size, and fewer pipes mean fewer descriptors (a 16 MiB pipe
// needs 4096 slots of kernel memory, 160 KiB).
const heldPipeSize = 16 << 20

// heldFiles are the pages files held back, in the order CRIU wrote them
// (the order the restore reads them: a parent's before its children's).
type heldFiles struct {
	mu    sync.Mutex
	files []*heldFile
}

// create starts holding file name; the capture copies CRIU's pipe into it.
func (h *heldFiles) create(name string) *heldFile {
	f := &heldFile{name: name}
	h.mu.Lock()
	h.files = append(h.files, f)
	h.mu.Unlock()
	return f
}

// names lists the held files and their sizes, in order.
func (h *heldFiles) names() ([]string, []uint64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	var names []string
	var sizes []uint64
	for _, f := range h.files {
		f.mu.Lock()
		names, sizes = append(names, f.name), append(sizes, uint64(f.n))
		f.mu.Unlock()
	}
	return names, sizes
}

// send writes every held file into iw, in order, after a REMAINING record
// naming them, and lets go of their pages.
func (h *heldFiles) send(iw *image.Writer) error {
	// Their sizes go with their names: the destination then hands all but
	// each file's last pipeful to CRIU by reference (image.Archive).
	if err := iw.Remaining(h.names()); err != nil {
		return err
	}
	h.mu.Lock()
	files := append([]*heldFile(nil), h.files...)
	h.mu.Unlock()
	for _, f := range files {
		fw, err := iw.Create(f.name)
		if err != nil {
			return err
		}
		n, err := fw.ReadFrom(f.reader())
		f.close()
		if err == nil && n != f.n {
			err = fmt.Errorf("%s: %d bytes held, %d read back", f.name, f.n, n)
		}
		if err != nil {
			return fmt.Errorf("sending %s: %w", f.name, err)
		}
		if err := fw.Close(); err != nil {
			return err
		}
	}
	return nil
}

// close lets go of every held page.
func (h *heldFiles) close() {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, f := range h.files {
		f.close()
	}
}

// heldFile is one pages file in a chain of pipes, each filled in turn.
type heldFile struct {
	name string
	mu   sync.Mutex
	r, w []*os.File // read and write ends; write ends close once full
	n    int64
}

// Write is for a writer that does not come through ReadFrom: it is an
// error, since held pages must come from a pipe.
func (f *heldFile) Write([]byte) (int, error) {
	return 0, errors.New("held pages come from a pipe, spliced")
}

// Close ends the file: the last pipe's write end closes, so reading the
// pipes back meets the end.
func (f *heldFile) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, w := range f.w {
		_ = w.Close()
	}
	f.w = nil
	return nil
}

// ReadFrom splices everything r (CRIU's pipe) holds into our pipes.
func (f *heldFile) ReadFrom(r io.Reader) (int64, error) {
	src, ok := r.(interface{ Fd() uintptr })
	if !ok {
		return 0, fmt.Errorf("held pages of %s must come from a pipe, not %T", f.name, r)
	}
	in := int(src.Fd())
	var n int64
	for {
		w, err := f.tail()
		if err != nil {
			return n, err
		}
		k, err := unix.Splice(in, nil, int(w.Fd()), nil, 1<<30, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			// Either CRIU's pipe is empty (wait for it) or ours is full
			// (start another).
			fds := []unix.PollFd{{Fd: int32(in), Events: unix.POLLIN}, {Fd: int32(w.Fd()), Events: unix.POLLOUT}}
			if _, err := unix.Poll(fds, 0); err != nil && err != unix.EINTR {
				return n, err
			}
			if fds[1].Revents&unix.POLLOUT == 0 {
				f.full()
				continue
			}
			if fds[0].Revents == 0 {
				if _, err := unix.Poll(fds[:1], -1); err != nil && err != unix.EINTR {
					return n, err
				}
			}
			continue
		case err != nil:
			return n, fmt.Errorf("holding %s: splice: %w", f.name, err)
		case k == 0:
			f.mu.Lock()
			f.n = n
			f.mu.Unlock()
			return n, nil // CRIU closed its pipe
		}
		n += k
	}
}

// tail is the pipe being filled, made if there is none.
func (f *heldFile) tail() (*os.File, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.w) > 0 {
		return f.w[len(f.w)-1], nil
	}
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		return nil, fmt.Errorf("holding %s: %w", f.name, err)
	}
	if _, err := unix.FcntlInt(uintptr(p[1]), unix.F_SETPIPE_SZ, heldPipeSize); err != nil {
		// Not root, or short of kernel memory: a pipe as large as anyone
		// may have will do, at the cost of more descriptors.
		if max, err := criu.PipeMaxSize(); err == nil && max > 0 {
			_, _ = unix.FcntlInt(uintptr(p[1]), unix.F_SETPIPE_SZ, max)
		}
	}
	r, w := os.NewFile(uintptr(p[0]), f.name+" (held)"), os.NewFile(uintptr(p[1]), f.name+" (held)")
	f.r, f.w = append(f.r, r), append(f.w, w)
	return w, nil
}

// full closes the write end of the pipe being filled: the next splice
// starts another.
func (f *heldFile) full() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.w) > 0 {
		_ = f.w[len(f.w)-1].Close()
		f.w = f.w[:len(f.w)-1]
	}
}

// reader reads the held pages back, pipe after pipe.
func (f *heldFile) reader() io.Reader {
	f.mu.Lock()
	defer f.mu.Unlock()
	rs := make([]io.Reader, len(f.r))
	for i, r := range f.r {
		rs[i] = r
	}
	return io.MultiReader(rs...)
}

// close lets go of the pipes, and so of the pages.
func (f *heldFile) close() {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, p := range append(f.r, f.w...) {
		_ = p.Close()
	}
	f.r, f.w = nil, nil
}
