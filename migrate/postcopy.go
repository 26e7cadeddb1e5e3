package migrate

// Post-copy: the job is frozen, everything but its private memory goes
// over the control connection as an image stream, the destination
// restores it with CRIU lazy pages, and the memory follows over a second
// connection, the page link, from the source's CRIU (which keeps it after
// the dump) to the destination's `criu lazy-pages` daemon. Downtime no
// longer grows with memory: the destination runs as soon as it is
// restored, faulting in what it touches while the rest streams behind.
//
// The page link is a second connection to the same `ferry serve`, secured
// and authenticated like the first (TLS, proofs of the token) and
// attached to the migration by a session value it names inside TLS;
// after that it carries CRIU's page-server protocol inside TLS. CRIU
// speaks no TLS of ours, so on each side ferry relays between the link
// and one end of a socketpair whose other end CRIU gets (--ps-socket):
// nothing listens for CRIU, on loopback or anywhere, so no other process
// of the host can take the relay's place. The destination's relay also
// gives ferry the first word on a failed link: it kills the destination's
// copy before the daemon learns of the failure and lets go of the job's
// userfaultfds (after which missing pages would read as zeros).
//
// Never lost, never twice, in post-copy terms:
//   - The destination runs its copy only after Commit; from Commit on the
//     source resumes its own only when the destination reports Dropped.
//   - The source ends its copy only when its CRIU has served every page
//     (the destination's copy is then whole).
//   - The destination drops its copy only when the page link fails before
//     every page arrived (the source's copy is then whole and frozen) or
//     the source aborts before that.
//   - Anything else (a lost control connection at the wrong moment) keeps
//     the copy that exists frozen, with a note in ferry list.

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferry-cr/ferry/dump"
	"github.com/ferry-cr/ferry/image"
	"github.com/ferry-cr/ferry/internal/checkpoint"
	"github.com/ferry-cr/ferry/internal/criu"
	"github.com/ferry-cr/ferry/internal/job"
	pb "github.com/ferry-cr/ferry/proto"
	"github.com/ferry-cr/ferry/restore"
)

// pageLinkGrace is how long a page link that closed is given for the
// daemon to report that the transfer was complete anyway.
const pageLinkGrace = 5 * time.Second

// postCopySource is the source's half of a post-copy migration.
type postCopySource struct {
	c         *conn    // the control connection
	link      net.Conn // the page link (TLS)
	file      *os.File // CRIU's end of the socketpair relayed to the link
	ours      net.Conn // ferry's end
	relayed   atomic.Int64
	to        string
	start     time.Time
	rep       *Report
	log       *slog.Logger
	runningAt time.Time // when the destination reported its copy running
	registry  *job.Registry
	name      string
	linkBytes int64
	// keepCtl stops Migrate's rule that an interruption kills the
	// control connection: once the destination may run its copy, the
	// source must still be able to ask it to drop that copy, and hear
	// that it did.
	keepCtl func() bool
}

// openPageLink opens and attaches the page link of session, and starts
// relaying it to the end of a socketpair whose other end is for CRIU.
func openPageLink(ctx context.Context, opts Options, c *conn, session []byte, start time.Time, rep *Report, log *slog.Logger) (*postCopySource, error) {
	if len(session) == 0 {
		return nil, errors.New("the destination named no session for the page link")
	}
	lc, _, err := connect(ctx, opts)
	if err != nil {
		return nil, fmt.Errorf("page link: %w", err)
	}
	if err := lc.send(&pb.Envelope{Msg: &pb.Envelope_AttachPages{AttachPages: &pb.AttachPages{Session: session}}}, stepTimeout); err != nil {
		lc.c.Close()
		return nil, fmt.Errorf("page link: %w", err)
	}
	criuEnd, ours, err := socketPair()
	if err != nil {
		lc.c.Close()
		return nil, fmt.Errorf("page link: %w", err)
	}
	p := &postCopySource{c: c, link: lc.c, file: criuEnd, ours: ours, to: opts.To, start: start, rep: rep, log: log}
	go p.relay(&bufferedConn{Conn: lc.c, r: lc.r})
	return p, nil
}

