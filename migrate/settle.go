package migrate

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferry-cr/ferry/internal/job"
	pb "github.com/ferry-cr/ferry/proto"
	"github.com/ferry-cr/ferry/restore"
)

// Settling a migration in doubt. A migration whose last word was lost
// leaves each side's copy as handover.go's rules say, recorded in the
// job's record (job.MigrationNote). Where one side's state decides, the
// source settles it with the destination without an operator: Settle
// tells the destination what the source's copy is, and the destination
// answers with what its own is after applying the same rules:
//
//	source ended   (stop-copy, committed)  destination held  -> it runs its copy
//	source frozen  (post-copy, kept)        destination held  -> it drops its copy (it never ran); the source's runs
//	source frozen                           destination runs  -> the source ends its copy
//	source frozen                           destination none  -> the source's runs
//	source ended                            destination none  -> the job is lost: said so, nothing to do
//
// `ferry migrate JOB --to ADDR` of a job in doubt on the source settles it.

// Settlement is what settling did.
type Settlement struct {
	Job         string `json:"job"`
	To          string `json:"to"`
	Source      string `json:"source"`      // the source's copy before: "ended" or "frozen"
	Destination string `json:"destination"` // the destination's answer: "running", "dropped" or "none"
	Outcome     string `json:"outcome"`     // what is true now, in words
}

// ErrNoDoubt is a Settle of a job with no migration in doubt here.
var ErrNoDoubt = errors.New("no migration of this job is in doubt here")

// InDoubt says whether job name's record holds a migration in doubt on
// its source side.
func InDoubt(s *job.Registry, name string) bool {
	rec, err := s.Load(name)
	return err == nil && rec.Migration != nil && rec.Migration.Role == "source"
}

// The settle rules, shared by both sides' code and the explorer. The
// source says what its copy is: "ended" (committed), "frozen" (kept in
// doubt, or frozen and nothing committed), or "running" (given back by
// its guard before any commit).

// dstSettles is what the destination does with its copy when a source
// whose copy is src asks: held says it holds a frozen copy for the
// migration, runs that it runs one. It returns its answer and the action
// (thaw, dropCopy, or -1 for none).
func dstSettles(src string, held, runs bool) (string, act) {
	switch {
	case held && src == "ended":
		return "running", thaw // the source's copy is gone: ours is the job
	case held:
		return "dropped", dropCopy // the source's copy is whole: ours never ran
	case runs:
		return "running", -1
	}
	return "none", -1
}

// srcSettles is what the source does with its copy (src) once the
// destination answered dst: clearNote (nothing to do), endCopy, thaw,
// or -1 when the job is lost (ended here, no copy there).
func srcSettles(src, dst string) act {
	switch {
	case src == "ended" && dst == "running":
		return clearNote
	case src == "ended":
		return -1
	case dst == "running":
		if src == "running" {
			return -1 // cannot be: the rules never let both run
		}
		return endCopy
	case src == "running":
		return clearNote
	}
	return thaw
}

