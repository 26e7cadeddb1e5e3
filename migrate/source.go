package migrate

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"slices"
	"time"

	"github.com/ferry-cr/ferry/dump"
	"github.com/ferry-cr/ferry/internal/job"
	pb "github.com/ferry-cr/ferry/proto"
)

// Options says how to migrate a job.
type Options struct {
	To          string // ADDR:PORT of a `ferry serve`
	Token       []byte
	PKI         PKI // certificates that add to the token (optional)
	Mode        Mode
	MaxDowntime time.Duration
	// Dump is how the job is checkpointed (CRIU, logger, compression,
	// progress); Output, Stream, StreamTo, LeaveRunning and Handover are
	// set by Migrate.
	Dump   dump.Options
	Source Capabilities // what this host can do
	Logger *slog.Logger
}

// Report describes a finished migration.
type Report struct {
	Job        string        `json:"job"`
	To         string        `json:"to"`
	RemoteName string        `json:"remoteName"`
	Mode       Mode          `json:"mode"`
	Reason     string        `json:"reason"`
	Total      time.Duration `json:"totalNs"`
	Downtime   time.Duration `json:"downtimeNs"` // source frozen until the destination runs
	BytesSent  int64         `json:"bytesSent"`
	Throughput float64       `json:"bytesPerSec"`
	LazyPages  int64         `json:"lazyPages"`
	Memory     int64         `json:"memoryBytes"`
}

// ErrInDoubt is a migration whose last step could not be confirmed: the
// job is held frozen on one side and the operator settles it.
var ErrInDoubt = errors.New("migration outcome in doubt")

