package dump

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferry-cr/ferry/freezer"
	"github.com/ferry-cr/ferry/internal/lease"
	"github.com/ferry-cr/ferry/internal/proc"
)

// stopper is the stage that holds the tree still for its checkpoint and
// decides nothing else: it stops the tree the way the method says, and at
// the end either gives it back exactly as it was (running, or frozen by
// its user; stopped or traced tasks left so) or ends it.
//
// For a job, the stop is a lease (package lease) taken from the job's
// shim before anything is frozen: if this process dies or hangs before
// it commits, the shim gives the job back. The commit (End, or Keep for a
// migration in doubt) is the checkpoint's point of no return; a commit
// refused because the lease ran out fails the checkpoint, and the job,
// already given back, runs on.
type stopper struct {
	t     *target
	how   method
	log   *slog.Logger
	lease *lease.Lease // nil: no guard (a --pid tree, a job whose shim predates leases)

	wasFrozen bool // the user had the job frozen before the checkpoint

	ownLease bool // taken here (not handed in by a migration): closed here

	mu      sync.Mutex
	stopped bool      // the tree stands still because of this checkpoint
	since   time.Time // when it stopped
	lateErr error     // the late freeze's failure
	given   bool      // given back already
	ended   bool      // committed End: the tree is to end
	kept    bool      // committed Keep for good: the tree stays as it is
}

// newStopper takes the job's lease (refusing a job that another
// operation holds) and reads how the tree stands now.
//
// held, when not nil, is a lease the caller took already (a migration
// takes it before it talks to the destination); the caller closes it.
func newStopper(ctx context.Context, t *target, how method, held *lease.Lease, op string, log *slog.Logger) (*stopper, error) {
	s := &stopper{t: t, how: how, log: log, lease: held}
	if held == nil && t.takeLease != nil {
		l, err := t.takeLease(ctx, op)
		if err != nil {
			return nil, err
		}
		s.lease, s.ownLease = l, l != nil
	}
	switch {
	case s.lease != nil:
		s.wasFrozen = s.lease.WasFrozen()
	case t.freezeCg != nil:
		st, err := t.freezeCg.State()
		if err != nil {
			return nil, err
		}
		s.wasFrozen = st == freezer.Frozen || st == freezer.Freezing
	}
	return s, nil
}

// freeze stops the tree before CRIU starts (stopFirst).
func (s *stopper) freeze(ctx context.Context) error {
	at := time.Now()
	if err := s.t.freezeCg.Freeze(ctx); err != nil {
		return fmt.Errorf("freezing %s: %w", s.t.name, err)
	}
	s.frozen(at)
	return nil
}

// freezeLate is the freeze that answers CRIU's pre-dump action
// (stopLate), on another goroutine: from its success on, a failure gives
// the tree back.
func (s *stopper) freezeLate(ctx context.Context) func() error {
	return func() error {
		at := time.Now()
		if err := s.t.freezeCg.Freeze(ctx); err != nil {
			s.mu.Lock()
			s.lateErr = fmt.Errorf("freezing %s: %w", s.t.name, err)
			s.mu.Unlock()
			return err
		}
		s.frozen(at)
		return nil
	}
}

func (s *stopper) frozen(at time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stopped, s.since = true, at
}

// criuReturned records what CRIU's return means for the tree. A CRIU
// that stopped the tree itself (stopByCRIU) and failed has given it back
// already: it resumes what it seized and leaves a cgroup as it found it.
// One that succeeded left it as the method says.
func (s *stopper) criuReturned(err error) {
	if s.how.stop != stopByCRIU {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err == nil && s.how.leaves != leavesRunning {
		s.stopped = true
		if s.since.IsZero() {
			s.since = time.Now()
		}
	}
}

// criuStarted marks the moment CRIU began stopping the tree itself, the
// start of its frozen time when it leaves the tree stopped.
func (s *stopper) criuStarted() {
	if s.how.stop == stopByCRIU {
		s.mu.Lock()
		s.since = time.Now()
		s.mu.Unlock()
	}
}

func (s *stopper) isStopped() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stopped
}

// frozenSince is when the tree stopped (zero if it never did).
func (s *stopper) frozenSince() time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.since
}

// freezeErr is the late freeze's failure, if any.
func (s *stopper) freezeErr() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lateErr
}

