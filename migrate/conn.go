package migrate

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/protobuf/encoding/protowire"
	gproto "google.golang.org/protobuf/proto"

	pb "github.com/ferry-cr/ferry/proto"
)

// ProtocolVersion is the version of the conversation below; a peer that
// speaks another is refused with a clear reason. Version 4 runs TLS 1.3
// with proofs of the token bound to the TLS session (see tls.go); 3 and
// older authenticated in clear.
const ProtocolVersion = 4

// Limits and deadlines of the conversation. Every step has a deadline,
// so a silent peer or a cut cable ends the migration instead of hanging it.
const (
	maxMessage     = 4 << 20 // a Data message carries at most dataChunk bytes
	dataChunk      = 1 << 20
	stepTimeout    = 30 * time.Second // handshake, answers, confirmations
	dataTimeout    = 60 * time.Second // the longest pause within the image stream
	restoreTimeout = 10 * time.Minute // the destination's restore of a received stream
	minTokenLen    = 16
)

// ErrAuth is a refused handshake: wrong or missing token.
var ErrAuth = errors.New("migration peer refused: authentication failed")

// ErrRefused is a destination that refused the job.
var ErrRefused = errors.New("destination refused the job")

// conn frames Envelopes over a byte stream: a tls.Conn.
type conn struct {
	c net.Conn
	r *bufio.Reader
	// limit is the largest message recv takes: a few KiB until the peer
	// has proved the token, then maxMessage.
	limit uint32
	rx    atomic.Int64 // bytes received (a heartbeat reads it: heartbeat.go)
	tx    int64        // bytes sent
	mu    sync.Mutex
	wbuf  []byte // reused by send: a migration sends gigabytes a MiB at a time
	rbuf  []byte // reused by recv (Unmarshal copies what it keeps)
	// cut is set by an interruption (see cutOff): the data and the waits
	// stop, while a last control message (Abort) can still go.
	cut atomic.Bool
}

// errCut is a sendData or recv after cutOff.
var errCut = errors.New("the migration's connection was cut off (interrupted)")

// cutOff makes the sendData or recv in progress fail at once, and every
// later one too. Each call sets its own deadline, so a deadline in the
// past alone would be undone by the next call (a stalled link then held
// an interrupted migration for a whole data deadline); each call checks
// the flag after setting its deadline, and cutOff sets the flag before
// its own.
func (c *conn) cutOff() {
	c.cut.Store(true)
	_ = c.c.SetDeadline(time.Unix(1, 0))
}

// readWithin bounds the recv in progress (and only it: each recv sets
// its own deadline) to d from now: a reader that waited with a long
// deadline for work that has since ended must not keep waiting for it.
func (c *conn) readWithin(d time.Duration) {
	_ = c.c.SetReadDeadline(time.Now().Add(d))
	if c.cut.Load() { // cut meanwhile: the past deadline holds
		_ = c.c.SetReadDeadline(time.Unix(1, 0))
	}
}

// keep undoes cutOff: a post-copy source must still hear from a
// destination that may run its copy.
func (c *conn) keep() { c.cut.Store(false) }

// readBuffer is the read buffer of an authenticated connection.
const readBuffer = 256 << 10

func newConn(c net.Conn) *conn {
	return &conn{c: c, r: bufio.NewReaderSize(c, readBuffer), limit: maxMessage}
}

// newHandshakeConn is a conn for a peer that has not proved the token
// yet: a small buffer, small messages (see authenticated).
func newHandshakeConn(c net.Conn) *conn {
	return &conn{c: c, r: bufio.NewReaderSize(c, handshakeBuffer), limit: handshakeMessage}
}

// authenticated lifts the limits of a handshake conn: the peer proved
// the token.
func (c *conn) authenticated() {
	c.limit = maxMessage
	if c.r.Buffered() == 0 {
		c.r = bufio.NewReaderSize(c.c, readBuffer)
	} else {
		c.r = bufio.NewReaderSize(c.r, readBuffer)
	}
}