// Migrate moves job name of store s to the destination in opts.To.
//
// The job runs in at most one place at any moment and a complete copy
// always exists: the source is frozen and checkpointed straight into the
// connection; it is ended only once the destination reports its copy
// restored (and held frozen); the destination thaws its copy only once the
// source reports its own gone. Any failure before that point thaws the
// source and has the destination drop its copy.
func Migrate(ctx context.Context, s *job.Registry, name string, opts Options) (*Report, error) {
	start := time.Now()
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	rec, err := s.Load(name)
	if err != nil {
		return nil, err
	}
	v := s.Inspect(rec)
	if v.State != "running" && v.State != "frozen" {
		return nil, fmt.Errorf("job %q is %s: only a running job can be migrated", name, v.State)
	}
	if opts.Mode == ModePostCopy && rec.Foreign {
		return nil, fmt.Errorf("%w: %w", ErrUnsupportedMode, dump.ErrNoPostCopy)
	}
	// The job's lease, for the whole migration: a job that another
	// operation holds is refused before the destination hears of it, and
	// if this process dies the job's shim gives the job back (or, once
	// the handover committed, ends or keeps it).
	held, err := s.TakeLease(ctx, name, "migrate")
	if err != nil {
		return nil, err
	}
	if held != nil {
		defer held.Close()
	}

	c, hello, err := connect(ctx, opts)
	if err != nil {
		return nil, err
	}
	defer c.c.Close()
	stopConn := context.AfterFunc(ctx, c.cutOff)
	defer stopConn()
	dest := Capabilities{LazyPages: hello.GetCapabilities().GetLazyPages(), SoftDirty: hello.GetCapabilities().GetSoftDirty()}
	src := opts.Source
	if rec.Foreign {
		src.LazyPages = false // see dump.ErrNoPostCopy
	}
	dec, err := chooseFor(opts.Mode, Situation{Source: src, Dest: dest, MemoryBytes: v.RSS, MaxDowntime: opts.MaxDowntime, TCPEstablished: opts.Dump.TCPEstablished})
	if err != nil {
		c.abort(err.Error())
		return nil, err
	}
	rep := &Report{Job: name, To: opts.To, Mode: dec.Mode, Reason: dec.Reason, Memory: v.RSS}
	// A destination that starts its restore from the stream's first record
	// says when it is up; the dump waits for that. In stop-copy it does so
	// only where it restores the stream while it arrives.
	caps := hello.GetCapabilities()
	prepared := caps.GetPrepares() && (dec.Mode == ModePostCopy || caps.GetEarlyRestore())
	if err := c.send(&pb.Envelope{Msg: &pb.Envelope_Offer{Offer: &pb.Offer{
		Job: name, Mode: string(dec.Mode), MemoryBytes: v.RSS, FerryVersion: opts.Dump.FerryVersion,
		WaitPrepared: prepared,
		CriuVersion:  opts.Dump.Criu.Version.String(),
	}}}, stepTimeout); err != nil {
		return nil, fmt.Errorf("offering the job: %w", err)
	}
	m, err := c.recv(stepTimeout)
	if err != nil {
		return nil, fmt.Errorf("waiting for the destination's answer: %w", err)
	}
	if a := m.GetAnswer(); a == nil || !a.GetOk() {
		return nil, fmt.Errorf("%w: %s", ErrRefused, m.GetAnswer().GetReason())
	}

	// Freeze, stream the checkpoint into the connection, and hand over
	// once the destination holds the job (stop-copy), or holds all of it
	// but its memory (post-copy). Every step of the handover is the
	// source machine's (handover.go); d carries out its actions.
	d := &srcDriver{m: source{postCopy: dec.Mode == ModePostCopy}, c: c, reg: s, name: name, to: opts.To, log: log}
	dw := &dataWriter{c: c}
	dopts := opts.Dump
	dopts.Output, dopts.Stream, dopts.StreamTo, dopts.LeaveRunning = "-", true, dw, false
	dopts.EndReason = "migrated"
	dopts.Lease = held
	// The stream goes straight into the destination's restore: every
	// record's CRC-32C guards it on the way, and SHA-256 digests would
	// cost more CPU than the transfer (see image.FlagNoDigests).
	dopts.Image.NoDigests = true
	// A destination that restores as the stream arrives gets the job's
	// memory last, and starts CRIU before it comes (stop-copy).
	dopts.PagesLast = hello.GetCapabilities().GetEarlyRestore()
	var pc *postCopySource
	if dec.Mode == ModePostCopy {
		if pc, err = openPageLink(ctx, opts, c, m.GetAnswer().GetSession(), start, rep, log); err != nil {
			c.abort("the source could not open the page link: " + err.Error())
			return nil, keptHere(ctx, name, err)
		}
		defer pc.close()
		pc.d = d
		pc.keepCtl = func() bool {
			stopped := stopConn()
			c.keep()
			return stopped
		}
		dopts.PostCopy = &dump.PostCopy{Pages: pc.file, Serve: pc.serve}
	}
	if prepared {
		dopts.Prepared = waitPrepared(c, log)
	}
	dopts.Handover = func(ctx context.Context) error {
		if err := dw.close(); err != nil {
			d.feed(inLost)
			return fmt.Errorf("sending the checkpoint: %w", err)
		}
		d.feed(inSent)
		log.Debug("checkpoint sent", "job", name, "bytes", dw.n, "since start", time.Since(start))
		// Heard from at least every peerSilence while it restores (a
		// Prepared the dump did not wait for, from a CRIU without
		// --stream, is skipped too).
		m, err := recvWord(c, restoreTimeout, true)
		if d.feed(inputOf(m, err)).has(commitEnd, commitKeep) {
			rep.RemoteName = m.GetRestored().GetName()
			log.Debug("destination restored", "job", name, "since start", time.Since(start))
			return nil // dump commits the lease: End (stop-copy) or Keep (post-copy)
		}
		if err != nil {
			return fmt.Errorf("waiting for the destination to restore: %w", err)
		}
		return fmt.Errorf("destination answered %T instead of restored", m.GetMsg())
	}
	// From the lease's End on, ours never runs again: the destination
	// may run its copy while ours is still being ended.
	dopts.Committed = func() { d.feed(inCommitted) }
	d.feed(inFrozen)
	res, err := dump.Job(ctx, s, name, dopts)
	if pc != nil {
		return pc.finish(ctx, res, err)
	}
	d.dumped(err)
	if d.m.st == srcGaveBack {
		if ctx.Err() == nil && !dw.closed() {
			// The stream was cut short: the destination may have said why.
			if ab := c.peerAbort(2 * time.Second); ab != nil {
				err = fmt.Errorf("%w (while sending: %w)", ab, err)
			}
		}
		return nil, keptHere(ctx, name, err)
	}
	rep.BytesSent = int64(dw.n)
	if d.m.st == srcCommitted {
		// Gone is sent: let the destination run its copy and say so.
		m, rerr := c.recv(stepTimeout)
		d.feed(inputOf(m, rerr))
		if d.m.st == srcDone {
			rep.Downtime = time.Since(res.FrozenAt)
			rep.Total = time.Since(start)
			if secs := rep.Total.Seconds(); secs > 0 {
				rep.Throughput = float64(rep.BytesSent) / secs
			}
			return rep, nil
		}
		err = firstErr(d.sendErr, rerr, fmt.Errorf("destination answered %T instead of running", m.GetMsg()))
	}
	if d.m.st != srcInDoubt {
		d.feed(inLost) // cannot be: every other end is above
	}
	hint := settleHint(name, opts.To)
	log.Error("migration in doubt", "job", name, "to", opts.To, "err", err)
	if errors.Is(err, dump.ErrKeepStopped) {
		// Handed over, but not ended here: ours stays frozen for good
		// (the lease holds End), and the destination, told Gone, runs
		// its copy unless the word was lost.
		return rep, fmt.Errorf("%w: %w; settle it with: %s", ErrInDoubt, err, hint)
	}
	return rep, fmt.Errorf("%w: %s was ended here and restored on %s, but its start there was not confirmed (%v); settle it with: %s",
		ErrInDoubt, name, opts.To, err, hint)
}

