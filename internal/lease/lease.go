// Package lease makes stopping a job a lease that a live process holds.
//
// Whoever stops a job (a checkpoint, a migration, a periodic snapshot)
// takes a lease from the job's guard, a process that outlives every ferry
// command: the job's shim, or for a tree ferry did not start a small
// guardian. The holder keeps the lease by keeping its socket open and
// renewing it. The guard records the job's state when the lease is taken
// (running, or frozen by its user) and, if the holder's socket closes
// before it commits (it was killed, died of SIGPIPE, crashed) or the
// holder stops renewing (it is stopped itself, or hung), puts the job
// back exactly as it was. This is the lease pattern of etcd and of
// systemd's watchdog: the survivor undoes what the holder had not
// committed.
//
// A holder commits one verdict, at its point of no return:
//
//	end   the checkpoint is whole where it was sent: the job is to end.
//	      The holder ends it; if it vanishes first, the guard does.
//	keep  leave the job as it is now and for good (a migration in doubt,
//	      frozen; a user's freeze or thaw). The verdict's note says why,
//	      and the guard records it.
//
// A commit that comes after the lease ran out is refused (ErrExpired):
// the guard has already given the job back, so the holder must not end
// it. A guard serves one lease at a time: a second taker hears at once
// that the job is busy (ErrBusy), which is how ferry runs one operation
// per job at a time.
//
// The wire is one JSON object per line over a unix stream socket. The
// holder sends take, then pings, then commit or release; the guard
// answers take, commit and release, and says "expired" before it closes
// a lease that ran out.
package lease

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Verdicts a holder commits.
const (
	End  = "end"
	Keep = "keep"
)

// DefaultTTL is how long a lease lives without a renewal. The holder
// renews it every TTL/4, so only a holder that is stopped or hung for
// this long loses its lease. FERRY_LEASE_TTL (a Go duration) overrides
// it for the holder that takes the lease.
const DefaultTTL = 15 * time.Second

var (
	// ErrBusy is a lease refused because another holder has the job.
	ErrBusy = errors.New("another ferry operation holds the job")
	// ErrExpired is a commit refused because the lease ran out (or the
	// guard went away) first: the job was given back as it was.
	ErrExpired = errors.New("the job's lease ran out before the operation committed; the job was given back as it was")
	// ErrNoGuard is a job with no guard to take a lease from.
	ErrNoGuard = errors.New("the job has no guard (its shim is gone)")
)

// message is every line on the wire; each side sets the fields it means.
type message struct {
	Take    *take  `json:"take,omitempty"`
	Ping    bool   `json:"ping,omitempty"`
	Commit  string `json:"commit,omitempty"`
	Reason  string `json:"reason,omitempty"` // end: the exit reason; keep: the note
	Release bool   `json:"release,omitempty"`

	OK      bool      `json:"ok,omitempty"`
	Frozen  bool      `json:"frozen,omitempty"` // the job's state when the lease was taken
	Busy    *take     `json:"busy,omitempty"`   // who holds the job
	Expired bool      `json:"expired,omitempty"`
	Error   string    `json:"error,omitempty"`
	Since   time.Time `json:"since,omitempty"`
}

type take struct {
	Op    string        `json:"op"`  // what the holder does: checkpoint, migrate, snapshot, freeze
	PID   int           `json:"pid"` // the holder
	TTL   time.Duration `json:"ttlNs"`
	Since time.Time     `json:"since,omitzero"`
}

// BusyError says who holds a job.
type BusyError struct {
	Op    string
	PID   int
	Since time.Time
}

func (e *BusyError) Error() string {
	return fmt.Sprintf("%s: %s by pid %d since %s", ErrBusy, e.Op, e.PID, e.Since.Format(time.TimeOnly))
}

func (e *BusyError) Unwrap() error { return ErrBusy }

// SocketName is the guard's socket in a job's directory.
const SocketName = "lease.sock"

// Lease is a held lease. Its methods are safe for concurrent use.
type Lease struct {
	c      *net.UnixConn
	r      *bufio.Reader
	mu     sync.Mutex // one writer at a time (renewals and commit)
	wasFro bool
	stop   chan struct{}
	done   chan struct{}
	once   sync.Once
}

// Take takes the lease of the job whose guard listens at sock, for
// operation op. A job with no guard listening gives ErrNoGuard, one held
// by another gives a *BusyError.
func Take(ctx context.Context, sock, op string) (*Lease, error) {
	c, err := dial(ctx, sock)
	if err != nil {
		return nil, err
	}
	return TakeOver(c, op)
}

// TakeOver takes a lease over c, a connection to a guard (a guardian
// started for this one lease holds the other end).
func TakeOver(c *net.UnixConn, op string) (*Lease, error) {
	ttl := DefaultTTL
	if v, err := time.ParseDuration(os.Getenv("FERRY_LEASE_TTL")); err == nil && v > 0 {
		ttl = v
	}
	l := &Lease{c: c, r: bufio.NewReader(c), stop: make(chan struct{}), done: make(chan struct{})}
	reply, err := l.call(message{Take: &take{Op: op, PID: os.Getpid(), TTL: ttl}}, 10*time.Second)
	if err != nil {
		c.Close()
		return nil, err
	}
	if b := reply.Busy; b != nil {
		c.Close()
		return nil, &BusyError{Op: b.Op, PID: b.PID, Since: b.Since}
	}
	if !reply.OK {
		c.Close()
		return nil, fmt.Errorf("taking the job's lease: %s", reply.Error)
	}
	l.wasFro = reply.Frozen
	go l.renew(ttl / 4)
	return l, nil
}

