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
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferry-cr/ferry/dump"
	"github.com/ferry-cr/ferry/image"
	"github.com/ferry-cr/ferry/internal/checkpoint"
	"github.com/ferry-cr/ferry/internal/criu"
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
	d         *srcDriver
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
	// The relay writes CRIU's pages for as long as the transfer takes:
	// no deadline of the attach may cut it.
	_ = lc.c.SetDeadline(time.Time{})
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
// runs its copy, and follows the transfer to its end, feeding the source
// machine (handover.go) every word, CRIU's end and every timer, and
// carrying out its actions. It returns nil once the destination has every
// page (dump then ends the tree), ErrKeepStopped when the outcome is in
// doubt (dump keeps the tree frozen), and any other error once the
// destination's copy is gone (dump gives the tree back).
func (p *postCopySource) serve(ctx context.Context, served <-chan error) error {
	if p.keepCtl != nil {
		p.keepCtl()
	}
	d := p.d
	// Each side beats while the pages move, and gives up on a peer
	// silent for peerSilence: a dead link holds neither for long.
	defer heartbeat(p.c)()
	msgs := make(chan ctlMsg, 8)
	go func() {
		for {
			m, err := p.c.recv(peerSilence())
			msgs <- ctlMsg{m, err}
			if err != nil {
				return
			}
		}
	}()
	var (
		cut, wait <-chan time.Time
		served1   bool
		serveErr  error
	)
	// run feeds i and carries out the actions that belong to this loop.
	run := func(i in) {
		for _, a := range d.feed(i) {
			switch a {
			case cutPages:
				// CRIU's page server sees its end, and so does the
				// destination.
				_ = unix.Shutdown(int(p.file.Fd()), unix.SHUT_RDWR)
				p.link.Close()
			case waitWord:
				wait = time.After(stepTimeout)
			case waitCut:
				cut = time.After(stepTimeout)
			}
		}
	}
	run(inKept) // the lease holds Keep: Commit
	for d.m.st == srcServing {
		select {
		case cm := <-msgs:
			var ab *abortError
			switch {
			case errors.As(cm.err, &ab):
				d.reason = ab.reason
			case cm.err == nil && cm.m.GetDropped() != nil:
				d.reason = cm.m.GetDropped().GetReason()
			case cm.err == nil && cm.m.GetRunning() != nil:
				p.runningAt = time.Now()
			}
			if cm.err != nil {
				msgs = nil // the reader has stopped
				if wait == nil {
					// No word can come now: CRIU's end is awaited no
					// longer than a silence (a dead link may hold it).
					wait = time.After(peerSilence())
				}
			}
			run(inputOf(cm.m, cm.err))
		case <-ctx.Done():
			run(inInterrupt)
		case <-cut:
			run(inCutDue)
		case err := <-served:
			served1, serveErr = true, err
			if err != nil {
				run(inServeFailed)
			} else {
				run(inServed)
			}
		case <-wait:
			run(inSilence)
		}
	}
	p.countLink()
	switch d.m.st {
	case srcCommitted:
		return nil // Gone is sent: dump ends the tree
	case srcInDoubt:
		what := "CRIU served its pages"
		if serveErr != nil {
			what = fmt.Sprintf("the page transfer failed (%v)", serveErr)
		}
		return fmt.Errorf("%w: %s, but whether %s has them all or dropped its copy is unknown",
			dump.ErrKeepStopped, what, p.to)
	}
	// Gave back: the destination's copy is gone. CRIU's page server ends
	// on the cut link before the tree runs again.
	if !served1 {
		select {
		case <-served:
		case <-time.After(stepTimeout):
		}
	}
	p.countLink()
	why := "the page transfer failed"
	if serveErr != nil {
		why = fmt.Sprintf("the page transfer failed (%v)", serveErr)
	}
	if d.m.aborting {
		return fmt.Errorf("the migration was interrupted and %s dropped its copy (%s): %w", p.to, d.reason, ctx.Err())
	}
	return fmt.Errorf("%s and %s dropped its copy (%s)", why, p.to, d.reason)
}

// finish turns dump's outcome into Migrate's.
func (p *postCopySource) finish(ctx context.Context, res *dump.Result, err error) (*Report, error) {
	p.close()
	d, rep := p.d, p.rep
	d.dumped(err)
	switch d.m.st {
	case srcDone:
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
	case srcInDoubt:
		p.log.Error("migration in doubt", "job", d.name, "to", p.to, "err", err)
		return rep, fmt.Errorf("%w: %w; settle it with: %s", ErrInDoubt, err, settleHint(d.name, p.to))
	}
	return nil, keptHere(ctx, d.name, err)
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
		// Shut, not only closed: the daemon holds a copy of our end too
		// (restore.StartLazyPages), and must see this end.
		if uc, ok := r.ours.(*net.UnixConn); ok {
			_ = uc.CloseRead()
			_ = uc.CloseWrite()
		}
		r.ours.Close()
		r.link.Close()
		r.daemonEnd.Close()
	})
}

// startingDaemon is a lazy-pages daemon being started beside the restore.
type startingDaemon struct {
	done   chan struct{}
	cancel context.CancelFunc // ends a start still under way
	daemon *restore.LazyPages
	err    error
}

