package criu

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	imgstreamer "github.com/checkpoint-restore/go-criu/v7/crit/images/img-streamer"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"
)

// CRIU's image streaming (criu dump --stream), the capture side: CRIU
// connects to <images dir>/streamer-capture.sock and, for every image file,
// sends its name (u32 LE length + img_streamer_request_entry) and then,
// with one dummy byte, the read end of a pipe (SCM_RIGHTS) into which it
// writes the file. Several pipes are open at once (CRIU interleaves pages
// and pagemaps), so each is drained by a goroutine of its own; CRIU
// deadlocks otherwise. Only available from the CLI, not over RPC.

// CaptureSocket is the socket name CRIU connects to when dumping.
const CaptureSocket = "streamer-capture.sock"

// maxStreamName bounds a request message (a file name).
const maxStreamName = 64 << 10

// Capture is a listening capture socket.
type Capture struct {
	ln *net.UnixListener

	mu      sync.Mutex
	conn    *net.UnixConn // CRIU's connection, once accepted
	settled bool          // Settle cut the connection: its end is not an error
	done    chan struct{} // closed when Serve returns
	sizes   map[string]int64
	err     error
}

// ListenCapture listens on dir's capture socket; start CRIU after it.
func ListenCapture(dir string) (*Capture, error) {
	ln, err := listenIn(dir, CaptureSocket, "criu's image stream")
	if err != nil {
		return nil, err
	}
	return &Capture{ln: ln, done: make(chan struct{})}, nil
}

// listenIn listens on socket name in dir, for CRIU to connect to; the
// socket file goes when the listener is closed.
func listenIn(dir, name, what string) (*net.UnixListener, error) {
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: filepath.Join(dir, name), Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listening for %s: %w", what, err)
	}
	ln.SetUnlinkOnClose(true)
	return ln, nil
}

// Close stops listening.
func (c *Capture) Close() error { return c.ln.Close() }

// Serve accepts CRIU's connection and copies every file CRIU streams into
// the writer create returns for it, until CRIU closes the connection and
// every pipe is drained. It returns each file's size.
func (c *Capture) Serve(ctx context.Context, create func(name string) (io.WriteCloser, error)) (sizes map[string]int64, err error) {
	defer func() {
		c.mu.Lock()
		c.sizes, c.err = sizes, err
		c.mu.Unlock()
		close(c.done)
	}()
	return c.serve(ctx, create)
}

func (c *Capture) serve(ctx context.Context, create func(name string) (io.WriteCloser, error)) (map[string]int64, error) {
	stop := context.AfterFunc(ctx, func() { _ = c.ln.Close() })
	defer stop()
	conn, err := c.ln.AcceptUnix()
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, fmt.Errorf("waiting for criu to connect: %w", err)
	}
	defer conn.Close()
	c.mu.Lock()
	c.conn = conn
	c.mu.Unlock()
	stopConn := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(unixEpoch) })
	defer stopConn()

	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		sizes = map[string]int64{}
		errs  []error
	)
	fail := func(err error) {
		mu.Lock()
		errs = append(errs, err)
		mu.Unlock()
	}
	rd := &fdReader{conn: conn}
	for {
		name, pipe, err := rd.next()
		if errors.Is(err, io.EOF) || err != nil && c.wasSettled() {
			break
		}
		if err != nil {
			fail(err)
			break
		}
		w, err := create(name)
		if err != nil {
			pipe.Close()
			fail(err)
			break
		}
		// CRIU splices pages into the pipe: at the default 64 KiB that
		// is a round trip between CRIU and us every 16 pages.
		growPipe(pipe, capturePipeSize)
		wg.Go(func() {
			defer pipe.Close()
			n, err := io.Copy(w, pipe)
			if cerr := w.Close(); err == nil {
				err = cerr
			}
			mu.Lock()
			sizes[name] = n
			mu.Unlock()
			if err != nil {
				fail(fmt.Errorf("streaming %s: %w", name, err))
			}
		})
	}
	rd.closeAll()
	wg.Wait()
	return sizes, errors.Join(errs...)
}

func (c *Capture) wasSettled() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.settled
}

