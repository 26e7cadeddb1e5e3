package migrate

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"time"

	"github.com/ferry-cr/ferry/internal/job"
	pb "github.com/ferry-cr/ferry/proto"
	"github.com/ferry-cr/ferry/restore"
)

// Server is the destination side: `ferry serve`. Each accepted migration
// is restored as a job of Store, held frozen until the source's copy is
// gone, then thawed.
type Server struct {
	Store   *job.Registry
	Token   []byte
	Restore restore.Options // template: CRIU, ServeDir, CgroupRoot
	Logger  *slog.Logger
	// Caps is what this host can do, told to every source (auto weighs
	// it; post-copy needs LazyPages).
	Caps Capabilities
	// Hook, when set, is a command run as `HOOK EVENT JOB` (with
	// FERRY_PEER in its environment) at three moments of each migration:
	// pre-restore (the whole checkpoint is here and the source's copy is
	// stopped with its connections locked: take over its addresses; a
	// failure refuses the migration), discarded (our copy was dropped and
	// the source's runs on: give them back) and running (our copy runs).
	Hook string

	// PKI adds certificates to the token's proof (optional).
	PKI PKI
	// MaxPending caps the connections that have not proved the token yet
	// (0: 64), MaxPendingPerHost those from one address (0: 8).
	MaxPending, MaxPendingPerHost int

	sessions   sessions // post-copy migrations waiting for their page link
	pending    pending
	refusedLog rateLimit
}

// Serve accepts migrations on ln until ctx ends, each in a goroutine of
// its own, and waits for those in flight before returning.
//
// Anyone who can reach the port can connect, so a connection costs
// little until its peer has proved the token: it must do so within
// handshakeTimeout, with small buffers, and only MaxPending such
// connections (MaxPendingPerHost from one address) are let in at once;
// more are closed at once. A failing accept (out of descriptors, say)
// is retried after a pause, never the end of Serve.
func (sv *Server) Serve(ctx context.Context, ln net.Listener) error {
	log := sv.log()
	stop := context.AfterFunc(ctx, func() { _ = ln.Close() })
	defer stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	var backoff time.Duration
	var refused refusals
	for {
		nc, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				return err
			}
			// EMFILE, ENFILE, ENOBUFS, ECONNABORTED...: wait for
			// connections to end, as a flood's do at their deadline.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			if backoff == time.Second || backoff == 5*time.Millisecond {
				log.Warn("accepting a connection failed; retrying", "err", err, "in", backoff)
			}
			select {
			case <-time.After(backoff):
			case <-ctx.Done():
				return nil
			}
			continue
		}
		backoff = 0
		release, ok := sv.pending.admit(nc.RemoteAddr(), sv.MaxPending, sv.MaxPendingPerHost)
		if !ok {
			nc.Close()
			refused.note(log, nc.RemoteAddr())
			continue
		}
		wg.Go(func() {
			peer := nc.RemoteAddr().String()
			kept, err := sv.handle(ctx, nc, release)
			if !kept {
				nc.Close()
			}
			if err != nil {
				log.Error("migration failed", "peer", peer, "err", err)
			}
		})
	}
}

// Defaults of Server.MaxPending and MaxPendingPerHost.
const (
	defaultMaxPending        = 64
	defaultMaxPendingPerHost = 8
)

// pending counts the connections that have not proved the token yet, in
// all and by remote address.
type pending struct {
	mu     sync.Mutex
	n      int
	byHost map[string]int
}

