package job

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferry-cr/ferry/freezer"
	"github.com/ferry-cr/ferry/internal/cgroup"
	"github.com/ferry-cr/ferry/internal/lease"
	"github.com/ferry-cr/ferry/internal/proc"
)

const (
	// DefaultGrace is how long Kill waits after SIGTERM before SIGKILL.
	DefaultGrace = 10 * time.Second
	// pollInterval paces the waits below on process and record state.
	pollInterval = 20 * time.Millisecond
	// shimRecordTimeout bounds how long Kill waits for the shim to record
	// the exit before recording it itself.
	shimRecordTimeout = 5 * time.Second
	// startLetGoTimeout bounds how long Kill waits, after killing what a
	// start in progress has put in the job's cgroup, for the ferry or the
	// shim behind that start to give up on it.
	startLetGoTimeout = 15 * time.Second
	// cgroupTimeout bounds killing what is left in a cgroup and removing it.
	cgroupTimeout = 15 * time.Second
)

// Errors of Forget, with the job's name (NameError).
var (
	ErrRunning  = errors.New("still running")
	ErrStarting = errors.New("still starting")
)

// errSettled has an update return without saving: the record had moved on.
var errSettled = errors.New("record settled meanwhile")

// InitAlive reports whether the job's init is still the process ferry
// started (pid and start time match) and has not exited.
func (r *Record) InitAlive() bool {
	return r.Status == Running && proc.Alive(r.InitPID, r.InitStart)
}

// Stale reports whether the record was abandoned mid-start: it still says
// "starting" but the process that created it (ferry run, restore, serve)
// and the shim that process spawned are both gone, so no one will ever
// finish the start or undo it. A record without an owner (written by an
// older ferry) counts as stale once it has no live shim either.
func (r *Record) Stale() bool {
	return r.Status == Starting && !proc.Alive(r.OwnerPID, r.OwnerStart) &&
		(r.ShimStart == 0 || !proc.Alive(r.ShimPID, r.ShimStart))
}

// OpenCgroup opens the job's cgroup.
func (r *Record) OpenCgroup() (*cgroup.Cgroup, error) {
	if r.Cgroup == "" {
		return nil, fmt.Errorf("job %q has no cgroup", r.Name)
	}
	return cgroup.Open(r.Cgroup)
}

// running loads job name and checks that its init is alive.
func (s *Registry) running(name string) (*Record, error) {
	rec, err := s.Load(name)
	if err != nil {
		return nil, err
	}
	if !rec.InitAlive() {
		return rec, &NameError{Name: name, Err: ErrNotRunning}
	}
	return rec, nil
}

// Freeze freezes every task of a running job through its cgroup.
func (s *Registry) Freeze(ctx context.Context, name string) error {
	return s.onCgroup(ctx, name, "freeze", func(cg *cgroup.Cgroup) error { return cg.Freeze(ctx) })
}

// Thaw resumes a frozen job; that settles a migration in doubt.
func (s *Registry) Thaw(ctx context.Context, name string) error {
	if err := s.onCgroup(ctx, name, "thaw", func(cg *cgroup.Cgroup) error { return cg.Thaw(ctx) }); err != nil {
		return err
	}
	_, err := s.UpdateLive(name, func(r *Record) error {
		if r.Migration != nil && r.Migration.State == NoteLazy {
			return nil // the migration that thawed it goes on
		}
		r.Migration, r.Operation = nil, ""
		return nil
	})
	return err
}

// NoteLazy is the MigrationNote.State of a post-copy destination's copy
// that runs while its memory still comes from the source: thawing it
// does not end that migration.
const NoteLazy = "lazy"

// onCgroup runs fn on the cgroup of running job name, under the job's
// lease for op: a job that another operation holds (a checkpoint, a
// migration) is refused with lease.ErrBusy rather than thawed or frozen
// under it.
func (s *Registry) onCgroup(ctx context.Context, name, op string, fn func(*cgroup.Cgroup) error) error {
	rec, err := s.running(name)
	if err != nil {
		return err
	}
	cg, err := rec.OpenCgroup()
	if err != nil {
		return err
	}
	l, err := s.TakeLease(ctx, name, op)
	if err != nil {
		return err
	}
	if l == nil {
		return fn(cg)
	}
	if err := fn(cg); err != nil {
		_ = l.Release()
		return err
	}
	err = l.Commit(lease.Keep, "")
	l.Close()
	return err
}