func (c *conn) send(m *pb.Envelope, d time.Duration) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	b, err := gproto.MarshalOptions{}.MarshalAppend(append(c.wbuf[:0], 0, 0, 0, 0), m)
	if err != nil {
		return err
	}
	if cap(b) <= maxMessage+4 {
		c.wbuf = b
	}
	binary.LittleEndian.PutUint32(b, uint32(len(b)-4))
	_ = c.c.SetWriteDeadline(time.Now().Add(d))
	n, err := c.c.Write(b)
	c.tx += int64(n)
	return err
}

// Data messages carry the image stream, gigabytes of it, so they skip
// protobuf's copies: sendData writes the envelope's few header bytes and
// the payload in one writev, and recv hands out a Data message's bytes
// straight from its buffer. The bytes on the wire are exactly what
// proto.Marshal of the same Envelope makes.
const (
	tagEnvelopeData = 5<<3 | 2 // Envelope.data, length-delimited
	tagDataBytes    = 1<<3 | 2 // Data.bytes, length-delimited
)

// sendData sends p as one Data message.
func (c *conn) sendData(p []byte, d time.Duration) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	inner := 1 + protowire.SizeVarint(uint64(len(p))) + len(p)
	size := 1 + protowire.SizeVarint(uint64(inner)) + inner
	h := binary.LittleEndian.AppendUint32(c.wbuf[:0], uint32(size))
	h = append(h, tagEnvelopeData)
	h = protowire.AppendVarint(h, uint64(inner))
	h = append(h, tagDataBytes)
	h = protowire.AppendVarint(h, uint64(len(p)))
	c.wbuf = h
	_ = c.c.SetWriteDeadline(time.Now().Add(d))
	if c.cut.Load() {
		return errCut
	}
	bufs := net.Buffers{h, p}
	n, err := bufs.WriteTo(c.c)
	c.tx += n
	return err
}

// dataBytes returns the payload of b when b is a Data envelope as
// sendData (or proto.Marshal) writes it.
func dataBytes(b []byte) ([]byte, bool) {
	if len(b) == 0 || b[0] != tagEnvelopeData {
		return nil, false
	}
	inner, n := protowire.ConsumeVarint(b[1:])
	if n < 0 || uint64(len(b)-1-n) != inner {
		return nil, false
	}
	b = b[1+n:]
	if len(b) == 0 || b[0] != tagDataBytes {
		return nil, false
	}
	l, n := protowire.ConsumeVarint(b[1:])
	if n < 0 || uint64(len(b)-1-n) != l {
		return nil, false
	}
	return b[1+n:], true
}

// recv reads one Envelope. A Data message's bytes alias the connection's
// buffer: they are valid until the next recv.
func (c *conn) recv(d time.Duration) (*pb.Envelope, error) {
	_ = c.c.SetReadDeadline(time.Now().Add(d))
	if c.cut.Load() {
		return nil, errCut
	}
	var hdr [4]byte
	if _, err := io.ReadFull(c.r, hdr[:]); err != nil {
		return nil, err
	}
	n := binary.LittleEndian.Uint32(hdr[:])
	if n > c.limit {
		return nil, fmt.Errorf("peer sent a message of %d bytes (limit %d)", n, c.limit)
	}
	if cap(c.rbuf) < int(n) {
		c.rbuf = make([]byte, n)
	}
	b := c.rbuf[:n]
	if _, err := io.ReadFull(c.r, b); err != nil {
		return nil, err
	}
	c.rx.Add(int64(4 + n))
	if data, ok := dataBytes(b); ok {
		return &pb.Envelope{Msg: &pb.Envelope_Data{Data: &pb.Data{Bytes: data}}}, nil
	}
	m := &pb.Envelope{}
	if err := gproto.Unmarshal(b, m); err != nil {
		return nil, fmt.Errorf("bad message from peer: %w", err)
	}
	if a := m.GetAbort(); a != nil {
		return nil, &abortError{reason: a.GetReason()}
	}
	return m, nil
}

