package image

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Input is a stream being read from a file, a pipe or a FIFO, whose reads
// end when a context does. open(2) of a FIFO with no writer and read(2) of
// a pipe whose writer went silent block in the kernel, where neither
// Ctrl-C nor SIGTERM (which ferry catches to clean up) nor a timeout
// reaches them; an Input waits for its writer with poll(2), and reads a
// pipe through the runtime's poller, so a restore, verify or inspect fed
// by a writer that never comes, or stalls, ends when its context does.
type Input struct {
	f       *os.File
	ctx     context.Context
	regular bool
	stop    func() bool // ends the context's hook on f (pollable inputs)
	pump    *pump       // reads on a goroutine (inputs the poller cannot take)
	closeF  bool        // f is ours to close
}

// OpenInput opens path for reading a stream. A FIFO is opened without
// waiting for a writer (O_NONBLOCK), then waits for one in poll(2), bounded
// by ctx; its reads then go through the runtime's poller.
func OpenInput(ctx context.Context, path string) (*Input, error) {
	fi, err := os.Stat(path) // does not open: never blocks on a FIFO
	if err != nil {
		return nil, err
	}
	if fi.Mode()&os.ModeNamedPipe == 0 {
		f, err := os.Open(path)
		if err != nil {
			return nil, err
		}
		in, err := newInput(ctx, f)
		if err != nil {
			f.Close()
			return nil, err
		}
		in.closeF = true
		return in, nil
	}
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	if err := awaitWriter(ctx, fd); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("waiting for a writer: %w", err)
	}
	return pollable(ctx, os.NewFile(uintptr(fd), path))
}

// NewInput reads f (standard input, say) under ctx. A pipe or FIFO is
// reopened as a description of its own (through /proc/self/fd) that does
// not block, so that f's, which others may share, is left as it was; a
// regular file is read as it is; anything else is read on a goroutine
// that a cancelled read leaves behind (blocked until f yields or the
// process ends). f stays the caller's to close.
func NewInput(ctx context.Context, f *os.File) (*Input, error) { return newInput(ctx, f) }

func newInput(ctx context.Context, f *os.File) (*Input, error) {
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	switch {
	case fi.Mode().IsRegular():
		return &Input{f: f, ctx: ctx, regular: true}, nil
	case fi.Mode()&os.ModeNamedPipe != 0:
		fd, err := unix.Open(fmt.Sprintf("/proc/self/fd/%d", f.Fd()), unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
		if err == nil {
			in, err := pollable(ctx, os.NewFile(uintptr(fd), f.Name()))
			if err == nil {
				in.closeF = true
			}
			return in, err
		}
	}
	return &Input{f: f, ctx: ctx, pump: newPump(ctx, f)}, nil
}

// pollable reads f, a non-blocking pipe, through the runtime's poller: a
// deadline in the past, set when ctx ends, cuts a read short.
func pollable(ctx context.Context, f *os.File) (*Input, error) {
	in := &Input{f: f, ctx: ctx, closeF: true}
	if err := f.SetReadDeadline(time.Time{}); err != nil {
		// Not in the poller after all: read on a goroutine instead.
		in.pump = newPump(ctx, f)
		return in, nil
	}
	in.stop = context.AfterFunc(ctx, func() { _ = f.SetReadDeadline(time.Unix(1, 0)) })
	return in, nil
}

// awaitWriter waits until the FIFO open at fd (for reading, without
// blocking) has data or a writer that came and went: before that a read
// would return 0, the end of a stream that has not begun.
func awaitWriter(ctx context.Context, fd int) error {
	pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	for {
		if ctx.Err() != nil {
			return Stopped(ctx)
		}
		n, err := unix.Poll(pfd, 100)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		if n > 0 && pfd[0].Revents != 0 {
			return nil
		}
	}
}

// Read reads from the input; once ctx has ended it returns Stopped(ctx).
func (in *Input) Read(p []byte) (int, error) {
	if in.pump != nil {
		return in.pump.read(p)
	}
	n, err := in.f.Read(p)
	if err != nil && in.ctx.Err() != nil && errors.Is(err, os.ErrDeadlineExceeded) {
		err = Stopped(in.ctx)
	}
	return n, err
}

// File is the file read; with Regular, also an io.ReaderAt for
// OpenArchive and ReadIndex.
func (in *Input) File() *os.File { return in.f }

// Regular says whether the input is a regular file (it can be indexed
// without being read whole).
func (in *Input) Regular() bool { return in.regular }

// Close releases what the input opened.
func (in *Input) Close() error {
	if in.stop != nil {
		in.stop()
	}
	if in.closeF {
		return in.f.Close()
	}
	return nil
}

// Stopped is why ctx ended, as an error that is both ctx.Err() (so that
// context.Canceled and context.DeadlineExceeded are recognised) and its
// cause, which says more ("interrupt signal received", a timeout's own
// error).
func Stopped(ctx context.Context) error {
	err, cause := ctx.Err(), context.Cause(ctx)
	if errors.Is(cause, err) {
		return cause
	}
	return stoppedError{err, cause}
}

type stoppedError struct{ err, cause error }

func (e stoppedError) Error() string   { return e.cause.Error() }
func (e stoppedError) Unwrap() []error { return []error{e.err, e.cause} }

// pump reads f on a goroutine, for inputs the poller cannot take (a
// terminal, a socket): a read cancelled by ctx returns at once, leaving
// the goroutine blocked in f until f yields or the process ends.
type pump struct {
	ctx  context.Context
	ch   chan pumped
	buf  []byte
	err  error
	once sync.Once
	f    *os.File
}

type pumped struct {
	b   []byte
	err error
}

func newPump(ctx context.Context, f *os.File) *pump {
	return &pump{ctx: ctx, ch: make(chan pumped), f: f}
}

func (p *pump) read(b []byte) (int, error) {
	p.once.Do(func() { go p.run() })
	if len(p.buf) == 0 && p.err == nil {
		select {
		case r := <-p.ch:
			p.buf, p.err = r.b, r.err
		case <-p.ctx.Done():
			return 0, Stopped(p.ctx)
		}
	}
	if len(p.buf) > 0 {
		n := copy(b, p.buf)
		p.buf = p.buf[n:]
		return n, nil
	}
	return 0, p.err
}

func (p *pump) run() {
	for {
		buf := make([]byte, 256<<10)
		n, err := p.f.Read(buf)
		if n == 0 && err == nil {
			continue
		}
		select {
		case p.ch <- pumped{buf[:n], err}:
		case <-p.ctx.Done():
			return
		}
		if err != nil {
			return
		}
	}
}

var _ io.Reader = (*Input)(nil)