// Settle ends the capture while CRIU still holds its connection: called
// once CRIU can open no more images (its post-dump action), it waits for
// every request CRIU sent to be read, stops reading, and returns what
// Serve returns once every pipe is drained.
//
// CRIU sends each request before it writes the image, and runs post-dump
// only after closing them all, so once the socket's receive queue is empty
// every request is in the reader's hands; the reader handles what it
// buffered before it reads again, and that read is the one cut short.
func (c *Capture) Settle(ctx context.Context) (map[string]int64, error) {
	c.mu.Lock()
	conn := c.conn
	c.mu.Unlock()
	if conn == nil {
		return nil, errors.New("criu never connected its image stream")
	}
	raw, err := conn.SyscallConn()
	if err != nil {
		return nil, err
	}
	for {
		queued := 0
		var qerr error
		if err := raw.Control(func(fd uintptr) { queued, qerr = unix.IoctlGetInt(int(fd), unix.SIOCINQ) }); err != nil {
			return nil, err
		}
		if qerr != nil {
			return nil, fmt.Errorf("reading criu's image stream queue: %w", qerr)
		}
		if queued == 0 {
			break
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-c.done:
			c.mu.Lock()
			defer c.mu.Unlock()
			return c.sizes, c.err
		case <-time.After(time.Millisecond):
		}
	}
	c.mu.Lock()
	c.settled = true
	c.mu.Unlock()
	_ = conn.SetReadDeadline(unixEpoch)
	select {
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-c.done:
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.sizes, c.err
}

// unixEpoch is a deadline long past: setting it aborts blocked I/O.
var unixEpoch = time.Unix(1, 0)

// fdReader reads CRIU's requests: length-prefixed protobuf messages and
// the pipe fd sent with a dummy byte right after each.
type fdReader struct {
	conn *net.UnixConn
	buf  []byte
	fds  []int
}

func (r *fdReader) fill() error {
	b := make([]byte, 64<<10)
	oob := make([]byte, unix.CmsgSpace(4*8))
	n, oobn, _, _, err := r.conn.ReadMsgUnix(b, oob)
	if oobn > 0 {
		msgs, perr := unix.ParseSocketControlMessage(oob[:oobn])
		if perr == nil {
			for _, m := range msgs {
				if fds, err := unix.ParseUnixRights(&m); err == nil {
					r.fds = append(r.fds, fds...)
				}
			}
		}
	}
	if n > 0 { // a failed read may report -1
		r.buf = append(r.buf, b[:n]...)
	}
	if n == 0 && err == nil {
		return io.EOF
	}
	return err
}

// next returns the next file name and its pipe; io.EOF when CRIU is done.
func (r *fdReader) next() (string, *os.File, error) {
	name, err := r.request()
	if err != nil {
		return "", nil, err
	}
	pipe, err := r.pipe(name)
	return name, pipe, err
}

// request reads the next file name CRIU asks for; io.EOF when CRIU is done.
func (r *fdReader) request() (string, error) {
	for len(r.buf) < 4 {
		if err := r.fill(); err != nil {
			if errors.Is(err, io.EOF) && len(r.buf) == 0 {
				return "", io.EOF
			}
			return "", fmt.Errorf("reading criu's stream request: %w", err)
		}
	}
	n := binary.LittleEndian.Uint32(r.buf)
	if n > maxStreamName {
		return "", fmt.Errorf("criu stream request of %d bytes", n)
	}
	for uint32(len(r.buf)) < 4+n {
		if err := r.fill(); err != nil {
			return "", fmt.Errorf("reading criu's stream request: %w", err)
		}
	}
	var req imgstreamer.ImgStreamerRequestEntry
	if err := proto.Unmarshal(r.buf[4:4+n], &req); err != nil {
		return "", fmt.Errorf("decoding criu's stream request: %w", err)
	}
	r.buf = r.buf[4+n:]
	return req.GetFilename(), nil
}

// pipe receives the pipe end CRIU sends (with one dummy byte) for name.
func (r *fdReader) pipe(name string) (*os.File, error) {
	for len(r.buf) < 1 || len(r.fds) == 0 {
		if err := r.fill(); err != nil {
			return nil, fmt.Errorf("receiving criu's pipe for %s: %w", name, err)
		}
	}
	r.buf = r.buf[1:]
	fd := r.fds[0]
	r.fds = r.fds[1:]
	unix.CloseOnExec(fd)
	return os.NewFile(uintptr(fd), name), nil
}

func (r *fdReader) closeAll() {
	for _, fd := range r.fds {
		unix.Close(fd)
	}
	r.fds = nil
}

// RunCLI runs the criu command line (for what RPC cannot do, --stream),
// behind wrapper if any, with env added to ferry's environment; a failure
// carries CRIU's stderr.
func RunCLI(ctx context.Context, path string, wrapper, args, env []string) error {
	argv := append(append(append([]string{}, wrapper...), path), args...)
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	if len(env) > 0 {
		cmd.Env = append(os.Environ(), env...)
	}
	cmd.WaitDelay = 5 * time.Second
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		msg := cleanOutput(stderr.String())
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if msg != "" {
			return fmt.Errorf("criu %s: %w: %s", args[0], err, firstLine(msg))
		}
		return fmt.Errorf("criu %s: %w", args[0], err)
	}
	return nil
}
