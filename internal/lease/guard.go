package lease

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Job is what a guard needs of the job it guards.
type Job interface {
	// Frozen says whether the job stands frozen now, and notes how it
	// stands for GiveBack (a lease is being taken).
	Frozen() (bool, error)
	// IsFrozen says whether the job stands frozen now, and nothing else.
	IsFrozen() (bool, error)
	// GiveBack puts the job back as it was when the lease was taken:
	// thawed, unless it was frozen then.
	GiveBack(ctx context.Context, wasFrozen bool) error
	// End ends a job whose holder committed End and vanished before it
	// ended the job itself; reason is the exit reason it gave. A job
	// already ended is left alone.
	End(ctx context.Context, reason string) error
	// Note records the operation under way for `ferry list`: op while a
	// lease is held ("" once none is), and a Keep verdict's note.
	Note(op string, kept string)
}

// Guard serves the leases of one job, one at a time.
type Guard struct {
	job Job
	log *slog.Logger

	mu   sync.Mutex
	held *take // nil when the job is free
}

// NewGuard returns a guard for job.
func NewGuard(job Job, log *slog.Logger) *Guard {
	if log == nil {
		log = slog.Default()
	}
	return &Guard{job: job, log: log}
}

// Listen creates the guard's socket at path (removing a stale one) and
// serves it until ctx ends. Only root and the guard's own user may take
// a lease.
func (g *Guard) Listen(ctx context.Context, path string) error {
	_ = os.Remove(path)
	addr, done, err := shortPath(path)
	if err != nil {
		return err
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: addr, Net: "unix"})
	done()
	if err != nil {
		return err
	}
	ln.SetUnlinkOnClose(false)
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return err
	}
	go func() {
		<-ctx.Done()
		ln.Close()
	}()
	go g.serve(ctx, ln)
	return nil
}

func (g *Guard) serve(ctx context.Context, ln *net.UnixListener) {
	for {
		c, err := ln.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			// EMFILE and the like: back off, never give up guarding.
			time.Sleep(50 * time.Millisecond)
			continue
		}
		go g.Handle(ctx, c)
	}
}

// Handle serves one holder's connection to its end.
func (g *Guard) Handle(ctx context.Context, c *net.UnixConn) {
	defer c.Close()
	if !trusted(c) {
		return
	}
	r := bufio.NewReaderSize(c, 4096)
	reply := func(m message) {
		b, _ := json.Marshal(m)
		_ = c.SetWriteDeadline(time.Now().Add(5 * time.Second))
		_, _ = c.Write(append(b, '\n'))
	}
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	first, err := readMsg(r)
	if err != nil || first.Take == nil {
		return
	}
	t := *first.Take
	t.Since = time.Now()
	ttl := t.TTL
	if ttl <= 0 || ttl > time.Hour {
		ttl = DefaultTTL
	}

	g.mu.Lock()
	if g.held != nil {
		busy := *g.held
		g.mu.Unlock()
		reply(message{Busy: &busy})
		return
	}
	wasFrozen, err := g.job.Frozen()
	if err != nil {
		g.mu.Unlock()
		reply(message{Error: err.Error()})
		return
	}
	g.held = &t
	g.mu.Unlock()
	g.job.Note(t.Op, "")
	g.log.Info("lease taken", "op", t.Op, "holder", t.PID, "wasFrozen", wasFrozen)
	reply(message{OK: true, Frozen: wasFrozen})

	verdict, reason := "", ""
	expired := false
	for {
		_ = c.SetReadDeadline(time.Now().Add(ttl))
		m, err := readMsg(r)
		if err != nil {
			var ne net.Error
			expired = errors.As(err, &ne) && ne.Timeout() && verdict == ""
			break
		}
		switch {
		case verdict == released:
			reply(message{Error: "the lease was released"})
		case m.Commit == End || m.Commit == Keep:
			// The last verdict stands: a holder may hold a job frozen
			// (Keep) and later end it, or keep one it meant to end.
			verdict, reason = m.Commit, m.Reason
			if verdict == Keep {
				g.job.Note("", reason)
			}
			reply(message{OK: true})
		case m.Release:
			if verdict != End {
				g.giveBack(ctx, wasFrozen, t)
			}
			verdict = released
			reply(message{OK: true})
		}
	}
	gctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 90*time.Second)
	defer cancel()
	gaveBack := verdict == "" || verdict == released
	switch verdict {
	case "":
		if expired {
			g.log.Warn("lease ran out: giving the job back", "op", t.Op, "holder", t.PID)
		} else {
			g.log.Warn("lease holder went away uncommitted: giving the job back", "op", t.Op, "holder", t.PID)
		}
		g.giveBack(gctx, wasFrozen, t)
		if expired {
			reply(message{Expired: true})
		}
	case End:
		if err := g.job.End(gctx, reason); err != nil {
			g.log.Error("ending the job after its committed checkpoint", "err", err)
		}
	}
	g.mu.Lock()
	g.held = nil
	g.mu.Unlock()
	if verdict != Keep {
		g.job.Note("", "")
	}
	if gaveBack && !wasFrozen {
		c.Close() // the holder's Close returns now
		g.watch(ctx, t)
	}
}

// refreezeWatch is how long a guard watches a job it gave back.
const refreezeWatch = time.Minute

// watch gives the job back again should it be frozen anew soon after its
// lease ended without a commit: a CRIU that outlived the holder, which
// the holder started before it froze the job or before CRIU seized it,
// puts back the freezer state it found (frozen) when it lets go. Another
// lease taken meanwhile (a freeze by the user takes one) ends the watch.
func (g *Guard) watch(ctx context.Context, t take) {
	deadline := time.Now().Add(refreezeWatch)
	for time.Now().Before(deadline) {
		select {
		case <-ctx.Done():
			return
		case <-time.After(200 * time.Millisecond):
		}
		g.mu.Lock()
		busy := g.held != nil
		g.mu.Unlock()
		if busy {
			return
		}
		frozen, err := g.job.IsFrozen()
		if err != nil {
			return // the job is gone
		}
		if frozen {
			g.log.Warn("the job was frozen again after its lease ended (a CRIU that outlived the holder): giving it back", "op", t.Op, "holder", t.PID)
			gctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 90*time.Second)
			g.giveBack(gctx, false, t)
			cancel()
		}
	}
}

// released is the verdict of a lease its holder released: the job was
// given back.
const released = "released"

func (g *Guard) giveBack(ctx context.Context, wasFrozen bool, t take) {
	if err := g.job.GiveBack(ctx, wasFrozen); err != nil {
		g.log.Error("giving the job back", "op", t.Op, "holder", t.PID, "err", err)
	}
}

func readMsg(r *bufio.Reader) (message, error) {
	var m message
	line, err := r.ReadSlice('\n')
	if err != nil {
		return m, err
	}
	return m, json.Unmarshal(line, &m)
}

// trusted says whether the peer is root or the guard's own user.
func trusted(c *net.UnixConn) bool {
	raw, err := c.SyscallConn()
	if err != nil {
		return false
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil || cerr != nil {
		return false
	}
	return cred.Uid == 0 || int(cred.Uid) == os.Geteuid()
}