// startDaemon starts CRIU's lazy-pages daemon in the background (see
// restore.StartLazyPages).
func startDaemon(ctx context.Context, b *criu.Binary, images, work string, pages, hold *os.File, log *slog.Logger) *startingDaemon {
	ctx, cancel := context.WithCancel(ctx)
	s := &startingDaemon{done: make(chan struct{}), cancel: cancel}
	t0 := time.Now()
	go func() {
		defer close(s.done)
		s.daemon, s.err = restore.StartLazyPages(ctx, b, images, work, pages, hold)
		pages.Close() // the daemon has its own copy
		if hold != nil {
			hold.Close()
		}
		log.Debug("lazy-pages daemon started", "err", s.err, "took", time.Since(t0))
	}()
	return s
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

// stop ends a start still under way, waits for it to end, and ends the
// daemon if it still runs, so that none outlives the migration. A start
// can wait for ever by itself: the daemon becomes ready only once it has
// read its first images, which never come when the stream broke off
// (the chaos test's seed 2340527: a link dead in the stream left a
// destination holding its connections and a daemon for good).
func (s *startingDaemon) stop() {
	s.cancel()
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
	// The daemon also holds our end of its page socket: should this
	// process be killed, the daemon waits, rather than ends and lets the
	// pages it has not fetched read as zeros (see restore.StartLazyPages).
	hold, err := rl.ours.(*net.UnixConn).File()
	if err != nil {
		c.abort(err.Error())
		return err
	}
	starting := startDaemon(ctx, sv.Restore.Criu, early.Daemon, early.Dir, rl.daemonEnd, hold, log)
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
	d := sv.newDst(ctx, c, nc, name, true, log)
	d.dropped = rl.close // before the source (and the daemon) hear of it
	// Once the stream is in, this goroutine is the control connection's
	// one reader, from the restore on: a source that gives up while the
	// restore is still at work (its Abort, or the link's end) ends that
	// restore at once, rather than leaving it to its timeout.
	msgs := make(chan ctlMsg, 8)
	var readFor atomic.Int64 // the source beats only once the copy is restored
	readFor.Store(int64(restoreTimeout))
	go func() {
		<-filled
		if fillErr != nil {
			return
		}
		for {
			m, err := c.recv(time.Duration(readFor.Load()))
			msgs <- ctlMsg{m, err}
			if err != nil {
				return
			}
		}
	}()
	var heardEarly []ctlMsg // what the source said while the restore ran
	restoring, watched := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(watched)
		select {
		case cm := <-msgs:
			heardEarly = append(heardEarly, cm)
			if cm.err != nil {
				rcancel()
			}
		case <-restoring:
		}
	}()
	rec, took, err := sv.restoreHeld(rctx, c, nc, ropts)
	close(restoring)
	<-watched
	// From here the source beats: a receive still waiting with the
	// restore's deadline waits no longer than a silence (a link that died
	// during the restore would otherwise hold our copy for that deadline).
	readFor.Store(int64(peerSilence()))
	c.readWithin(peerSilence())
	if err != nil {
		select {
		case <-filled:
			if fillErr != nil {
				err = fmt.Errorf("receiving: %w", fillErr)
			}
		default:
		}
		if len(heardEarly) > 0 && heardEarly[0].err != nil {
			err = fmt.Errorf("the source gave up while we restored (%w): %w", heardEarly[0].err, err)
		}
		d.restored(nil, 0, err)
		return d.result()
	}
	log.Debug("restored with lazy pages", "took", time.Since(t0))
	daemon, err := starting.wait(ctx)
	if err != nil {
		// Not reached: the restore waited for the daemon.
		_ = sv.drop(ctx, rec.Name, nc.RemoteAddr().String(), log)
		c.abort("starting lazy pages on the destination failed: " + err.Error())
		return fmt.Errorf("starting lazy pages: %w", err)
	}
	d.restored(rec, took, nil)

	// Held, then lazy, until the machine (handover.go) says the
	// migration is over: it hears the source's words, the daemon's exit
	// (every page came, or our copy lacks some) and the page link's end.
	defer heartbeat(c)() // the source gives up on a silent destination
	var settle <-chan time.Time
	sourceGone := rl.sourceGone
	daemonExit := daemonDone(daemon, filepath.Join(early.Dir, "lazy-pages.log"))
	exited := func(err error) {
		daemonExit, sourceGone = nil, nil
		if err != nil {
			d.fail(inPagesFailed, fmt.Errorf("the lazy-pages daemon failed: %w", err))
			return
		}
		d.feed(inPagesIn)
	}
	for _, cm := range heardEarly {
		// A word that came as the restore ended: heard first.
		if cm.err != nil {
			msgs = nil
		}
		d.heard(cm.m, cm.err)
	}
	for !d.m.done() {
		select {
		case cm := <-msgs:
			if cm.err != nil {
				msgs = nil // the reader has stopped; the pages may still all come...
				log.Warn("control connection lost during post-copy", "err", cm.err)
				if settle == nil {
					settle = time.After(2 * peerSilence()) // ...but not forever
				}
			}
			d.heard(cm.m, cm.err)
		case err := <-daemonExit:
			exited(err)
		case <-sourceGone:
			// The source's end of the link closed: complete if the daemon
			// says so in a moment, else our copy lacks pages.
			select {
			case err := <-daemonExit:
				exited(err)
			case <-time.After(pageLinkGrace):
				sourceGone = nil
				d.fail(inPagesFailed, errors.New("the page link closed before every page arrived"))
			}
		case <-settle:
			d.fail(inSilence, errors.New("the source did not confirm in time"))
		}
		if d.m.st == dstComplete && settle == nil {
			settle = time.After(stepTimeout)
		}
	}
	if d.m.st == dstDone {
		if !d.m.gone {
			log.Warn("post-copy complete, the source did not confirm its copy ended", "err", d.cause)
		}
		log.Info("migration done (post-copy)", "received", c.rx.Load())
	}
	return d.result()
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