// srcDriver carries out the source machine's actions: messages on the
// control connection and notes in the job's record at once; the verdicts
// on the tree (commit, give back, keep, end) through dump, which acts on
// what Handover and PostCopy.Serve return.
type srcDriver struct {
	m       source
	c       *conn
	reg     *job.Registry
	name    string
	to      string
	log     *slog.Logger
	reason  string // the destination's, when it aborted or dropped its copy
	why     string // ": " and what failed here, for an Abort
	sendErr error  // the first failed send
}

// acts is what one step asked for.
type acts []act

// has says whether any of as was asked for.
func (a acts) has(as ...act) bool {
	for _, x := range a {
		if slices.Contains(as, x) {
			return true
		}
	}
	return false
}

// feed steps the machine with i and carries out what it can of the
// actions here; it returns them all.
func (d *srcDriver) feed(i in) acts {
	before := d.m.st
	out := acts(d.m.step(i))
	d.log.Debug("handover", "side", "source", "job", d.name, "input", i, "from", before, "to", d.m.st, "actions", out)
	for _, a := range out {
		t := time.Now()
		d.do(a)
		d.log.Debug("handover action", "side", "source", "job", d.name, "action", a, "took", time.Since(t))
	}
	return out
}

// do carries out the actions that need no verdict from dump.
func (d *srcDriver) do(a act) {
	send := func(m *pb.Envelope) {
		if err := d.c.send(m, stepTimeout); err != nil && d.sendErr == nil {
			d.sendErr = err
		}
	}
	switch a {
	case sendAbort:
		d.c.abort("the source keeps the job" + d.why)
	case sendGone:
		send(&pb.Envelope{Msg: &pb.Envelope_Gone{Gone: &pb.Gone{}}})
	case sendCommit:
		send(&pb.Envelope{Msg: &pb.Envelope_Commit{Commit: &pb.Commit{}}})
	case noteFrozen:
		d.note(stateFrozen, "frozen here for a move to "+d.to+"; nothing is committed, so it runs on here if the move fails")
	case noteGaveBack:
		d.note(stateFrozen, "runs on here after its move to "+d.to+" failed; "+d.to+" may hold a frozen copy, which settling drops")
	case noteCommitted:
		d.note(stateCommitted, "ended here after "+d.to+" restored it; its start there is not confirmed yet")
	case noteServing:
		d.note(stateServing, "frozen here while its post-copy move to "+d.to+" runs: the destination may run the job")
	case noteInDoubt:
		what := "held frozen here: whether " + d.to + " runs the job or dropped its copy is unknown"
		switch {
		case d.m.ended:
			what = "ended here after " + d.to + " restored it; its start there was not confirmed"
		case d.m.goneSent:
			what = "kept frozen here, never to run again (ending it failed) after " + d.to + " was told to run the job; its start there was not confirmed"
		}
		d.note(stateInDoubt, what)
	case clearNote:
		_, _ = d.reg.UpdateLive(d.name, func(r *job.Record) error { r.Migration = nil; return nil })
	}
}

