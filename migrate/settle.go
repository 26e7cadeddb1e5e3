package migrate

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"

	"github.com/ferry-cr/ferry/internal/job"
	pb "github.com/ferry-cr/ferry/proto"
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
	if rec.InitAlive() {
		if v := s.Inspect(rec); v.State != "frozen" {
			return nil, fmt.Errorf("job %q is %s here, not frozen: settle it by hand (%s)", name, v.State, rec.Migration.Resolve)
		}
		st.Source = "frozen"
	}
	c, _, err := connect(ctx, opts)
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
	switch {
	case st.Source == "ended" && st.Destination == "running":
		st.Outcome = "the job runs on " + opts.To
		return st, clear()
	case st.Source == "ended":
		st.Outcome = "the job is lost: it ended here and " + opts.To + " holds no copy"
		return st, fmt.Errorf("%w: %s", ErrInDoubt, st.Outcome)
	case st.Destination == "running":
		if err := s.EndAs(ctx, name, "migrated", log); err != nil {
			return nil, fmt.Errorf("the job runs on %s, but ending the frozen copy here: %w", opts.To, err)
		}
		st.Outcome = "the job runs on " + opts.To + "; the frozen copy here was ended"
		return st, clear()
	default: // dropped, none: ours is the only copy
		if err := s.Thaw(ctx, name); err != nil {
			return nil, fmt.Errorf("%s holds no copy, but thawing ours: %w", opts.To, err)
		}
		st.Outcome = "the job runs on here (" + opts.To + " holds no copy)"
		return st, nil
	}
}

// settle answers a source's Settle: by the handover's rules, a held copy
// (frozen, in doubt) runs if the source ended its own and is dropped if
// the source holds its own whole; a copy that runs stays the job.
func (sv *Server) settle(ctx context.Context, c *conn, nc net.Conn, m *pb.Settle, log *slog.Logger) error {
	name := m.GetJob()
	if err := job.ValidateName(name); err != nil {
		return err
	}
	state := "none"
	if rec, err := sv.Store.Load(name); err == nil && rec.InitAlive() {
		v := sv.Store.Inspect(rec)
		held := v.State == "frozen" && rec.Migration != nil && rec.Migration.Role == "destination"
		switch {
		case !held:
			state = "running"
		case m.GetSource() == "ended":
			if err := sv.start(ctx, name, nc); err != nil {
				return fmt.Errorf("settling %s: starting our copy: %w", name, err)
			}
			state = "running"
		default:
			sv.drop(ctx, name, nc, log)
			state = "dropped"
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
