package freezer

import (
	"context"
	"fmt"
	"log/slog"
	"time"
)

// The v1 freeze loop of opencontainers/cgroups fs/freezer.go (FreezerGroup.Set),
// bounded by the context's deadline instead of a fixed 1000 attempts.
const (
	// v1MaxIter is a backstop only: the deadline ends the loop first. Every
	// 50th iteration sleeps v1ThawPause, so 100000 iterations take at least
	// 20 s, twice DefaultTimeout.
	v1MaxIter = 100_000
	// v1ThawEvery and v1ThawPause: every 50th attempt writes THAWED and
	// sleeps 10 ms, letting tasks that race to fork or to join the cgroup
	// settle. With "runc exec" running in parallel with pause/resume this
	// took freeze failures from 40 per minute to 0, using at most 150
	// attempts (runc d1007b08a; numbers found by experiment there).
	v1ThawEvery = 50
	v1ThawPause = 10 * time.Millisecond
	// v1SlowVMEvery and v1SlowVMPause: every 25th attempt sleeps 10 µs
	// before reading back, which helps on very slow VMs (runc 524abc59f).
	v1SlowVMEvery = 25
	v1SlowVMPause = 10 * time.Microsecond
	// v1ThawMaxIter and v1ThawRetryPause bound Thaw's read-back. The v1
	// thaw is synchronous in the kernel (freezer_apply_state thaws every
	// task before the write returns), so one attempt is the rule.
	v1ThawMaxIter    = 1000
	v1ThawRetryPause = time.Millisecond
)

// freezeV1 freezes a v1 cgroup. It returns the last state read.
//
// FROZEN is written on every attempt, not only once: a task that forks or
// joins the cgroup while it freezes leaves it in FREEZING until FROZEN is
// written again (runc acb93c9c6, runc #1609). The state is read from
// freezer.state directly, never through GetState, which in runc hid
// FREEZING and made the loop hang (runc 76ae1f5c3, PR #2774). The old
// kernel doc says that while FREEZING userspace must either retry FROZEN or
// cancel with THAWED (quoted in runc PR #2767); tasks stuck in a real
// uninterruptible wait never reach the refrigerator however long one waits
// (lxc PR #4346), which is why Freeze thaws on failure.
func freezeV1(ctx context.Context, dir string) (State, error) {
	state := Undefined
	for i := range v1MaxIter {
		if err := ctx.Err(); err != nil {
			return state, err
		}
		if i%v1ThawEvery == v1ThawEvery-1 {
			if err := writeCgroupFile(dir, v1StateFile, string(Thawed)); err != nil {
				return state, classify(err)
			}
			if err := sleep(ctx, v1ThawPause); err != nil {
				return state, err
			}
		}
		if err := writeCgroupFile(dir, v1StateFile, string(Frozen)); err != nil {
			return state, classify(err)
		}
		if i%v1SlowVMEvery == v1SlowVMEvery-1 {
			time.Sleep(v1SlowVMPause)
		}
		s, err := readTrimmed(dir, v1StateFile)
		if err != nil {
			return state, err
		}
		state = State(s)
		switch state {
		case Freezing:
			continue
		case Frozen:
			if i > 1 {
				slog.DebugContext(ctx, fmt.Sprintf("frozen after %d retries", i), "cgroup", dir)
			}
			return Frozen, nil
		default:
			return state, fmt.Errorf("unexpected state %q while freezing", s)
		}
	}
	return state, errUnableToFreeze
}

// thawV1 writes THAWED and reads freezer.state back until it says THAWED.
func thawV1(ctx context.Context, dir string) error {
	var s string
	for i := range v1ThawMaxIter {
		if err := writeCgroupFile(dir, v1StateFile, string(Thawed)); err != nil {
			return classify(err)
		}
		var err error
		if s, err = readTrimmed(dir, v1StateFile); err != nil {
			return err
		}
		if State(s) == Thawed {
			if i > 1 {
				slog.DebugContext(ctx, fmt.Sprintf("thawed after %d retries", i), "cgroup", dir)
			}
			return nil
		}
		// A child of a frozen cgroup reads FROZEN (or FREEZING) whatever is
		// written to it; freezer.parent_freezing says so. The file exists
		// since Linux 3.13; an error reading it just means "don't know".
		if p, err := readTrimmed(dir, "freezer.parent_freezing"); err == nil && p == "1" {
			return fmt.Errorf("%w (freezer.state %s)", ErrFrozenByAncestor, s)
		}
		if err := sleep(ctx, v1ThawRetryPause); err != nil {
			return fmt.Errorf("freezer.state still %s: %w", s, err)
		}
	}
	return fmt.Errorf("freezer.state still %s after %d attempts", s, v1ThawMaxIter)
}

// stateV1 maps freezer.state to a State. Unlike runc's GetState it neither
// loops on FREEZING nor reads freezer.self_freezing: FROZEN is Frozen even
// when only an ancestor froze the cgroup (see the package documentation).
func stateV1(dir string) (State, error) {
	s, err := readTrimmed(dir, v1StateFile)
	if err != nil {
		return Undefined, err
	}
	switch State(s) {
	case Thawed, Freezing, Frozen:
		return State(s), nil
	}
	return Undefined, fmt.Errorf("unexpected freezer.state %q", s)
}