// relay joins CRIU's end of the page link to the link until either ends.
// The link's end reaches CRIU at once, as a closed socket would; CRIU's
// end does not reach the destination (which would take it for a failed
// transfer) before close or shut decide what it was.
func (p *postCopySource) relay(link net.Conn) {
	go func() {
		_, _ = io.Copy(p.ours, link)
		if uc, ok := p.ours.(*net.UnixConn); ok {
			_ = uc.CloseWrite()
		}
	}()
	_, _ = io.Copy(countWriter{link, &p.relayed}, p.ours)
}

// countWriter counts what goes through it.
type countWriter struct {
	w io.Writer
	n *atomic.Int64
}

func (c countWriter) Write(b []byte) (int, error) {
	n, err := c.w.Write(b)
	c.n.Add(int64(n))
	return n, err
}

// socketPair returns the two ends of a connected unix stream socket: one
// as a blocking file for CRIU, one as a net.Conn for the relay.
func socketPair() (*os.File, net.Conn, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("socketpair: %w", err)
	}
	criuEnd := os.NewFile(uintptr(fds[0]), "page-link-criu")
	f := os.NewFile(uintptr(fds[1]), "page-link")
	ours, err := net.FileConn(f)
	f.Close()
	if err != nil {
		criuEnd.Close()
		return nil, nil, err
	}
	return criuEnd, ours, nil
}

// countLink notes the bytes the page link has carried from CRIU.
func (p *postCopySource) countLink() {
	p.linkBytes = p.relayed.Load()
}

// close closes the page link and both ends of the relay, noting what it
// carried.
func (p *postCopySource) close() {
	p.countLink()
	p.file.Close()
	p.ours.Close()
	p.link.Close()
}

// waitPrepared is dump.Options.Prepared: it waits for the destination
// to say that its restore is up and waits for the checkpoint, whose first
// record is on its way.
func waitPrepared(c *conn, log *slog.Logger) func(ctx context.Context) error {
	return func(ctx context.Context) error {
		t0 := time.Now()
		m, err := recvWord(c, stepTimeout, false)
		if err != nil {
			return fmt.Errorf("waiting for the destination to prepare its restore: %w", err)
		}
		if m.GetPrepared() == nil {
			return fmt.Errorf("the destination sent %T while it was to prepare its restore", m.GetMsg())
		}
		log.Debug("destination prepared", "waited", time.Since(t0), "its start-up", time.Duration(m.GetPrepared().GetTookNs()))
		return ctx.Err()
	}
}

type ctlMsg struct {
	m   *pb.Envelope
	err error
}