// TakeLease takes job name's lease for op (see package lease). A job
// whose shim guards no leases (one started by an older ferry) gives a nil
// lease and no error: the caller goes on without one.
func (s *Registry) TakeLease(ctx context.Context, name, op string) (*lease.Lease, error) {
	l, err := lease.Take(ctx, s.LeasePath(name), op)
	switch {
	case errors.Is(err, lease.ErrNoGuard):
		return nil, nil
	case err != nil:
		return nil, &NameError{Name: name, Err: err}
	}
	return l, nil
}

// Kill ends a job: SIGTERM to its init (which forwards it to the command),
// SIGKILL to the whole cgroup after grace, then waits for the shim to
// record the exit and removes the cgroup. The record is kept, as exited.
func (s *Registry) Kill(ctx context.Context, name string, grace time.Duration, log *slog.Logger) error {
	if log == nil {
		log = slog.Default()
	}
	rec, err := s.running(name)
	if err != nil {
		if errors.Is(err, ErrNotRunning) && rec != nil && rec.Status == Starting {
			return s.killStart(ctx, rec, grace, log)
		}
		if errors.Is(err, ErrNotRunning) && rec != nil && rec.Status == Running {
			// Init gone but the record was never closed (shim killed,
			// host rebooted): close it now.
			return s.markGone(ctx, rec, "lost", log)
		}
		return err
	}
	if _, err := s.Update(name, func(r *Record) error {
		if r.Exit == nil {
			r.Exit = &ExitStatus{}
		}
		r.Exit.Reason = "killed"
		return nil
	}); err != nil {
		return err
	}
	cg, err := rec.OpenCgroup()
	if err != nil {
		return err
	}
	// A frozen job would hold the signal pending until thawed (and on
	// cgroup v1 even SIGKILL waits): thaw first.
	if err := cg.Thaw(ctx); err != nil {
		log.Warn("thawing before kill", "job", name, "err", err)
	}
	if err := unix.Kill(rec.InitPID, unix.SIGTERM); err != nil && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("signalling job %q: %w", name, err)
	}
	if !waitFor(ctx, grace, func() bool { return !proc.Alive(rec.InitPID, rec.InitStart) }) {
		log.Info("job ignored SIGTERM, sending SIGKILL", "job", name, "grace", grace)
		kctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		if err := cg.Kill(kctx); err != nil {
			return fmt.Errorf("killing job %q: %w", name, err)
		}
	}
	return s.markGone(ctx, rec, "killed", log)
}

// killStart ends a job that is not running yet. A start in progress (its
// owner or its shim alive) is ended by killing what it has put in the
// job's cgroup; Kill then waits for the start to fail and be undone, or
// to turn stale. What a start abandoned is cleared (clearAbandoned) and
// the record kept, as exited.
func (s *Registry) killStart(ctx context.Context, rec *Record, grace time.Duration, log *slog.Logger) error {
	if !rec.Stale() {
		kctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cgroupTimeout)
		err := killOwnCgroup(kctx, rec)
		cancel()
		if err != nil {
			return err
		}
		waitFor(ctx, startLetGoTimeout, func() bool {
			r, err := s.Load(rec.Name)
			return err != nil || r.ID != rec.ID || r.Status != Starting || r.Stale()
		})
	}
	running := false
	_, err := s.Update(rec.Name, func(r *Record) error {
		switch {
		case r.ID != rec.ID || r.Status == Exited:
			return errSettled // undone, or ended
		case r.Status == Running:
			running = true // started after all
			return errSettled
		case !r.Stale():
			return &NameError{Name: r.Name, Err: ErrStarting}
		}
		return s.clearAbandoned(ctx, r, log)
	})
	switch {
	case running:
		return s.Kill(ctx, rec.Name, grace, log)
	case errors.Is(err, errSettled), errors.Is(err, ErrNotFound):
		return nil
	}
	return err
}