// note records in the job's record where its migration stands.
func (d *srcDriver) note(state, what string) {
	n := &job.MigrationNote{Peer: d.to, Role: "source", State: state, Owner: os.Getpid(), Time: time.Now().UTC(),
		Note: what, Resolve: settleHint(d.name, d.to)}
	if _, err := d.reg.UpdateLive(d.name, func(r *job.Record) error { r.Migration = n; return nil }); err != nil {
		d.log.Error("recording the migration's state", "job", d.name, "state", state, "err", err)
	}
}

// dumped feeds the machine dump's outcome: err is what dump.Job returned
// once Handover (and post-copy's Serve) had their say.
func (d *srcDriver) dumped(err error) {
	if err != nil {
		d.why = ": " + err.Error()
	}
	switch d.m.st {
	case srcRunning, srcFrozen:
		d.feed(inDumpFailed)
	case srcCommitted, srcServing:
		switch {
		case err == nil:
			d.feed(inEnded)
		case errors.Is(err, dump.ErrKeepStopped):
			d.feed(inEndFailed)
		default:
			// The commit did not land: the lease ran out first, and the
			// guard gave the job back.
			d.feed(inCommitFailed)
		}
	}
}

// firstErr is the first of errs that is not nil.
func firstErr(errs ...error) error {
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// inputOf is the machine's input for a message received (or the error
// of receiving it).
func inputOf(m *pb.Envelope, err error) in {
	var ab *abortError
	switch {
	case errors.As(err, &ab):
		return inAbort
	case err != nil && isTimeout(err):
		return inSilence
	case err != nil:
		return inLost
	case m.GetRestoring() != nil, m.GetPrepared() != nil:
		return inRestoring
	case m.GetRestored() != nil:
		return inRestored
	case m.GetGone() != nil:
		return inGone
	case m.GetCommit() != nil:
		return inCommit
	case m.GetRunning() != nil:
		return inRunning
	case m.GetComplete() != nil:
		return inComplete
	case m.GetDropped() != nil:
		return inDropped
	}
	return inLost // a word that has no place here: the link is no good
}

// keptHere is the error of a migration that failed with the job still
// here; an interruption (ctx) is said to be one, whatever it broke first.
func keptHere(ctx context.Context, name string, err error) error {
	if cerr := ctx.Err(); cerr != nil {
		if errors.Is(err, cerr) {
			return fmt.Errorf("migration interrupted, %s keeps running here: %w", name, err)
		}
		return fmt.Errorf("migration interrupted, %s keeps running here: %w (%w)", name, err, cerr)
	}
	return fmt.Errorf("migration failed, %s keeps running here: %w", name, err)
}

// dial connects to a ferry serve.
func dial(ctx context.Context, to string) (net.Conn, error) {
	d := net.Dialer{Timeout: stepTimeout}
	nc, err := d.DialContext(ctx, "tcp", to)
	if err != nil {
		return nil, fmt.Errorf("connecting to %s: %w", to, err)
	}
	return nc, nil
}

// chooseFor resolves the requested mode in situation sit. A mode the hosts
// or this ferry cannot run is ErrUnsupportedMode, so the caller can tell it
// from a migration that failed.
func chooseFor(want Mode, sit Situation) (Decision, error) {
	d, err := Choose(want, sit)
	if err != nil {
		return Decision{}, fmt.Errorf("%w: %w", ErrUnsupportedMode, err)
	}
	return d, nil
}

// ErrUnsupportedMode is a mode this host or this ferry cannot run.
var ErrUnsupportedMode = errors.New("migration mode unavailable")

// connect dials the destination and opens the secure link (see
// clientHandshake); an interruption (ctx) ends the handshake at once.
func connect(ctx context.Context, opts Options) (*conn, *pb.Hello, error) {
	nc, err := dial(ctx, opts.To)
	if err != nil {
		return nil, nil, err
	}
	stop := context.AfterFunc(ctx, func() { _ = nc.SetDeadline(time.Unix(1, 0)) })
	host, _, _ := net.SplitHostPort(opts.To)
	c, hello, err := clientHandshake(nc, opts.Token, opts.PKI, host)
	if !stop() && err == nil {
		err = ctx.Err()
	}
	if err != nil {
		nc.Close()
		if cerr := ctx.Err(); cerr != nil && !errors.Is(err, cerr) {
			err = fmt.Errorf("%w (%w)", err, cerr)
		}
		return nil, nil, err
	}
	return c, hello, nil
}