// serve is dump.PostCopy.Serve: it commits the move, so the destination
// runs its copy, and follows the transfer to its end.
func (p *postCopySource) serve(ctx context.Context, served <-chan error) error {
	if p.keepCtl != nil {
		p.keepCtl()
	}
	// From Commit on the destination may run its copy: should this
	// process die, the record says so and how to settle it (handover.go:
	// srcServing; the lease holds Keep). A clean end clears it.
	note := &job.MigrationNote{Peer: p.to, Role: "source", Time: time.Now().UTC(),
		Note:    "frozen here while its post-copy move to " + p.to + " runs: the destination may run the job",
		Resolve: settleHint(p.name, p.to)}
	_, _ = p.registry.Update(p.name, func(r *job.Record) error { r.Migration = note; return nil })
	// From here on the destination may run its copy, so ours must not run
	// again unless it says its own is gone: even an unsent Commit counts.
	if err := p.c.send(&pb.Envelope{Msg: &pb.Envelope_Commit{Commit: &pb.Commit{}}}, stepTimeout); err != nil {
		p.log.Warn("sending commit", "err", err)
	}
	msgs := make(chan ctlMsg, 8)
	go func() {
		for {
			m, err := p.c.recv(restoreTimeout)
			msgs <- ctlMsg{m, err}
			if err != nil {
				return
			}
		}
	}()
	var (
		dropped  string // the destination's reason, once it dropped its copy
		complete bool   // the destination has every page
		ctlLost  error
		cut      <-chan time.Time
		aborting bool
		served1  bool  // CRIU's page server has ended...
		serveErr error // ...with this
		wait     <-chan time.Time
	)
	handle := func(cm ctlMsg) {
		var ab *abortError
		switch {
		case errors.As(cm.err, &ab):
			dropped = ab.reason
		case cm.err != nil:
			ctlLost = cm.err
		case cm.m.GetRunning() != nil:
			p.runningAt = time.Now()
		case cm.m.GetComplete() != nil:
			complete = true
		case cm.m.GetDropped() != nil:
			dropped = cm.m.GetDropped().GetReason()
		}
	}
	// shut cuts the link: CRIU's page server sees its end, and so does
	// the destination.
	shut := func() {
		_ = unix.Shutdown(int(p.file.Fd()), unix.SHUT_RDWR)
		p.link.Close()
	}
	for {
		// The verdicts, in order of precedence. Our copy ends only once
		// CRIU has served every page AND the destination says it has them
		// all (CRIU's page server also ends cleanly on a closed link); it
		// runs again only once the destination says its copy is gone.
		switch {
		case dropped != "":
			shut()
			if !served1 {
				select {
				case <-served:
				case <-time.After(stepTimeout):
				}
			}
			p.countLink()
			why := "the page transfer failed"
			if aborting {
				why = "the migration was interrupted"
			} else if serveErr != nil {
				why = fmt.Sprintf("the page transfer failed (%v)", serveErr)
			}
			if aborting {
				return fmt.Errorf("%s and %s dropped its copy (%s): %w", why, p.to, dropped, ctx.Err())
			}
			return fmt.Errorf("%s and %s dropped its copy (%s)", why, p.to, dropped)
		case served1 && complete:
			p.countLink()
			_ = p.c.send(&pb.Envelope{Msg: &pb.Envelope_Gone{Gone: &pb.Gone{}}}, stepTimeout)
			return nil
		case served1 && wait == nil:
			// CRIU is done: the destination's word decides, and must
			// come soon.
			if serveErr != nil {
				shut()
			}
			wait = time.After(stepTimeout)
		}
		if served1 && (msgs == nil || ctlLost != nil) {
			return p.doubt(serveErr, ctlLost)
		}
		select {
		case cm := <-msgs:
			handle(cm)
			if cm.err != nil {
				msgs = nil // the reader has stopped
			}
		case <-ctx.Done():
			if !aborting {
				// Interrupted: ask the destination to drop its copy; if it
				// does not, cut the link, which drops it anyway (unless
				// every page is already there: then the move is done).
				aborting = true
				p.c.abort("the migration was interrupted on the source")
				cut = time.After(stepTimeout)
			}
		case <-cut:
			shut()
		case err := <-served:
			served1, serveErr = true, err
		case <-wait:
			return p.doubt(serveErr, errors.New("no word from the destination"))
		}
	}
}

// doubt is the post-copy source's verdict when the destination's state is
// unknown: neither end nor resume (dump keeps the tree frozen).
func (p *postCopySource) doubt(serveErr, why error) error {
	p.countLink()
	what := "CRIU served its pages"
	if serveErr != nil {
		what = fmt.Sprintf("the page transfer failed (%v)", serveErr)
	}
	return fmt.Errorf("%w: %s, but whether %s has them all or dropped its copy is unknown (%v)",
		dump.ErrKeepStopped, what, p.to, why)
}

// finish turns dump's outcome into Migrate's.
func (p *postCopySource) finish(ctx context.Context, s *job.Registry, name string, res *dump.Result, err error) (*Report, error) {
	p.close()
	rep := p.rep
	clearNote := func() {
		_, _ = s.Update(name, func(r *job.Record) error { r.Migration = nil; return nil })
	}
	switch {
	case err == nil:
		clearNote()
		if !p.runningAt.IsZero() {
			rep.Downtime = p.runningAt.Sub(res.FrozenAt)
		}
		rep.Total = time.Since(p.start)
		rep.LazyPages = res.LazyPages
		rep.BytesSent = int64(res.Size) + p.linkBytes
		if secs := rep.Total.Seconds(); secs > 0 {
			rep.Throughput = float64(rep.BytesSent) / secs
		}
		return rep, nil
	case errors.Is(err, dump.ErrKeepStopped):
		note := &job.MigrationNote{Peer: p.to, Role: "source", Time: time.Now().UTC(),
			Note:    "held frozen here: its post-copy move to " + p.to + " failed and whether the copy there was dropped is unknown",
			Resolve: settleHint(name, p.to)}
		_, _ = s.Update(name, func(r *job.Record) error { r.Migration = note; return nil })
		p.log.Error("migration in doubt", "job", name, "to", p.to, "err", err)
		return rep, fmt.Errorf("%w: %w; settle it with: %s", ErrInDoubt, err, note.Resolve)
	}
	clearNote()
	p.c.abort("the source failed and keeps the job: " + err.Error())
	return nil, keptHere(ctx, name, err)
}

// The destination's half.