// admit takes a place for a connection from addr, if there is one; release
// gives it back (once: later calls do nothing).
func (p *pending) admit(addr net.Addr, max, perHost int) (release func(), ok bool) {
	if max <= 0 {
		max = defaultMaxPending
	}
	if perHost <= 0 {
		perHost = defaultMaxPendingPerHost
	}
	host := addr.String()
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	if ip := net.ParseIP(host); ip != nil && ip.To4() == nil {
		// One IPv6 host commonly holds a whole /64.
		host = ip.Mask(net.CIDRMask(64, 128)).String() + "/64"
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.byHost == nil {
		p.byHost = map[string]int{}
	}
	if p.n >= max || p.byHost[host] >= perHost {
		return nil, false
	}
	p.n++
	p.byHost[host]++
	return sync.OnceFunc(func() {
		p.mu.Lock()
		defer p.mu.Unlock()
		p.n--
		if p.byHost[host]--; p.byHost[host] <= 0 {
			delete(p.byHost, host)
		}
	}), true
}

// rateLimit lets a few log lines a second through, so that a flood of
// failed handshakes does not flood the log; the next line let through
// says how many were not.
type rateLimit struct {
	mu      sync.Mutex
	second  time.Time
	n       int
	dropped int
}

// allow says whether to log now, and how many lines were dropped since
// the last one logged.
func (r *rateLimit) allow() (dropped int, ok bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if now := time.Now(); now.Sub(r.second) >= time.Second {
		r.second, r.n = now, 0
	}
	if r.n >= 10 {
		r.dropped++
		return 0, false
	}
	r.n++
	dropped, r.dropped = r.dropped, 0
	return dropped, true
}

// refusals logs connections closed for want of a place, at most once a
// second: a flood must not flood the log too.
type refusals struct {
	last  time.Time
	count int
}

func (r *refusals) note(log *slog.Logger, addr net.Addr) {
	r.count++
	if time.Since(r.last) < time.Second {
		return
	}
	log.Warn("closed connections at once: too many have not proved the token yet", "count", r.count, "last peer", addr.String())
	r.last, r.count = time.Now(), 0
}

func (sv *Server) log() *slog.Logger {
	if sv.Logger != nil {
		return sv.Logger
	}
	return slog.Default()
}

// handle runs one connection: authenticate, then either attach a page
// link to its migration (kept: the connection now belongs to that
// migration) or run a migration: accept the offer, restore the stream
// held frozen, report, and thaw once the source's copy is gone.
func (sv *Server) handle(ctx context.Context, nc net.Conn, release func()) (kept bool, err error) {
	log := sv.log().With("peer", nc.RemoteAddr().String())
	stopHandshake := context.AfterFunc(ctx, func() { _ = nc.SetDeadline(time.Unix(1, 0)) })
	c, err := sv.authenticate(nc)
	stopHandshake()
	release()
	if err != nil {
		if n, ok := sv.refusedLog.allow(); ok {
			log.Warn("refused a migration", "reason", err, "unlogged before", n)
		}
		return false, nil
	}
	// From here every receive sets a deadline of its own: a deadline
	// alone would not hold them (see conn.cutOff).
	stopConn := context.AfterFunc(ctx, c.cutOff)
	defer stopConn()
	m, err := c.recv(stepTimeout)
	if err != nil {
		return false, fmt.Errorf("waiting for an offer: %w", err)
	}
	if ap := m.GetAttachPages(); ap != nil {
		_ = c.c.SetDeadline(time.Time{})
		if !sv.sessions.attach(ap.GetSession(), &bufferedConn{Conn: c.c, r: c.r}) {
			return false, errors.New("a page link named no migration in progress")
		}
		return true, nil
	}
	if st := m.GetSettle(); st != nil {
		return false, sv.settle(ctx, c, nc, st, log)
	}
	offer := m.GetOffer()
	if offer == nil {
		return false, fmt.Errorf("peer sent %T instead of an offer", m.GetMsg())
	}
	name := offer.GetJob()
	if err := job.ValidateName(name); err != nil {
		sv.answer(c, false, err.Error(), "")
		return false, err
	}
	// A record a killed restore abandoned (Stale) does not hold the name:
	// the restore clears it.
	if old, err := sv.Store.Load(name); err == nil && (old.Status != job.Exited || old.InitAlive()) && !old.Stale() {
		reason := fmt.Sprintf("a job named %q already exists here", name)
		sv.answer(c, false, reason, "")
		return false, errors.New(reason)
	}
	mode := Mode(offer.GetMode())
	switch mode {
	case ModeStopCopy:
	case ModePostCopy:
		if !sv.Caps.LazyPages {
			reason := "this host cannot receive post-copy: its kernel or CRIU lacks lazy pages (userfaultfd)"
			sv.answer(c, false, reason, "")
			return false, errors.New(reason)
		}
	default:
		reason := fmt.Sprintf("this destination cannot receive mode %q", mode)
		sv.answer(c, false, reason, "")
		return false, errors.New(reason)
	}
	log = log.With("job", name)
	log.Info("receiving a migration", "mode", offer.GetMode(), "memory", offer.GetMemoryBytes())
	if mode == ModePostCopy {
		return false, sv.receivePostCopy(ctx, c, nc, name, offer.GetWaitPrepared(), log)
	}
	sv.answer(c, true, "", name)
	return false, sv.receiveStopCopy(ctx, c, nc, name, offer.GetWaitPrepared(), log)
}

// receiveStopCopy is the destination's side of a stop-copy migration,
// after the offer.
func (sv *Server) receiveStopCopy(ctx context.Context, c *conn, nc net.Conn, name string, sayPrepared bool, log *slog.Logger) error {
	d := sv.newDst(ctx, c, nc, name, false, log)
	ropts := sv.Restore
	ropts.Checkpoint, ropts.Stdin, ropts.Name = "-", &dataReader{c: c}, name
	// CRIU restores the job's memory as it arrives (restoreHeld holds the
	// copy). It starts as soon as the source says only the memory is still
	// to come, or, with a source that waits for Prepared, before the
	// source dumps at all: from the stream's first record.
	ropts.Early = true
	if sayPrepared {
		t0 := time.Now()
		ropts.Prepared = func() { sv.sayPrepared(c, t0, log) }
	}
	if !d.restored(sv.restoreHeld(ctx, c, nc, ropts)) {
		return d.result()
	}
	// Held (handover.go: dstHeld) until the source says Gone.
	for !d.m.done() {
		m, err := c.recv(stepTimeout)
		d.heard(m, err)
	}
	if d.m.st == dstDone {
		log.Info("migration done", "received", c.rx.Load())
	}
	return d.result()
}

// dstDriver carries out the destination machine's actions (handover.go)
// on the real world: the control connection, the held copy, its record.
type dstDriver struct {
	sv    *Server
	ctx   context.Context
	m     destination
	c     *conn
	nc    net.Conn
	name  string // our copy's name (the offer's)
	log   *slog.Logger
	took  time.Duration // the restore's
	held  bool          // a copy was restored
	cause error         // what ended the migration, when not its end
	// dropped, when set, runs once our copy is killed and before the
	// source hears of it (post-copy: the page relay closes).
	dropped func()
}

func (sv *Server) newDst(ctx context.Context, c *conn, nc net.Conn, name string, postCopy bool, log *slog.Logger) *dstDriver {
	return &dstDriver{sv: sv, ctx: ctx, m: destination{postCopy: postCopy}, c: c, nc: nc, name: name, log: log}
}

// restored feeds the restore's outcome; false if there is no copy.
func (d *dstDriver) restored(rec *job.Record, took time.Duration, err error) bool {
	if err != nil {
		d.fail(inRestoreFailed, fmt.Errorf("restoring: %w", err))
		return false
	}
	d.name, d.took, d.held = rec.Name, took, true
	d.feed(inRestoredHere)
	return true
}

// heard feeds a word from the source, or why none came.
func (d *dstDriver) heard(m *pb.Envelope, err error) {
	var ab *abortError
	switch {
	case errors.As(err, &ab):
		d.fail(inAbort, fmt.Errorf("the source aborted (%s)", ab.reason))
	case err != nil:
		d.fail(inputOf(m, err), fmt.Errorf("waiting for the source's word: %w", err))
	default:
		i := inputOf(m, nil)
		if i == inLost {
			d.fail(i, fmt.Errorf("the source sent %T, which has no place here", m.GetMsg()))
			return
		}
		d.feed(i)
	}
}

// fail feeds i, which cause explains.
func (d *dstDriver) fail(i in, cause error) {
	if d.cause == nil {
		d.cause = cause
	}
	d.feed(i)
}

// feed steps the machine with i and carries out its actions in order; an
// action that fails feeds its own input in turn, in place of the rest.
func (d *dstDriver) feed(i in) {
	for {
		before := d.m.st
		out := d.m.step(i)
		d.log.Debug("handover", "side", "destination", "job", d.name, "input", i, "from", before, "to", d.m.st, "actions", out)
		next := in(-1)
		for _, a := range out {
			t := time.Now()
			next = d.do(a)
			d.log.Debug("handover action", "side", "destination", "job", d.name, "action", a, "took", time.Since(t))
			if next >= 0 {
				break
			}
		}
		if next < 0 {
			return
		}
		i = next
	}
}

// do carries out a; it returns the input a failure calls for, or -1.
func (d *dstDriver) do(a act) in {
	sv, ctx := d.sv, d.ctx
	send := func(m *pb.Envelope) in {
		if err := d.c.send(m, stepTimeout); err != nil {
			d.log.Warn("telling the source", "err", err)
			if d.cause == nil {
				d.cause = err
			}
			return inLost
		}
		return -1
	}
	why := "the migration failed"
	if d.cause != nil {
		why = d.cause.Error()
	}
	switch a {
	case sendAbort:
		d.c.abort("restore failed on the destination: " + why)
	case sendRestored:
		return send(&pb.Envelope{Msg: &pb.Envelope_Restored{Restored: &pb.Restored{Name: d.name, RestoreNs: int64(d.took)}}})
	case sendRunning:
		send(&pb.Envelope{Msg: &pb.Envelope_Running{Running: &pb.Running{Name: d.name}}})
	case sendComplete:
		// The source ends its copy only on this word.
		send(&pb.Envelope{Msg: &pb.Envelope_Complete{Complete: &pb.Complete{}}})
	case sendDropped:
		send(&pb.Envelope{Msg: &pb.Envelope_Dropped{Dropped: &pb.Dropped{Reason: why}}})
	case noteHeld:
		// Written with the record when the restore began (restoreHeld):
		// then there is nothing to write, and the source waits for less.
		sv.noteUnlessNoted(d.name, d.nc, stateHeld, heldNote(d.m.postCopy))
	case noteLazy:
		sv.note(d.name, d.nc, stateLazy, "runs here while its memory still comes from %s (post-copy)")
	case noteInDoubt:
		sv.note(d.name, d.nc, stateInDoubt, "restored from %s and held frozen; whether the source ended its copy is unknown")
	case clearNote:
		_, _ = sv.Store.UpdateLive(d.name, func(r *job.Record) error { r.Migration = nil; return nil })
	case thaw:
		if err := sv.start(ctx, d.name, d.nc); err != nil {
			d.cause = fmt.Errorf("starting the migrated job: %w", err)
			return inThawFailed
		}
	case dropCopy:
		_ = sv.drop(ctx, d.name, d.nc.RemoteAddr().String(), d.log)
		if d.dropped != nil {
			d.dropped()
		}
	}
	return -1
}

// result is the migration's outcome, as handle reports it.
func (d *dstDriver) result() error {
	cause := d.cause
	if cause == nil {
		cause = errors.New("the migration ended")
	}
	switch d.m.st {
	case dstDone:
		return nil
	case dstDropped:
		if !d.held {
			return cause // nothing was restored
		}
		return fmt.Errorf("%w; dropped our copy", cause)
	case dstInDoubt:
		resolve := ""
		if rec, err := d.sv.Store.Load(d.name); err == nil && rec.Migration != nil {
			resolve = rec.Migration.Resolve
		}
		return fmt.Errorf("%w: %w; %s held frozen here (%s)", ErrInDoubt, cause, d.name, resolve)
	}
	return fmt.Errorf("the migration stopped while %s: %w", d.m.st, cause)
}

// sayPrepared tells the source that the restore is up and waits for the
// checkpoint (since t0, the offer's answer).
func (sv *Server) sayPrepared(c *conn, t0 time.Time, log *slog.Logger) {
	took := time.Since(t0)
	log.Debug("prepared for the checkpoint", "took", took)
	_ = c.send(&pb.Envelope{Msg: &pb.Envelope_Prepared{Prepared: &pb.Prepared{TookNs: int64(took)}}}, stepTimeout)
}

// restoreHeld restores ropts held frozen, sending the source heartbeats
// meanwhile; the machine's noteHeld then records what the copy is.
func (sv *Server) restoreHeld(ctx context.Context, c *conn, nc net.Conn, ropts restore.Options) (*job.Record, time.Duration, error) {
	ropts.Stopped = true
	// The record says what the copy is from its creation, before CRIU
	// runs: a serve killed while it restores leaves no frozen copy
	// unexplained (a restarted serve recovers it as in doubt).
	ropts.Migration = sv.newNote(ropts.Name, nc, stateHeld, heldNote(ropts.LazyPages))
	rctx, cancel := context.WithTimeout(ctx, restoreTimeout)
	defer cancel()
	rctx, giveUp := context.WithCancelCause(rctx)
	defer giveUp(nil)
	t0 := time.Now()
	hooked := false
	ropts.BeforeStart = func(ctx context.Context) error {
		hooked = true
		return sv.hook(ctx, "pre-restore", ropts.Name, nc.RemoteAddr().String())
	}
	// The source, which holds its job frozen meanwhile, hears that we are
	// at work: it gives up on a destination that goes silent. Once we
	// have heard nothing for so long that it must have, the restore ends
	// (its copy can never be the job).
	stopBeat, gaveUp := beat(c)
	go func() {
		select {
		case <-gaveUp:
			giveUp(fmt.Errorf("%w: it has given up on this migration", errSourceSilent))
		case <-rctx.Done():
		}
	}()
	rec, err := restore.Job(rctx, sv.Store, ropts)
	stopBeat()
	if cause := context.Cause(rctx); err != nil && errors.Is(cause, errSourceSilent) {
		err = fmt.Errorf("%w (%w)", cause, err)
	}
	if err != nil {
		if hooked {
			_ = sv.hook(context.WithoutCancel(ctx), "discarded", ropts.Name, nc.RemoteAddr().String())
		}
		return nil, 0, err
	}
	return rec, time.Since(t0), nil
}

// errSourceSilent ends a restore whose source has gone silent.
var errSourceSilent = errors.New("the source went silent while we restored")

// start thaws our held copy: from here it is the job.
func (sv *Server) start(ctx context.Context, name string, nc net.Conn) error {
	if err := sv.Store.Thaw(ctx, name); err != nil {
		return err
	}
	if err := sv.hook(ctx, "running", name, nc.RemoteAddr().String()); err != nil {
		sv.log().Warn("the running hook failed", "job", name, "err", err)
	}
	return nil
}

// hookTimeout bounds one run of the hook.
const hookTimeout = 30 * time.Second

// hook runs sv.Hook for event, if there is one, telling it the peer's
// address; its output goes to the log.
func (sv *Server) hook(ctx context.Context, event, name, peer string) error {
	if sv.Hook == "" {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, hookTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, sv.Hook, event, name)
	cmd.Env = append(os.Environ(), "FERRY_PEER="+peer)
	cmd.WaitDelay = time.Second
	out, err := cmd.CombinedOutput()
	if err != nil {
		msg := strings.TrimSpace(string(out))
		if i := strings.LastIndexByte(msg, '\n'); i >= 0 {
			msg = msg[i+1:]
		}
		return fmt.Errorf("hook %s %s: %w: %s", event, name, err, msg)
	}
	return nil
}

// reportRestored tells the source that job name was restored in d.
func (sv *Server) reportRestored(c *conn, name string, d time.Duration) error {
	return c.send(&pb.Envelope{Msg: &pb.Envelope_Restored{Restored: &pb.Restored{Name: name, RestoreNs: int64(d)}}}, stepTimeout)
}

// authenticate opens the secure link with a source (see
// serverHandshake) before anything of a job is accepted, and tells the
// source what this host can do.
func (sv *Server) authenticate(nc net.Conn) (*conn, error) {
	host, _ := os.Hostname()
	caps := &pb.Capabilities{LazyPages: sv.Caps.LazyPages, SoftDirty: sv.Caps.SoftDirty, EarlyRestore: true, Prepares: true}
	return sv.serverHandshake(nc, &pb.Hello{Version: ProtocolVersion, Host: host, Capabilities: caps})
}

func (sv *Server) answerSession(c *conn, name string, session []byte) {
	_ = c.send(&pb.Envelope{Msg: &pb.Envelope_Answer{Answer: &pb.Answer{Ok: true, Name: name, Session: session}}}, stepTimeout)
}

func (sv *Server) answer(c *conn, ok bool, reason, name string) {
	_ = c.send(&pb.Envelope{Msg: &pb.Envelope_Answer{Answer: &pb.Answer{Ok: ok, Reason: reason, Name: name}}}, stepTimeout)
}

// drop ends our copy of job name (migrated from peer) and forgets it,
// then runs the discarded hook. It fails only if the copy may still be
// there. A copy that a dead serve restored by post-copy takes that
// serve's lazy-pages daemon with it: the daemon waited for pages rather
// than end (restore.StartLazyPages), and nothing else would end it
// (Recover's drop of a copy that ran, and a settle's of one still held).
func (sv *Server) drop(ctx context.Context, name, peer string, log *slog.Logger) error {
	owner, lazyDir := 0, ""
	if rec, err := sv.Store.Load(name); err == nil && rec.Migration != nil {
		owner = rec.Migration.Owner
		if rec.RestoreLazy {
			lazyDir = rec.RestoreFrom
		}
	}
	if err := sv.Store.Discard(ctx, name, log); err != nil {
		log.Error("dropping our copy", "job", name, "err", err)
		return err
	}
	if err := sv.Store.Remove(name); err != nil {
		log.Error("removing our copy's record", "job", name, "err", err)
	}
	if lazyDir != "" && owner > 0 && owner != os.Getpid() && !alive(owner) {
		if pids := restore.EndLazyPagesIn(lazyDir); len(pids) > 0 {
			log.Info("ended the lazy-pages daemon a dead serve left", "job", name, "pids", pids)
		}
	}
	if err := sv.hook(context.WithoutCancel(ctx), "discarded", name, peer); err != nil {
		log.Error("the discarded hook failed", "err", err)
	}
	return nil
}

// newNote is a destination's note on job name: where its migration
// stands (state) and what the copy is (format takes the peer).
func (sv *Server) newNote(name string, nc net.Conn, state, format string) *job.MigrationNote {
	peer := nc.RemoteAddr().String()
	return &job.MigrationNote{Peer: peer, Role: "destination", State: state, Owner: os.Getpid(), Time: time.Now().UTC(),
		Note:    fmt.Sprintf(format, peer),
		Resolve: fmt.Sprintf("if %s no longer runs on %s: ferry thaw %s; if it does: ferry kill %s", name, peer, name, name)}
}

// heldNote is the note of a copy held frozen for the source's word.
func heldNote(postCopy bool) string {
	if postCopy {
		return "restored from %s (post-copy) and held frozen until the source commits"
	}
	return "restored from %s and held frozen until the source confirms its copy is gone"
}

// errNoted ends an Update that would write what the record says already.
var errNoted = errors.New("noted already")

// noteUnlessNoted is note, but writes nothing where job name's record
// holds that note already (from this process; its time aside): it is
// durable since it was written.
func (sv *Server) noteUnlessNoted(name string, nc net.Conn, state, format string) {
	note := sv.newNote(name, nc, state, format)
	_, err := sv.Store.UpdateLive(name, func(r *job.Record) error {
		if n := r.Migration; n != nil && n.Role == note.Role && n.State == note.State && n.Owner == note.Owner &&
			n.Peer == note.Peer && n.Note == note.Note && n.Resolve == note.Resolve {
			return errNoted
		}
		r.Migration = note
		return nil
	})
	if err != nil && !errors.Is(err, errNoted) {
		sv.log().Error("recording the migration's state", "job", name, "state", state, "err", err)
	}
}

// note records in job name's record where its migration stands (state)
// and why it is held frozen (format takes the peer) and how to settle
// it; Thaw clears it.
func (sv *Server) note(name string, nc net.Conn, state, format string) *job.MigrationNote {
	note := sv.newNote(name, nc, state, format)
	_, _ = sv.Store.UpdateLive(name, func(r *job.Record) error { r.Migration = note; return nil })
	return note
}