// abortError is the peer's Abort.
type abortError struct{ reason string }

func (e *abortError) Error() string { return "peer aborted: " + e.reason }

func (c *conn) abort(reason string) {
	_ = c.send(&pb.Envelope{Msg: &pb.Envelope_Abort{Abort: &pb.Abort{Reason: reason}}}, 5*time.Second)
}

// peerAbort looks, for up to d, for an Abort the peer sent before it
// closed the connection: a destination whose restore fails while the
// stream is still arriving says why and hangs up on the rest, and its
// reason is the one to report, not the broken pipe.
func (c *conn) peerAbort(d time.Duration) *abortError {
	deadline := time.Now().Add(d)
	for range 64 {
		left := time.Until(deadline)
		if left <= 0 {
			return nil
		}
		_, err := c.recv(left)
		var ab *abortError
		if errors.As(err, &ab) {
			return ab
		}
		if err != nil {
			return nil
		}
	}
	return nil
}

// dataWriter sends what is written to it as Data messages.
type dataWriter struct {
	c     *conn
	n     uint64
	ended bool // DataEnd was sent
}

// closed says whether the whole stream was sent.
func (w *dataWriter) closed() bool { return w.ended }

func (w *dataWriter) Write(p []byte) (int, error) {
	written := 0
	for len(p) > 0 {
		k := min(len(p), dataChunk)
		if err := w.c.sendData(p[:k], dataTimeout); err != nil {
			return written, fmt.Errorf("sending to the destination: %w", err)
		}
		written += k
		w.n += uint64(k)
		p = p[k:]
	}
	return written, nil
}

func (w *dataWriter) close() error {
	err := w.c.send(&pb.Envelope{Msg: &pb.Envelope_DataEnd{DataEnd: &pb.DataEnd{Bytes: w.n}}}, stepTimeout)
	w.ended = err == nil
	return err
}

// dataReader reads the image stream back out of Data messages; io.EOF at
// DataEnd, after checking the byte count.
type dataReader struct {
	c    *conn
	buf  []byte
	n    uint64
	done bool
}

func (r *dataReader) Read(p []byte) (int, error) {
	for len(r.buf) == 0 {
		if r.done {
			return 0, io.EOF
		}
		m, err := r.c.recv(dataTimeout)
		if err != nil {
			return 0, fmt.Errorf("receiving the checkpoint: %w", err)
		}
		switch {
		case m.GetData() != nil:
			r.buf = m.GetData().GetBytes()
			r.n += uint64(len(r.buf))
		case m.GetDataEnd() != nil:
			if m.GetDataEnd().GetBytes() != r.n {
				return 0, fmt.Errorf("source sent %d bytes but says %d", r.n, m.GetDataEnd().GetBytes())
			}
			r.done = true
		default:
			return 0, fmt.Errorf("unexpected message in the checkpoint stream: %T", m.GetMsg())
		}
	}
	n := copy(p, r.buf)
	r.buf = r.buf[n:]
	return n, nil
}

// ReadToken reads a shared secret from path: the file's content without
// surrounding white space, at least 16 bytes. A token file readable by
// others is refused: it is as good as root on every peer.
func ReadToken(path string) ([]byte, error) {
	if path == "" {
		return nil, errors.New("no --token-file given: migration needs a shared secret")
	}
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("token file: %w", err)
	}
	if st.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("token file %s is readable by others (mode %04o): chmod 600 it", path, st.Mode().Perm())
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("token file: %w", err)
	}
	tok := []byte(strings.TrimSpace(string(b)))
	if len(tok) < minTokenLen {
		return nil, fmt.Errorf("token in %s is %d bytes; use at least %d (e.g. head -c 32 /dev/urandom | base64 > %s)", path, len(tok), minTokenLen, path)
	}
	return tok, nil
}