// sessions pairs page links with the migrations waiting for them.
type sessions struct {
	mu sync.Mutex
	m  map[string]chan net.Conn
}

func (ss *sessions) open() ([]byte, chan net.Conn, func()) {
	id := make([]byte, 16)
	_, _ = rand.Read(id)
	ch := make(chan net.Conn, 1)
	ss.mu.Lock()
	if ss.m == nil {
		ss.m = map[string]chan net.Conn{}
	}
	ss.m[string(id)] = ch
	ss.mu.Unlock()
	return id, ch, func() {
		ss.mu.Lock()
		delete(ss.m, string(id))
		ss.mu.Unlock()
	}
}

// attach hands nc to the migration of session; false if there is none.
func (ss *sessions) attach(session []byte, nc net.Conn) bool {
	ss.mu.Lock()
	ch, ok := ss.m[string(session)]
	delete(ss.m, string(session))
	ss.mu.Unlock()
	if ok {
		ch <- nc
	}
	return ok
}

// bufferedConn is a net.Conn whose first bytes come from a reader that
// may already hold some of them.
type bufferedConn struct {
	net.Conn
	r io.Reader
}

func (b *bufferedConn) Read(p []byte) (int, error) { return b.r.Read(p) }

// relay joins the lazy-pages daemon's end of the page link (a socketpair:
// the daemon gets the other end as --ps-socket) to the page link.
// sourceGone is closed when the source's side ends.
type relay struct {
	link       net.Conn
	ours       net.Conn
	daemonEnd  *os.File // for the daemon; closed here once it has started
	sourceGone chan struct{}
	closeOnce  sync.Once
}

func newRelay(link net.Conn) (*relay, error) {
	daemonEnd, ours, err := socketPair()
	if err != nil {
		return nil, err
	}
	r := &relay{link: link, ours: ours, daemonEnd: daemonEnd, sourceGone: make(chan struct{})}
	go r.run()
	return r, nil
}

func (r *relay) run() {
	go func() {
		_, _ = io.Copy(r.link, r.ours)
		if tc, ok := r.link.(interface{ CloseWrite() error }); ok {
			_ = tc.CloseWrite()
		}
	}()
	// Source to daemon. When the source's side ends, the daemon is not
	// told (its connection stays open) until close: first the caller
	// decides whether the transfer was complete or the copy must die.
	_, _ = io.Copy(r.ours, r.link)
	close(r.sourceGone)
}

func (r *relay) close() {
	r.closeOnce.Do(func() {
		r.ours.Close()
		r.link.Close()
		r.daemonEnd.Close()
	})
}

// startingDaemon is a lazy-pages daemon being started beside the restore.
type startingDaemon struct {
	done   chan struct{}
	daemon *restore.LazyPages
	err    error
}

// startDaemon starts CRIU's lazy-pages daemon in the background (see
// restore.StartLazyPages).
func startDaemon(ctx context.Context, b *criu.Binary, images, work string, pages *os.File, log *slog.Logger) *startingDaemon {
	s := &startingDaemon{done: make(chan struct{})}
	t0 := time.Now()
	go func() {
		defer close(s.done)
		s.daemon, s.err = startLazyPages(ctx, b, images, work, pages)
		pages.Close() // the daemon has its own copy
		log.Debug("lazy-pages daemon started", "err", s.err, "took", time.Since(t0))
	}()
	return s
}

// startLazyPages is restore.StartLazyPages with the page link a socket the
// daemon inherits (--ps-socket) rather than an address it connects to,
// which any local process could have taken first.
func startLazyPages(ctx context.Context, b *criu.Binary, images, work string, pages *os.File) (*restore.LazyPages, error) {
	return criu.Command{Path: b.Path, Args: []string{"lazy-pages", "--images-dir", images, "--work-dir", work,
		"--log-file", "lazy-pages.log", "-v2", "--page-server", "--ps-socket", strconv.Itoa(int(criu.ExtraFD(0)))},
		ExtraFiles: []*os.File{pages}}.StartReady(ctx)
}

// wait returns the daemon once it listens, or why it never will.
func (s *startingDaemon) wait(ctx context.Context) (*restore.LazyPages, error) {
	select {
	case <-s.done:
	case <-ctx.Done():
		select {
		case <-s.done:
		default:
			return nil, ctx.Err()
		}
	}
	if s.err != nil {
		return nil, fmt.Errorf("the lazy-pages daemon failed: %w", s.err)
	}
	return s.daemon, nil
}