// clearAbandoned clears what an abandoned start (Record.Stale) left: it
// kills whatever is left in the job's cgroup, removes the cgroup, and
// marks rec exited ("start abandoned"). The caller holds the job's lock
// and saves rec.
func (s *Registry) clearAbandoned(ctx context.Context, rec *Record, log *slog.Logger) error {
	if err := dropOwnCgroup(ctx, rec); err != nil {
		return err
	}
	log.Info("cleared a start that was abandoned", "job", rec.Name, "owner", rec.OwnerPID, "shim", rec.ShimPID)
	rec.Status = Exited
	rec.Exit = &ExitStatus{Time: time.Now().UTC(), Reason: ReasonAbandoned}
	return nil
}

// Forget removes a job that does not run: its record and log, and its
// cgroup with whatever is left in it should something have left it (an
// abandoned start, a shim killed before it cleaned up). A job whose init
// lives is refused (ErrRunning), and so is a start in progress
// (ErrStarting).
func (s *Registry) Forget(ctx context.Context, name string, log *slog.Logger) error {
	_, err := s.Update(name, func(r *Record) error {
		switch {
		case r.InitAlive():
			return &NameError{Name: name, Err: ErrRunning}
		case r.Status == Starting && !r.Stale():
			return &NameError{Name: name, Err: ErrStarting}
		}
		if err := dropOwnCgroup(ctx, r); err != nil {
			return err
		}
		if r.Status == Starting {
			log.Info("cleared a start that was abandoned", "job", r.Name, "owner", r.OwnerPID, "shim", r.ShimPID)
		}
		if err := s.Remove(name); err != nil {
			return err
		}
		return errSettled
	})
	if errors.Is(err, errSettled) {
		return nil
	}
	return err
}

// ownCgroup opens the job's cgroup, which must be the one ferry made for
// it (ferry/NAME-ID), so that a record never has ferry kill the tasks of
// some other cgroup; nil when the record has none or it is gone.
func ownCgroup(rec *Record) (*cgroup.Cgroup, error) {
	if rec.Cgroup == "" {
		return nil, nil
	}
	cg, err := cgroup.Open(rec.Cgroup)
	if errors.Is(err, freezer.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	id := rec.ID[:min(8, len(rec.ID))]
	if filepath.Base(cg.Path) != rec.Name+"-"+id || filepath.Base(filepath.Dir(cg.Path)) != "ferry" {
		return nil, fmt.Errorf("job %q: its record names cgroup %q, not one ferry made for it: left alone", rec.Name, rec.Cgroup)
	}
	return cg, nil
}

// killOwnCgroup kills every task in the job's own cgroup (ownCgroup).
func killOwnCgroup(ctx context.Context, rec *Record) error {
	cg, err := ownCgroup(rec)
	if cg == nil || err != nil {
		return err
	}
	if err := cg.Kill(ctx); err != nil {
		return fmt.Errorf("killing what is left of job %q: %w", rec.Name, err)
	}
	return nil
}

// dropOwnCgroup kills every task in the job's own cgroup and removes it.
func dropOwnCgroup(ctx context.Context, rec *Record) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cgroupTimeout)
	defer cancel()
	if err := killOwnCgroup(ctx, rec); err != nil {
		return err
	}
	cg, err := ownCgroup(rec)
	if cg == nil || err != nil {
		return err
	}
	if err := cg.Remove(ctx); err != nil {
		return fmt.Errorf("removing the cgroup of job %q: %w", rec.Name, err)
	}
	return nil
}