// lost says whether the job's guard has given the job back already: this
// process was stopped or hung past the lease's TTL. What CRIU does to the
// tree from then on is no checkpoint of it (the guard thaws it again, and
// CRIU fails or dumps a tree that ran on), and the checkpoint's failure
// is the lease's.
func (s *stopper) lost() error {
	if s.lease != nil && s.lease.Lost() {
		return fmt.Errorf("%s: %w", s.t.name, lease.ErrExpired)
	}
	return nil
}

// retry readies a tree stopped by ferry for one more CRIU try: it lets
// it run a moment (a vfork parent caught waiting for a child frozen
// before its exec then gets past it) and stops it again. A job its user
// had frozen is not thawed for this: there is no retry.
func (s *stopper) retry(ctx context.Context) bool {
	if s.how.stop == stopByCRIU {
		return s.lost() == nil // CRIU gave the tree back; it stops it again
	}
	if !s.isStopped() || s.wasFrozen || s.lost() != nil {
		return false
	}
	if err := s.t.freezeCg.Thaw(ctx); err != nil {
		return false
	}
	time.Sleep(20 * time.Millisecond)
	// The frozen time counts from the first freeze still: the job stood
	// still through the first try.
	if err := s.t.freezeCg.Freeze(ctx); err != nil {
		s.mu.Lock()
		s.stopped = false // running, as a failed checkpoint leaves it
		s.mu.Unlock()
		return false
	}
	return true
}

// giveBack puts the tree back as it was before the checkpoint: the
// cgroup thawed unless its user had it frozen; tasks CRIU left stopped
// continued, except those that were stopped (or traced) before. It is
// what a failed checkpoint and --leave-running end with. A tree
// committed to its end, or kept for the operator, is left alone.
func (s *stopper) giveBack(ctx context.Context, inv *Inventory) error {
	s.mu.Lock()
	stopped, skip := s.stopped, s.given || s.ended || s.kept
	s.given = true
	s.mu.Unlock()
	if skip {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	var err error
	if stopped && s.how.leaves == leavesStopped && s.t.freezeCg == nil {
		err = continueRunning(inv)
	}
	if s.lease != nil {
		// The guard gives the job back as it found it; it does the same
		// if this process dies before it gets here.
		if lerr := s.lease.Release(); lerr == nil {
			return err
		}
	}
	if s.t.freezeCg != nil && !s.wasFrozen && (stopped || s.how.stop == stopByCRIU) {
		err = errors.Join(err, s.t.freezeCg.Thaw(ctx))
	}
	return err
}

// commit is the point of no return: the checkpoint is whole where it was
// sent and the tree is to end (if this process dies first, the guard
// ends it). Refused, the checkpoint must fail: the lease ran out and the
// job was given back. first says that this call committed it (a later
// one finds it committed).
func (s *stopper) commit(reason string) (first bool, err error) {
	s.mu.Lock()
	already := s.ended
	s.ended = true
	s.mu.Unlock()
	if already {
		return false, nil
	}
	if s.lease == nil {
		return true, nil
	}
	if err := s.lease.Commit(lease.End, reason); err != nil {
		s.mu.Lock()
		s.ended = false
		s.mu.Unlock()
		return false, fmt.Errorf("%s: %w", s.t.name, err)
	}
	return true, nil
}

// hold tells the guard to keep the tree frozen should this process die
// (a post-copy destination may run its copy from now on), while this
// process may still end the tree or give it back.
func (s *stopper) hold(note string) error {
	if s.lease == nil {
		return nil
	}
	return s.lease.Commit(lease.Keep, note)
}

// keep leaves the tree frozen for the operator, for good (a migration in
// doubt).
func (s *stopper) keep(note string) error {
	s.mu.Lock()
	s.kept = true
	s.mu.Unlock()
	return s.hold(note)
}

// close ends a lease taken here: uncommitted, the guard gives the job
// back.
func (s *stopper) close() {
	if s.lease != nil && s.ownLease {
		s.lease.Close()
	}
}

// continueRunning sends SIGCONT to the tasks of the tree that CRIU left
// stopped, but not to those that were stopped (or traced) when the walk
// saw them: a task its user stopped, or one stopped under ptrace, stays as
// it was.
func continueRunning(inv *Inventory) error {
	wasStopped := map[int]uint64{}
	for _, task := range inv.Tasks {
		if task.Stopped {
			wasStopped[int(task.Pid)] = task.StartTime
		}
	}
	return signalTree(inv, unix.SIGCONT, func(pid int) bool {
		start, ok := wasStopped[pid]
		return ok && proc.Alive(pid, start)
	})
}