// stop waits for the start to end (StartLazyPages is bounded: CRIU
// becomes ready, exits, or is killed with ctx) and ends the daemon if it
// still runs, so that none outlives the migration.
func (s *startingDaemon) stop() {
	<-s.done
	if d := s.daemon; d != nil {
		select {
		case <-d.Done():
		default:
			d.Kill()
			_ = d.Wait()
		}
	}
}

// receivePostCopy is the destination's side of a post-copy migration,
// after the offer was accepted.
func (sv *Server) receivePostCopy(ctx context.Context, c *conn, nc net.Conn, name string, sayPrepared bool, log *slog.Logger) error {
	session, links, forget := sv.sessions.open()
	defer forget()
	sv.answerSession(c, name, session)
	var link net.Conn
	select {
	case link = <-links:
	case <-time.After(stepTimeout):
		return errors.New("the source did not open its page link")
	case <-ctx.Done():
		return ctx.Err()
	}
	defer link.Close()

	// The stream's first record (the manifest) comes before the source
	// dumps: the lazy-pages daemon and the restore start up now, while the
	// job still runs there, and wait for the rest (restore.EarlyLazy).
	t0 := time.Now()
	rd, err := image.NewReader(&dataReader{c: c})
	if err != nil {
		c.abort("receiving the checkpoint failed on the destination: " + err.Error())
		return fmt.Errorf("receiving: %w", err)
	}
	head, err := checkpoint.FromRecord(rd.Manifest())
	var early *restore.EarlyLazy
	if err == nil {
		early, err = restore.NewEarlyLazy(sv.Restore.ServeDir, head)
	}
	if err != nil {
		c.abort(err.Error())
		return err
	}
	defer early.Close() // after the daemon has gone (deferred below)
	rl, err := newRelay(link)
	if err != nil {
		c.abort(err.Error())
		return err
	}
	defer rl.close()
	starting := startDaemon(ctx, sv.Restore.Criu, early.Daemon, early.Dir, rl.daemonEnd, log)
	defer starting.stop()
	var fillErr error
	filled := make(chan struct{})
	// A stream that fails ends the restore at once, wherever its start-up
	// is (it would otherwise only be refused at its first image).
	rctx, rcancel := context.WithCancel(ctx)
	defer rcancel()
	go func() {
		defer close(filled)
		a, err := image.ReadArchiveFrom(rd)
		if err == nil {
			_, err = early.Fill(a)
			a.Close()
		}
		fillErr = err
		log.Debug("lazy checkpoint received", "took", time.Since(t0), "err", err)
		if err != nil {
			rcancel()
		}
	}()
	defer func() {
		select {
		case <-filled:
		default:
			// Still reading: the restore failed first (and said so to the
			// source). Cut the connection for good.
			c.cutOff()
			<-filled
		}
	}()

	// Prepared, when the source waits for it, once the daemon waits at
	// its first image and the restore at its own.
	asked, over := make(chan struct{}), make(chan struct{})
	defer close(over)
	var askOnce sync.Once
	if sayPrepared {
		go func() {
			for _, ch := range []<-chan struct{}{early.DaemonWaiting(), asked} {
				select {
				case <-ch:
				case <-over:
					return
				}
			}
			sv.sayPrepared(c, t0, log)
		}()
	}
	ropts := sv.Restore
	ropts.Checkpoint, ropts.Name, ropts.LazyPages, ropts.LazyImages = early.Dir, name, true, early.Images
	ropts.LazyReady = func(ctx context.Context) error {
		askOnce.Do(func() { close(asked) })
		// The daemon is ready only once the checkpoint has come (it reads
		// two images first), but it may fail before: then at once, so
		// that a source waiting for Prepared hears why.
		for daemon := starting.done; ; {
			select {
			case <-filled:
				if fillErr != nil {
					return fmt.Errorf("receiving the checkpoint: %w", fillErr)
				}
				_, err := starting.wait(ctx)
				return err
			case <-daemon:
				if _, err := starting.wait(ctx); err != nil {
					return err
				}
				daemon = nil
			case <-ctx.Done():
				return ctx.Err()
			}
		}
	}
	rec, took, err := sv.restoreHeld(rctx, c, nc, ropts, "restored from %s (post-copy) and held frozen until the source commits")
	if err != nil {
		select {
		case <-filled:
			if fillErr != nil {
				return fmt.Errorf("receiving: %w", fillErr)
			}
		default:
		}
		return err
	}
	log.Debug("restored with lazy pages", "took", time.Since(t0))
	daemon, err := starting.wait(ctx)
	if err != nil {
		// Not reached: the restore waited for the daemon.
		sv.drop(ctx, rec.Name, nc, log)
		c.abort("starting lazy pages on the destination failed: " + err.Error())
		return fmt.Errorf("starting lazy pages: %w", err)
	}
	if err := sv.reportRestored(c, rec.Name, took); err != nil {
		log.Warn("reporting the restore", "err", err)
	}

	msgs := make(chan ctlMsg, 8)
	go func() {
		for {
			m, err := c.recv(restoreTimeout)
			msgs <- ctlMsg{m, err}
			if err != nil {
				return
			}
		}
	}()
	// drop ends our copy (before the daemon hears of any failure) and
	// tells the source, which may then resume its own.
	drop := func(why string) error {
		sv.drop(ctx, rec.Name, nc, log)
		rl.close()
		_ = c.send(&pb.Envelope{Msg: &pb.Envelope_Dropped{Dropped: &pb.Dropped{Reason: why}}}, stepTimeout)
		return fmt.Errorf("post-copy failed, dropped our copy: %s", why)
	}
	var (
		committed, complete, gone bool
		ctlLost                   error
	)
	start := func() error {
		if err := sv.start(ctx, rec.Name, nc); err != nil {
			return drop("starting the migrated job: " + err.Error())
		}
		committed = true
		_ = c.send(&pb.Envelope{Msg: &pb.Envelope_Running{Running: &pb.Running{Name: rec.Name}}}, stepTimeout)
		return nil
	}
	var settle <-chan time.Time
	sourceGone := rl.sourceGone
	daemonExit := daemonDone(daemon, filepath.Join(early.Dir, "lazy-pages.log"))
	// exited handles the daemon's exit: every page arrived, or our copy
	// lacks some and must go.
	exited := func(err error) error {
		if err != nil {
			return drop("the lazy-pages daemon failed: " + err.Error())
		}
		complete = true
		settle = time.After(stepTimeout)
		sourceGone = nil
		// The source ends its copy only on this word.
		_ = c.send(&pb.Envelope{Msg: &pb.Envelope_Complete{Complete: &pb.Complete{}}}, stepTimeout)
		return nil
	}
	for {
		if complete && (gone || ctlLost != nil) {
			break
		}
		select {
		case cm := <-msgs:
			var ab *abortError
			switch {
			case errors.As(cm.err, &ab):
				msgs = nil
				if !complete {
					return drop("the source aborted: " + ab.reason)
				}
			case cm.err != nil:
				// The pages may still all arrive: go on without orders.
				msgs, ctlLost = nil, cm.err
				log.Warn("control connection lost during post-copy", "err", cm.err)
			case cm.m.GetCommit() != nil, cm.m.GetGone() != nil:
				gone = gone || cm.m.GetGone() != nil
				if !committed {
					if err := start(); err != nil {
						return err
					}
				}
			}
		case err := <-daemonExit:
			if err := exited(err); err != nil {
				return err
			}
		case <-sourceGone:
			// The source's end of the link closed: complete if the daemon
			// says so in a moment, else our copy lacks pages.
			select {
			case err := <-daemonExit:
				if err := exited(err); err != nil {
					return err
				}
			case <-time.After(pageLinkGrace):
				return drop("the page link closed before every page arrived")
			}
		case <-settle:
			ctlLost = errors.New("the source did not confirm in time")
		}
	}
	if !committed {
		// Whole, but the source never said to run it: still held.
		return sv.lost(ctx, dstHeld, false, rec.Name, nc, fmt.Errorf("every page arrived but the source did not commit: %w", ctlLost), log)
	}
	if !gone {
		log.Warn("post-copy complete, the source did not confirm its copy ended", "err", ctlLost)
	}
	log.Info("migration done (post-copy)", "received", c.rx)
	return nil
}

// daemonDone yields the daemon's exit once it has exited, explained
// from its log.
func daemonDone(d *restore.LazyPages, logPath string) <-chan error {
	ch := make(chan error, 1)
	go func() {
		if err := d.Wait(); err != nil {
			ch <- criu.Explain(err, logPath)
			return
		}
		ch <- nil
	}()
	return ch
}