// markGone waits for the shim to record the job's end; when the shim is
// gone too it records it itself, then makes sure the cgroup is removed.
func (s *Registry) markGone(ctx context.Context, rec *Record, reason string, log *slog.Logger) error {
	recorded := waitFor(ctx, shimRecordTimeout, func() bool {
		r, err := s.Load(rec.Name)
		return err == nil && r.Status == Exited
	})
	if !recorded {
		if _, err := s.Update(rec.Name, func(r *Record) error {
			if r.Status == Exited {
				return nil
			}
			r.Status = Exited
			r.Exit = &ExitStatus{Code: 128 + int(unix.SIGKILL), Signal: "SIGKILL", Time: time.Now().UTC(), Reason: reason}
			return nil
		}); err != nil {
			return err
		}
	}
	if rec.Cgroup != "" {
		removeCgroup(rec.Cgroup, log)
	}
	return nil
}

// waitFor polls cond until it holds, d passes or ctx ends.
func waitFor(ctx context.Context, d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return cond()
		}
		select {
		case <-time.After(pollInterval):
		case <-ctx.Done():
		}
	}
}

// View is a job as `ferry list` shows it: the record plus what the kernel
// says now.
type View struct {
	*Record
	State   string `json:"state"` // running, frozen, freezing, exited, lost, starting, stale
	MainPID int    `json:"mainPid,omitempty"`
	RSS     int64  `json:"rssBytes"`
	Tasks   int    `json:"tasks"`
}

// Inspect reads the live state of a job.
func (s *Registry) Inspect(rec *Record) *View {
	v := &View{Record: rec}
	switch {
	case rec.Status == Exited:
		v.State = "exited"
		return v
	case rec.Status == Starting && rec.Stale():
		v.State = "stale" // its start was abandoned: see Stale
		return v
	case rec.Status == Starting:
		v.State = "starting"
		return v
	case !rec.InitAlive():
		v.State = "lost"
		return v
	}
	v.State = "running"
	if kids, err := proc.Children(rec.InitPID); err == nil && len(kids) > 0 {
		v.MainPID = kids[0]
	}
	cg, err := rec.OpenCgroup()
	if err != nil {
		return v
	}
	if st, err := cg.State(); err == nil {
		switch st {
		case "FROZEN":
			v.State = "frozen"
		case "FREEZING":
			v.State = "freezing"
		}
	}
	if pids, err := cg.Procs(); err == nil {
		v.Tasks = len(pids)
		for _, p := range pids {
			if n, err := proc.RSS(p); err == nil {
				v.RSS += n
			}
		}
	}
	return v
}

// EndCheckpointed ends a job whose checkpoint is durable: SIGKILL to the
// whole (frozen) cgroup, no SIGTERM, since the job must not run another
// instruction that the checkpoint does not have. The record says
// "checkpointed".
func (s *Registry) EndCheckpointed(ctx context.Context, name string, log *slog.Logger) error {
	return s.endFrozen(ctx, name, "checkpointed", log)
}

// Discard ends a frozen job that must never run again (a migration's
// destination copy whose source resumed): SIGKILL without a thaw.
func (s *Registry) Discard(ctx context.Context, name string, log *slog.Logger) error {
	return s.endFrozen(ctx, name, "discarded", log)
}

// EndAs ends a job like EndCheckpointed, with reason as its record's
// exit reason ("migrated", say).
func (s *Registry) EndAs(ctx context.Context, name, reason string, log *slog.Logger) error {
	return s.endFrozen(ctx, name, reason, log)
}

func (s *Registry) endFrozen(ctx context.Context, name, reason string, log *slog.Logger) error {
	rec, err := s.Update(name, func(r *Record) error {
		if r.Exit == nil {
			r.Exit = &ExitStatus{}
		}
		r.Exit.Reason = reason
		return nil
	})
	if err != nil {
		return err
	}
	kctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	cg, err := rec.OpenCgroup()
	switch {
	case errors.Is(err, freezer.ErrNotExist):
		// Already ended (CRIU kills a migrated tree itself) and its
		// cgroup removed by the shim.
	case err != nil:
		return err
	default:
		if err := cg.Kill(kctx); err != nil {
			return fmt.Errorf("ending job %q: %w", name, err)
		}
	}
	return s.markGone(kctx, rec, reason, log)
}