// Settle settles the migration of job name, in doubt on this (the
// source) side, with the destination opts.To.
func Settle(ctx context.Context, s *job.Registry, name string, opts Options) (*Settlement, error) {
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	rec, err := s.Load(name)
	if err != nil {
		return nil, err
	}
	if rec.Migration == nil || rec.Migration.Role != "source" {
		return nil, &job.NameError{Name: name, Err: ErrNoDoubt}
	}
	st := &Settlement{Job: name, To: opts.To, Source: "ended"}
	// let go gives the job's lease back, as found (frozen or running),
	// before ours is thawed or ended (each under a lease of its own).
	letGo := func() {}
	if rec.InitAlive() {
		// The job's lease first: a migration still under way holds it
		// (exit 27), and must not be settled under its feet.
		held, err := s.TakeLease(ctx, name, "settle")
		if err != nil {
			return nil, err
		}
		if held != nil {
			letGo = sync.OnceFunc(held.Close)
			defer letGo()
		}
		switch v := s.Inspect(rec); {
		case v.State == "frozen":
			st.Source = "frozen"
		case rec.Migration.State == stateFrozen && v.State == "running":
			st.Source = "running" // its guard gave it back before any commit
		default:
			return nil, fmt.Errorf("job %q is %s here, not frozen: settle it by hand (%s)", name, v.State, rec.Migration.Resolve)
		}
	}
	// The destination the record names first: a later --to may name
	// another port of it, or another host.
	c, _, err := connect(ctx, opts)
	if p := rec.Migration.Peer; p != "" && p != opts.To {
		at := opts
		at.To = p
		if c2, _, err2 := connect(ctx, at); err2 == nil {
			if c != nil {
				c.c.Close()
			}
			c, err, st.To = c2, nil, p
		}
	}
	if err != nil {
		return nil, err
	}
	defer c.c.Close()
	stop := context.AfterFunc(ctx, c.cutOff)
	defer stop()
	if err := c.send(&pb.Envelope{Msg: &pb.Envelope_Settle{Settle: &pb.Settle{Job: name, Source: st.Source}}}, stepTimeout); err != nil {
		return nil, fmt.Errorf("asking the destination: %w", err)
	}
	m, err := c.recv(stepTimeout)
	if err != nil {
		return nil, fmt.Errorf("waiting for the destination's answer: %w", err)
	}
	if m.GetSettled() == nil {
		return nil, fmt.Errorf("the destination answered %T instead of settled", m.GetMsg())
	}
	st.Destination = m.GetSettled().GetState()
	log.Info("settling a migration in doubt", "job", name, "to", opts.To, "source", st.Source, "destination", st.Destination)
	clear := func() error {
		_, err := s.Update(name, func(r *job.Record) error { r.Migration, r.Operation = nil, ""; return nil })
		return err
	}
	letGo()
	switch srcSettles(st.Source, st.Destination) {
	case clearNote:
		if st.Source == "running" {
			st.Outcome = "the job runs on here (" + opts.To + " " + map[bool]string{true: "dropped its copy", false: "holds no copy"}[st.Destination == "dropped"] + ")"
		} else {
			st.Outcome = "the job runs on " + opts.To
		}
		return st, clear()
	case endCopy:
		if err := s.EndAs(ctx, name, "migrated", log); err != nil {
			return nil, fmt.Errorf("the job runs on %s, but ending the frozen copy here: %w", opts.To, err)
		}
		st.Outcome = "the job runs on " + opts.To + "; the frozen copy here was ended"
		return st, clear()
	case thaw:
		if err := s.Thaw(ctx, name); err != nil {
			return nil, fmt.Errorf("%s holds no copy, but thawing ours: %w", opts.To, err)
		}
		st.Outcome = "the job runs on here (" + opts.To + " holds no copy)"
		return st, nil
	}
	if st.Source == "ended" {
		st.Outcome = "the job is lost: it ended here and " + opts.To + " holds no copy"
	} else {
		st.Outcome = "the job runs both here and on " + opts.To + ": end one by hand"
	}
	return st, fmt.Errorf("%w: %s", ErrInDoubt, st.Outcome)
}

// settle answers a source's Settle by dstSettles.
func (sv *Server) settle(ctx context.Context, c *conn, nc net.Conn, m *pb.Settle, log *slog.Logger) error {
	name := m.GetJob()
	if err := job.ValidateName(name); err != nil {
		return err
	}
	held, runs := false, false
	if rec, err := sv.Store.Load(name); err == nil && rec.InitAlive() {
		v := sv.Store.Inspect(rec)
		held = v.State == "frozen" && rec.Migration != nil && rec.Migration.Role == "destination"
		runs = !held
	}
	state, a := dstSettles(m.GetSource(), held, runs)
	switch a {
	case thaw:
		if err := sv.start(ctx, name, nc); err != nil {
			return fmt.Errorf("settling %s: starting our copy: %w", name, err)
		}
	case dropCopy:
		// Not dropped, not settled: the source must not run its copy on
		// our word while ours may remain.
		if err := sv.drop(ctx, name, nc.RemoteAddr().String(), log); err != nil {
			return fmt.Errorf("settling %s: dropping our copy: %w", name, err)
		}
	}
	log.Info("settled a migration in doubt", "job", name, "source", m.GetSource(), "ours", state)
	return c.send(&pb.Envelope{Msg: &pb.Envelope_Settled{Settled: &pb.Settled{State: state}}}, stepTimeout)
}

// settleHint is the command that settles a migration of name to to in
// doubt on the source, for the job's record and the error.
func settleHint(name, to string) string {
	return fmt.Sprintf("ferry migrate %s --to %s (with its --token-file); by hand: if %s runs on %s, ferry kill %s here, else ferry thaw %s on whichever host holds it frozen", name, to, name, to, name, name)
}

