// Package freezer freezes, thaws and inspects one cgroup directory, with the
// cgroup v1 freezer (freezer.state) or the cgroup v2 one (cgroup.freeze and
// cgroup.events), whichever the directory's filesystem has (see Version).
//
// Freeze waits until every task is frozen, within the context's deadline or
// DefaultTimeout, and thaws again on every failure, so a cgroup is never
// left FROZEN or FREEZING behind the caller's back. The algorithms follow
// opencontainers/cgroups (fs/freezer.go and fs2/freezer.go); the comments
// name the commits behind each retry.
//
// States. GetState reports the effective state, the one that says whether
// the tasks can run:
//
//	v1 freezer.state   v2 cgroup.freeze / cgroup.events   State
//	THAWED             0 / frozen 0                        Thawed
//	FREEZING           1 / frozen 0                        Freezing
//	FROZEN             any / frozen 1                      Frozen
//
// A cgroup frozen only through an ancestor therefore reads Frozen on both
// versions (v1 freezer.self_freezing 0, v2 cgroup.freeze 0). runc reports
// Thawed there instead (runc 294c4866e, matching v2's cgroup.freeze); for a
// checkpoint what matters is whether the tasks run. Thaw notices that case
// and returns ErrFrozenByAncestor rather than waiting in vain.
package freezer

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"
)

// State is a cgroup's freezer state. The zero value means unknown.
type State string

// States reported by GetState and carried by FreezeError.
const (
	Undefined State = ""
	Thawed    State = "THAWED"
	Freezing  State = "FREEZING"
	Frozen    State = "FROZEN"
)

// DefaultTimeout bounds Freeze and Thaw when ctx has no deadline. It is the
// budget runc and CRIU use too (fs2 waitFrozen: 1000 × 10 ms; CRIU
// freeze_processes: at least 10 s).
const DefaultTimeout = 10 * time.Second

// thawTimeout bounds the thaw that Freeze runs after a failure, on a
// context that is no longer cancelled by the caller's (rule: cleanup
// survives cancellation). Thawing takes well under a millisecond on both
// versions (measured on kernel 6.18); 5 s is a generous margin.
const thawTimeout = 5 * time.Second

// Freeze freezes the cgroup dir and waits until all its tasks are frozen.
// It gives up when ctx is done or, if ctx has no deadline, after
// DefaultTimeout. Every failure returns a *FreezeError, wrapping
// ErrNotExist or ErrNotSupported where they apply. Once anything was written
// to the cgroup, a failure thaws it again before returning (also a cgroup
// that was frozen before the call); if that thaw fails too, its error is
// joined to the FreezeError with errors.Join.
func Freeze(ctx context.Context, dir string) (retErr error) {
	version, err := Version(dir)
	if err != nil {
		return &FreezeError{Path: dir, Err: err}
	}
	ctx, cancel := withDefaultTimeout(ctx, DefaultTimeout)
	defer cancel()
	start := time.Now()
	var budget time.Duration
	if deadline, ok := ctx.Deadline(); ok {
		budget = deadline.Sub(start)
	}

	// It is "bad and dangerous to leave the cgroup in FROZEN or FREEZING
	// state" (opencontainers/cgroups fs/freezer.go; runc fcd7fe85e thaws on
	// every error path). The thaw must run even when ctx was cancelled,
	// hence WithoutCancel plus a short timeout of its own.
	defer func() {
		if retErr == nil {
			return
		}
		tctx, tcancel := context.WithTimeout(context.WithoutCancel(ctx), thawTimeout)
		defer tcancel()
		if err := thaw(tctx, dir, version); err != nil {
			if errors.Is(retErr, ErrNotExist) && errors.Is(err, ErrNotExist) {
				return // gone: nothing left to thaw
			}
			retErr = errors.Join(retErr, fmt.Errorf("thawing cgroup %q after failed freeze: %w", dir, err))
		}
	}()

	var state State
	if version == 1 {
		state, err = freezeV1(ctx, dir)
	} else {
		state, err = freezeV2(ctx, dir)
	}
	if err == nil {
		slog.DebugContext(ctx, "cgroup frozen", "cgroup", dir, "version", version, "elapsed", time.Since(start))
		return nil
	}
	fe := &FreezeError{Path: dir, State: state, Err: err}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) ||
		errors.Is(err, errUnableToFreeze) {
		// Collected before the deferred thaw, while the stragglers are
		// still the ones that kept the cgroup from freezing.
		fe.Tasks = unfrozenTasks(dir, version)
	}
	if errors.Is(err, context.DeadlineExceeded) {
		fe.Timeout = budget.Round(time.Millisecond)
	}
	return fe
}

// Thaw thaws the cgroup dir and waits until the kernel reports it thawed,
// within ctx's deadline or DefaultTimeout. It returns an error wrapping
// ErrFrozenByAncestor if the cgroup's own freeze was undone but an ancestor
// keeps it frozen.
func Thaw(ctx context.Context, dir string) error {
	version, err := Version(dir)
	if err != nil {
		return fmt.Errorf("thawing cgroup %q: %w", dir, err)
	}
	ctx, cancel := withDefaultTimeout(ctx, DefaultTimeout)
	defer cancel()
	if err := thaw(ctx, dir, version); err != nil {
		return fmt.Errorf("thawing cgroup %q: %w", dir, err)
	}
	return nil
}

func thaw(ctx context.Context, dir string, version int) error {
	if version == 1 {
		return thawV1(ctx, dir)
	}
	return thawV2(ctx, dir)
}

// GetState returns the effective freezer state of the cgroup dir (see the
// package documentation). It does not wait: a cgroup on its way reads
// Freezing. A missing cgroup gives an error wrapping ErrNotExist, a
// directory without a freezer one wrapping ErrNotSupported.
func GetState(dir string) (State, error) {
	version, err := Version(dir)
	if err != nil {
		return Undefined, fmt.Errorf("reading freezer state of %q: %w", dir, err)
	}
	var state State
	if version == 1 {
		state, err = stateV1(dir)
	} else {
		state, err = stateV2(dir)
	}
	if err != nil {
		return Undefined, fmt.Errorf("reading freezer state of %q: %w", dir, err)
	}
	return state, nil
}

// withDefaultTimeout gives ctx a deadline d from now if it has none.
func withDefaultTimeout(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, d)
}

// sleep waits for d or until ctx is done.
func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// readTrimmed reads a control file and trims surrounding white space.
func readTrimmed(dir, name string) (string, error) {
	data, err := readCgroupFile(dir, name)
	if err != nil {
		return "", classify(err)
	}
	return strings.TrimSpace(string(data)), nil
}
