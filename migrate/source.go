package migrate

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
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
	// but its memory (post-copy).
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
		pc.registry, pc.name = s, name
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
			return fmt.Errorf("sending the checkpoint: %w", err)
		}
		log.Debug("checkpoint sent", "job", name, "bytes", dw.n, "since start", time.Since(start))
		// Heard from at least every peerSilence while it restores (a
		// Prepared the dump did not wait for, from a CRIU without
		// --stream, is skipped too).
		m, err := recvWord(c, restoreTimeout, true)
		if err != nil {
			return fmt.Errorf("waiting for the destination to restore: %w", err)
		}
		r := m.GetRestored()
		if r == nil {
			return fmt.Errorf("destination answered %T instead of restored", m.GetMsg())
		}
		rep.RemoteName = r.GetName()
		log.Debug("destination restored", "job", name, "since start", time.Since(start))
		return nil
	}
	res, err := dump.Job(ctx, s, name, dopts)
	if pc != nil {
		return pc.finish(ctx, s, name, res, err)
	}
	if errors.Is(err, dump.ErrKeepStopped) {
		// Handed over, but not ended here: both copies stay frozen and
		// the operator chooses (the destination keeps its copy when the
		// connection closes without a word).
		note := &job.MigrationNote{Peer: opts.To, Role: "source", Time: time.Now().UTC(),
			Note:    "handed over to " + opts.To + " but not ended here: " + err.Error(),
			Resolve: settleHint(name, opts.To)}
		_, _ = s.Update(name, func(r *job.Record) error { r.Migration = note; return nil })
		return rep, fmt.Errorf("%w: %w; settle it with: %s", ErrInDoubt, err, note.Resolve)
	}
	if err != nil {
		if ctx.Err() == nil && !dw.closed() {
			// The stream was cut short: the destination may have said why.
			if ab := c.peerAbort(2 * time.Second); ab != nil {
				err = fmt.Errorf("%w (while sending: %w)", ab, err)
			}
		}
		// The job runs on here; make sure the destination drops its copy.
		c.abort("the source failed and keeps the job: " + err.Error())
		return nil, keptHere(ctx, name, err)
	}
	rep.BytesSent = int64(dw.n)

	// The source copy is gone: let the destination run its own.
	// (A failed send is the reason reported below, not the nil before it.)
	if err = c.send(&pb.Envelope{Msg: &pb.Envelope_Gone{Gone: &pb.Gone{}}}, stepTimeout); err == nil {
		m, err = c.recv(stepTimeout)
		if err == nil && m.GetRunning() != nil {
			rep.Downtime = time.Since(res.FrozenAt)
			rep.Total = time.Since(start)
			if secs := rep.Total.Seconds(); secs > 0 {
				rep.Throughput = float64(rep.BytesSent) / secs
			}
			return rep, nil
		}
		if err == nil {
			err = fmt.Errorf("destination answered %T instead of running", m.GetMsg())
		}
	}
	note := &job.MigrationNote{Peer: opts.To, Role: "source", Time: time.Now().UTC(),
		Note:    "ended here after " + opts.To + " restored it; its start there was not confirmed",
		Resolve: settleHint(name, opts.To)}
	_, _ = s.Update(name, func(r *job.Record) error { r.Migration = note; return nil })
	log.Error("migration in doubt", "job", name, "to", opts.To, "err", err)
	return rep, fmt.Errorf("%w: %s was ended here and restored on %s, but its start there was not confirmed (%v); settle it with: %s",
		ErrInDoubt, name, opts.To, err, note.Resolve)
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