// Recover is what a serve that starts does with the copies an earlier
// serve left in the middle of a migration, by their records (dstRecover):
// a copy that ran on pages still coming has lost the daemon that brought
// them and is dropped (the source holds its own whole and frozen, and
// settles to it); a held copy stays frozen and is recorded in doubt, for
// the source's settle. It returns what it did, one line a copy.
func (sv *Server) Recover(ctx context.Context) []string {
	log := sv.log()
	recs, err := sv.Store.List()
	if err != nil {
		log.Error("recovering migrations: listing jobs", "err", err)
		return nil
	}
	var did []string
	for _, rec := range recs {
		if d := sv.recoverOne(ctx, rec); d != "" {
			did = append(did, d)
		}
	}
	for _, d := range did {
		log.Warn("recovered a migration that an earlier serve left", "what", d)
	}
	return did
}

// recoverOne is Recover for one record: what it did, or "".
func (sv *Server) recoverOne(ctx context.Context, rec *job.Record) string {
	log := sv.log()
	n := rec.Migration
	if n == nil || n.Role != "destination" || n.Owner > 0 && alive(n.Owner) {
		return "" // none, or another serve's still at work
	}
	if rec.Stale() {
		// A restore the dead serve was running: nothing of it is
		// the job (the source never heard Restored).
		if sv.clearAbandoned(ctx, rec) != nil {
			return ""
		}
		return rec.Name + ": its restore was abandoned when serve stopped; cleared"
	}
	if rec.Status == job.Starting {
		// A start still under way, in a shim that gives it up now
		// that its serve is gone (see job.Restorer): recovered once
		// it has (or once it finished, should it have been done).
		go sv.recoverOnceStarted(ctx, rec.Name, rec.ID)
		return rec.Name + ": its restore was under way when serve stopped; recovered once its shim ends it (given up, as a rule)"
	}
	if !rec.InitAlive() {
		// No copy is left (it died, or its start was abandoned and
		// is swept): the note would say otherwise.
		_, _ = sv.Store.Update(rec.Name, func(r *job.Record) error { r.Migration = nil; return nil })
		return rec.Name + ": its copy was gone; the note is cleared"
	}
	switch dstRecover(n.State) {
	case dropCopy:
		if sv.drop(ctx, rec.Name, n.Peer, log) != nil {
			return ""
		}
		return rec.Name + ": dropped (its memory was still coming from " + n.Peer + " when serve stopped)"
	case noteInDoubt:
		if n.State == stateInDoubt {
			return ""
		}
		_, _ = sv.Store.Update(rec.Name, func(r *job.Record) error {
			if r.Migration != nil {
				r.Migration.State = stateInDoubt
				r.Migration.Note = "restored from " + n.Peer + " and held frozen; serve stopped before the source's word, so whether the source ended its copy is unknown"
			}
			return nil
		})
		return rec.Name + ": held frozen, in doubt until the source settles it"
	}
	return ""
}

// recoverOnceStarted waits (a bounded time) until the start of job name
// (record id), whose serve died, has ended in its shim, and then
// recovers it as Recover would have: a start given up is cleared, one
// that finished just as its serve died is held in doubt.
func (sv *Server) recoverOnceStarted(ctx context.Context, name, id string) {
	log := sv.log()
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for deadline := time.Now().Add(2 * time.Minute); time.Now().Before(deadline); {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		rec, err := sv.Store.Load(name)
		if err != nil || rec.ID != id {
			return // cleared meanwhile
		}
		if rec.Status == job.Starting && !rec.Stale() {
			continue
		}
		if d := sv.recoverOne(ctx, rec); d != "" {
			log.Warn("recovered a migration that an earlier serve left", "what", d)
		}
		return
	}
	log.Error("recovering a migration: a restore that an earlier serve left is still under way", "job", name)
}

// clearAbandoned clears the record of a restore that a dead serve
// abandoned (rec.Stale): whatever is left in its cgroup, then the
// lazy-pages daemon that waited to serve that tree.
func (sv *Server) clearAbandoned(ctx context.Context, rec *job.Record) error {
	log := sv.log()
	if err := sv.Store.Forget(ctx, rec.Name, log); err != nil {
		log.Error("recovering a migration: clearing an abandoned restore", "job", rec.Name, "err", err)
		return err
	}
	if rec.RestoreLazy {
		restore.EndLazyPagesIn(rec.RestoreFrom)
	}
	return nil
}

// alive says whether process pid exists.
func alive(pid int) bool {
	return unix.Kill(pid, 0) == nil || errors.Is(unix.Kill(pid, 0), unix.EPERM)
}