// Lost says, without waiting, whether the guard has ended the lease
// already: it ran out (the guard says "expired" and closes), or the
// guard went away. Either way the job was given back as it was, and
// nothing the holder does to it from now on is covered by the lease. The
// guard's word is left unread, for Commit or Release to find.
func (l *Lease) Lost() bool {
	if l.r.Buffered() > 0 {
		return true // the guard speaks unasked only to say the lease ran out
	}
	rc, err := l.c.SyscallConn()
	if err != nil {
		return false // no evidence either way
	}
	// Control, not Read: Read honours the read deadline the last call
	// left (10 s after the take), and past it fails without looking, which
	// read as lost in every checkpoint whose CRIU took longer (a seize that
	// timed out after 10 s then had no retry; seen in CI).
	lost := false
	var b [1]byte
	_ = rc.Control(func(fd uintptr) {
		for {
			n, _, err := unix.Recvfrom(int(fd), b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
			if err == unix.EINTR {
				continue
			}
			// A byte: the guard's "expired". Nothing and no error: the
			// guard closed. EAGAIN: nothing to read, the lease holds.
			lost = n > 0 || (n == 0 && err == nil) || (err != nil && err != unix.EAGAIN)
			return
		}
	})
	return lost
}

// WasFrozen says whether the job was frozen (by its user) when the lease
// was taken: that is the state a failed operation gives it back.
func (l *Lease) WasFrozen() bool { return l.wasFro }

func (l *Lease) renew(every time.Duration) {
	defer close(l.done)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-l.stop:
			return
		case <-t.C:
		}
		if l.send(message{Ping: true}) != nil {
			return // the guard is gone; commit will say so
		}
	}
}

// Commit commits verdict (End or Keep) with its reason. After a nil
// return the guard no longer gives the job back when the lease ends.
func (l *Lease) Commit(verdict, reason string) error {
	reply, err := l.call(message{Commit: verdict, Reason: reason}, 10*time.Second)
	if err != nil || reply.Expired {
		return ErrExpired
	}
	if !reply.OK {
		return fmt.Errorf("committing the job's lease: %s", reply.Error)
	}
	return nil
}

// Release ends the lease without a commit and waits until the guard has
// given the job back as it was (or had done so on its own). An error
// says the guard could not be reached: the caller gives the job back
// itself.
func (l *Lease) Release() error {
	defer l.Close()
	reply, err := l.call(message{Release: true}, 15*time.Second)
	if err != nil {
		return err
	}
	if !reply.OK && !reply.Expired {
		return fmt.Errorf("releasing the job's lease: %s", reply.Error)
	}
	return nil
}

// Close ends the lease as it stands: uncommitted, the guard gives the job
// back; committed, the guard holds to the verdict. It waits (a few
// seconds at most) until the guard is done with the lease, so that the
// next operation on the job does not find it busy.
func (l *Lease) Close() {
	l.once.Do(func() {
		close(l.stop)
		<-l.done
		l.mu.Lock()
		defer l.mu.Unlock()
		if l.c.CloseWrite() == nil {
			_ = l.c.SetReadDeadline(time.Now().Add(10 * time.Second))
			_, _ = io.Copy(io.Discard, l.r) // until the guard closes its side
		}
		l.c.Close()
	})
}

func (l *Lease) send(m message) error {
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	_ = l.c.SetWriteDeadline(time.Now().Add(10 * time.Second))
	_, err = l.c.Write(append(b, '\n'))
	return err
}

// call sends m and reads the guard's answer. Only take, commit and
// release are answered, and only one of them is in flight at a time.
func (l *Lease) call(m message, d time.Duration) (message, error) {
	if err := l.send(m); err != nil {
		return message{}, err
	}
	_ = l.c.SetReadDeadline(time.Now().Add(d))
	var reply message
	line, err := l.r.ReadBytes('\n')
	if err != nil {
		return reply, err
	}
	return reply, json.Unmarshal(line, &reply)
}

// dial connects to the guard's socket at path. A path too long for a
// socket address is reached through its directory's descriptor.
func dial(ctx context.Context, path string) (*net.UnixConn, error) {
	addr, done, err := shortPath(path)
	if err != nil {
		return nil, err
	}
	defer done()
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", addr)
	if err != nil {
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ECONNREFUSED) {
			return nil, ErrNoGuard
		}
		return nil, fmt.Errorf("reaching the job's guard: %w", err)
	}
	return c.(*net.UnixConn), nil
}

// maxSockPath is what fits in sockaddr_un's sun_path with its NUL.
const maxSockPath = 107

// shortPath gives an address for path that fits in a socket address: the
// path itself, or /proc/self/fd/N/NAME through an O_PATH descriptor of its
// directory, which done closes.
func shortPath(path string) (addr string, done func(), err error) {
	if len(path) <= maxSockPath {
		return path, func() {}, nil
	}
	fd, err := unix.Open(filepath.Dir(path), unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", nil, err
	}
	return "/proc/self/fd/" + strconv.Itoa(fd) + "/" + filepath.Base(path), func() { unix.Close(fd) }, nil
}
