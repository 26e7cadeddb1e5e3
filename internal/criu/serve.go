package criu

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"syscall"

	imgstreamer "github.com/checkpoint-restore/go-criu/v7/crit/images/img-streamer"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"
)

// CRIU's image streaming on restore (criu restore --stream), the serve
// side: CRIU connects to <images dir>/streamer-serve.sock and, one image
// file at a time, sends its name; the server answers whether the file
// exists (u32 LE length + img_streamer_reply_entry) and, if it does, CRIU
// sends the write end of a pipe (SCM_RIGHTS, one dummy byte) from which it
// then reads the file. A server that cannot deliver a file closes the pipe
// early; CRIU sees a short image and fails the restore.

// ServeSocket is the socket name CRIU connects to when restoring.
const ServeSocket = "streamer-serve.sock"

// Server is a listening serve socket.
type Server struct {
	ln   *net.UnixListener
	mu   sync.Mutex
	conn *net.UnixConn
}

// ListenServe listens on dir's serve socket; start CRIU after it.
func ListenServe(dir string) (*Server, error) {
	ln, err := listenIn(dir, ServeSocket, "criu's image requests")
	if err != nil {
		return nil, err
	}
	return &Server{ln: ln}, nil
}

// Close stops serving: no new connection, and CRIU's connection is cut.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.conn != nil {
		_ = s.conn.Close()
	}
	s.mu.Unlock()
	return s.ln.Close()
}

// Serve answers CRIU's requests until CRIU is done or Close is called:
// open says whether a file exists and, if so, how to write it. Files are
// written concurrently (CRIU may hold several open). It returns the first
// error of a file that existed but could not be delivered whole, except a
// reader that stopped early (CRIU need not read a file to its end).
func (s *Server) Serve(ctx context.Context, open func(name string) (write func(io.Writer) error, ok bool)) error {
	stop := context.AfterFunc(ctx, func() { _ = s.Close() })
	defer stop()
	defer raiseForStream()()
	conn, err := s.ln.AcceptUnix()
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if errors.Is(err, net.ErrClosed) {
			return nil // closed before CRIU came: nothing was served
		}
		return fmt.Errorf("waiting for criu to connect: %w", err)
	}
	s.mu.Lock()
	s.conn = conn
	s.mu.Unlock()
	defer conn.Close()

	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []error
	)
	fail := func(err error) {
		mu.Lock()
		errs = append(errs, err)
		mu.Unlock()
	}
	rd := &fdReader{conn: conn}
	for {
		name, err := rd.request()
		if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
			break
		}
		if err != nil {
			fail(err)
			break
		}
		write, ok := open(name)
		if err := reply(conn, ok); err != nil {
			fail(fmt.Errorf("answering criu's request for %s: %w", name, err))
			break
		}
		if !ok {
			continue
		}
		pipe, err := rd.pipe(name)
		if err != nil {
			fail(err)
			break
		}
		growPipe(pipe, StreamPipeSize)
		wg.Go(func() {
			defer pipe.Close()
			if err := write(pipe); err != nil && !errors.Is(err, syscall.EPIPE) {
				fail(fmt.Errorf("serving %s: %w", name, err))
			}
		})
	}
	rd.closeAll()
	wg.Wait()
	return errors.Join(errs...)
}

// reply tells CRIU whether the file it asked for exists.
func reply(conn *net.UnixConn, exists bool) error {
	b, err := proto.Marshal(&imgstreamer.ImgStreamerReplyEntry{Exists: proto.Bool(exists)})
	if err != nil {
		return err
	}
	msg := binary.LittleEndian.AppendUint32(nil, uint32(len(b)))
	_, err = conn.Write(append(msg, b...))
	return err
}

// StreamPipeSize is the size of CRIU's image pipes while a stream is
// served to a restore. CRIU reads images in pieces of what the pipe
// holds: at the default 64 KiB that is a context switch per 64 KiB, and
// through 1 MiB pipes (the usual fs.pipe-max-size) CRIU's restore of a
// .ferry file of the bench's 1 GiB job took about 6% longer than through
// 16 MiB ones (medians of 8, the two alternating in one run).
const StreamPipeSize = 16 << 20

// raiseForStream lifts fs.pipe-max-size to StreamPipeSize while a stream
// is served to a restore, shared with lazy dumps and other restores
// (RaisePipeMax): a pipe keeps its size once grown, so the raise lasts
// only as long as CRIU may still ask for a file. Where the limit cannot
// be raised (no root, a read-only /proc/sys), pipes get what it allows.
func raiseForStream() (release func()) {
	release, err := RaisePipeMax(StreamPipeSize)
	if err != nil {
		return func() {}
	}
	return release
}

// capturePipeSize is the size of the pipes CRIU dumps a stream into:
// CRIU splices the memory in by reference and ferry reads and compresses
// it out, so a larger pipe saves little, and 1 MiB in flight stays in
// the caches (16 MiB ones showed no gain in dumps or migrations, within
// this machine's noise).
const capturePipeSize = 1 << 20

// growPipe enlarges CRIU's pipe to size, or to the most fs.pipe-max-size
// lets a process without CAP_SYS_RESOURCE ask for.
func growPipe(pipe *os.File, size int) {
	if n, err := PipeMaxSize(); err == nil && n > 0 {
		size = min(n, size)
	} else {
		size = min(size, 1<<20)
	}
	if rc, err := pipe.SyscallConn(); err == nil {
		_ = rc.Control(func(fd uintptr) {
			_, _ = unix.FcntlInt(fd, unix.F_SETPIPE_SZ, size)
		})
	}
}
