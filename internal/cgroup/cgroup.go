package cgroup

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/ferry-cr/ferry/freezer"
	"golang.org/x/sys/unix"
)

const (
	// maxProcsSize bounds a read of cgroup.procs: about a million pids.
	maxProcsSize = 16 << 20

	// killTimeout bounds Kill when ctx has no deadline.
	killTimeout = 10 * time.Second
	// killMaxRounds bounds Kill's rounds of signalling; the deadline
	// normally ends the loop first. One round is the rule: cgroup.kill
	// and a frozen cgroup both keep new tasks from escaping.
	killMaxRounds = 20
	// killSettle is how long one round waits for the signalled tasks to
	// leave cgroup.procs (they do at exit, before their parent reaps
	// them), polling every killPoll. Measured here: a few milliseconds.
	killSettle = 500 * time.Millisecond
	killPoll   = 10 * time.Millisecond
	// killFreezeTimeout bounds the freeze before signalling. If tasks do
	// not freeze in time (a task stuck in D), Kill signals anyway.
	killFreezeTimeout = time.Second

	// removeTimeout bounds Remove when ctx has no deadline; removeRetry
	// is the pause between rmdir attempts and removeMaxIter a backstop.
	// rmdir fails with EBUSY while the kernel still accounts an exiting
	// task; opencontainers/cgroups (utils.go, rmdir/RemovePath) retries
	// for the same reason.
	removeTimeout = 5 * time.Second
	removeRetry   = 10 * time.Millisecond
	removeMaxIter = 1000
)

// Cgroup is one job cgroup.
type Cgroup struct {
	// Path is the cgroup directory, e.g. /sys/fs/cgroup/unified/ferry/job.
	Path string
	// Version is the cgroup version of its freezer: 1 or 2.
	Version int
}

// Create creates the job cgroup <base>/<rel>, where base comes from
// l.FreezerBase. rel is a relative path such as "ferry/job"; missing parents
// are created with mode 0755 (and left in place by Remove). The leaf must
// not exist yet: if it does, the error wraps fs.ErrExist.
func Create(l *Layout, rel string) (*Cgroup, error) {
	if rel == "" || rel == "." || !filepath.IsLocal(rel) || filepath.Clean(rel) != rel {
		return nil, fmt.Errorf("creating cgroup %q: not a clean relative path", rel)
	}
	base, version, err := l.FreezerBase()
	if err != nil {
		return nil, fmt.Errorf("creating cgroup %q: %w", rel, err)
	}
	path := filepath.Join(base, rel)
	if parent := filepath.Dir(path); parent != base {
		if err := os.MkdirAll(parent, 0o755); err != nil {
			return nil, fmt.Errorf("creating cgroup %q: %w", path, err)
		}
	}
	if err := os.Mkdir(path, 0o755); err != nil {
		return nil, fmt.Errorf("creating cgroup %q: %w", path, err)
	}
	return &Cgroup{Path: path, Version: version}, nil
}

// Open returns the Cgroup for an existing cgroup directory, such as a path
// recorded in a job's metadata. The version is read from the directory's
// filesystem (freezer.Version); a missing directory gives an error wrapping
// freezer.ErrNotExist.
func Open(path string) (*Cgroup, error) {
	version, err := freezer.Version(path)
	if err != nil {
		return nil, fmt.Errorf("opening cgroup %q: %w", path, err)
	}
	return &Cgroup{Path: path, Version: version}, nil
}

// AddProc moves the process pid (all its threads) into the cgroup.
func (c *Cgroup) AddProc(pid int) error {
	if pid <= 0 {
		return fmt.Errorf("adding pid %d to cgroup %q: invalid pid", pid, c.Path)
	}
	if err := c.write("cgroup.procs", strconv.Itoa(pid)); err != nil {
		return fmt.Errorf("adding pid %d to cgroup %q: %w", pid, c.Path, err)
	}
	return nil
}

// Procs lists the processes in the cgroup (not in its descendants), as
// cgroup.procs gives them. Zombies are not listed: a task leaves the cgroup
// when it exits, before it is reaped.
func (c *Cgroup) Procs() ([]int, error) {
	f, err := freezer.OpenFile(c.Path, "cgroup.procs", unix.O_RDONLY)
	if err != nil {
		return nil, fmt.Errorf("listing processes of cgroup %q: %w", c.Path, notExist(err))
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxProcsSize+1))
	if err != nil {
		return nil, fmt.Errorf("listing processes of cgroup %q: %w", c.Path, notExist(err))
	}
	if len(data) > maxProcsSize {
		return nil, fmt.Errorf("listing processes of cgroup %q: cgroup.procs larger than %d bytes", c.Path, maxProcsSize)
	}
	var pids []int
	for _, s := range strings.Fields(string(data)) {
		pid, err := strconv.Atoi(s)
		if err != nil {
			return nil, fmt.Errorf("listing processes of cgroup %q: %w", c.Path, err)
		}
		pids = append(pids, pid)
	}
	return pids, nil
}

// Empty reports whether no process is left in the cgroup.
func (c *Cgroup) Empty() (bool, error) {
	pids, err := c.Procs()
	return len(pids) == 0 && err == nil, err
}

// Kill kills every process in the cgroup with SIGKILL and waits until
// cgroup.procs is empty, within ctx's deadline or 10 s. A cgroup that no
// longer exists has nothing to kill: that is success.
//
// On v2 with cgroup.kill (Linux 5.14+) the kernel does it, forks in flight
// included. Otherwise, and always on v1, the cgroup is frozen, every pid
// in cgroup.procs gets SIGKILL, and the cgroup is thawed; freezing first
// keeps tasks from forking past the kill, and the thaw is needed because on
// v1 "killing a process in a frozen cgroup does nothing until it's thawed"
// (runc container_linux.go signalInit; runc signalAllProcesses does the
// same freeze, kill, thaw).
func (c *Cgroup) Kill(ctx context.Context) error {
	ctx, cancel := withDefaultTimeout(ctx, killTimeout)
	defer cancel()
	useKillFile := c.Version == 2 && exists(filepath.Join(c.Path, "cgroup.kill"))
	return c.kill(ctx, useKillFile)
}

func (c *Cgroup) kill(ctx context.Context, useKillFile bool) error {
	for round := range killMaxRounds {
		pids, err := c.Procs()
		if errors.Is(err, freezer.ErrNotExist) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("killing cgroup %q: %w", c.Path, err)
		}
		if slices.Contains(pids, os.Getpid()) {
			return fmt.Errorf("killing cgroup %q: refusing, this process (%d) is in it", c.Path, os.Getpid())
		}
		if len(pids) == 0 {
			if round > 1 {
				slog.DebugContext(ctx, fmt.Sprintf("cgroup emptied after %d rounds", round), "cgroup", c.Path)
			}
			return nil
		}
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("killing cgroup %q: %d processes left: %w", c.Path, len(pids), err)
		}
		if useKillFile {
			if err := c.write("cgroup.kill", "1"); err != nil {
				if errors.Is(err, freezer.ErrNotExist) {
					return nil
				}
				return fmt.Errorf("killing cgroup %q: %w", c.Path, err)
			}
		} else if err := c.freezeKillThaw(ctx); err != nil {
			return fmt.Errorf("killing cgroup %q: %w", c.Path, err)
		}
		c.waitEmpty(ctx, killSettle)
	}
	pids, _ := c.Procs()
	if len(pids) == 0 {
		return nil
	}
	return fmt.Errorf("killing cgroup %q: %d processes left after %d rounds", c.Path, len(pids), killMaxRounds)
}

// freezeKillThaw freezes the cgroup, sends SIGKILL to every process in it and
// thaws it again, also when ctx is done.
func (c *Cgroup) freezeKillThaw(ctx context.Context) (retErr error) {
	fctx, cancel := context.WithTimeout(ctx, killFreezeTimeout)
	ferr := freezer.Freeze(fctx, c.Path)
	cancel()
	if ferr != nil {
		// Freeze has thawed again; signal anyway, as runc does, and let
		// the next round catch what forked meanwhile.
		slog.DebugContext(ctx, "signalling an unfrozen cgroup", "cgroup", c.Path, "error", ferr)
	}
	defer func() {
		tctx, tcancel := context.WithTimeout(context.WithoutCancel(ctx), killFreezeTimeout)
		defer tcancel()
		if err := freezer.Thaw(tctx, c.Path); err != nil && !errors.Is(err, freezer.ErrNotExist) {
			retErr = errors.Join(retErr, err)
		}
	}()
	pids, err := c.Procs()
	if err != nil {
		return err
	}
	for _, pid := range pids {
		// ESRCH: exited since the listing.
		if err := unix.Kill(pid, unix.SIGKILL); err != nil && !errors.Is(err, unix.ESRCH) {
			return os.NewSyscallError("kill", err)
		}
	}
	return nil
}

// waitEmpty polls cgroup.procs until it is empty, d has passed or ctx is
// done.
func (c *Cgroup) waitEmpty(ctx context.Context, d time.Duration) {
	for range int(d / killPoll) {
		if empty, err := c.Empty(); empty || err != nil {
			return
		}
		if sleep(ctx, killPoll) != nil {
			return
		}
	}
}

// Remove removes the cgroup directory, retrying on EBUSY until ctx's
// deadline or 5 s. A cgroup that is already gone counts as removed. The
// cgroup must be empty (see Kill); parents made by Create stay.
func (c *Cgroup) Remove(ctx context.Context) error {
	ctx, cancel := withDefaultTimeout(ctx, removeTimeout)
	defer cancel()
	var err error
	for i := range removeMaxIter {
		err = unix.Rmdir(c.Path)
		if err == nil || errors.Is(err, unix.ENOENT) {
			if i > 1 {
				slog.DebugContext(ctx, fmt.Sprintf("removed after %d retries", i), "cgroup", c.Path)
			}
			return nil
		}
		if !errors.Is(err, unix.EBUSY) && !errors.Is(err, unix.EINTR) {
			break
		}
		if serr := sleep(ctx, removeRetry); serr != nil {
			return fmt.Errorf("removing cgroup %q: %w", c.Path, errors.Join(&os.PathError{Op: "rmdir", Path: c.Path, Err: err}, serr))
		}
	}
	return fmt.Errorf("removing cgroup %q: %w", c.Path, &os.PathError{Op: "rmdir", Path: c.Path, Err: err})
}

// Freeze freezes the cgroup; see freezer.Freeze.
func (c *Cgroup) Freeze(ctx context.Context) error { return freezer.Freeze(ctx, c.Path) }

// Thaw thaws the cgroup; see freezer.Thaw.
func (c *Cgroup) Thaw(ctx context.Context) error { return freezer.Thaw(ctx, c.Path) }

// State returns the cgroup's effective freezer state; see freezer.GetState.
func (c *Cgroup) State() (freezer.State, error) { return freezer.GetState(c.Path) }

// write writes value to the control file name in one write(2).
func (c *Cgroup) write(name, value string) error {
	f, err := freezer.OpenFile(c.Path, name, unix.O_WRONLY)
	if err != nil {
		return notExist(err)
	}
	_, err = f.WriteString(value)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return notExist(err)
}

// notExist adds freezer.ErrNotExist to errors that mean the cgroup is gone:
// ENOENT on open, ENODEV on read or write.
func notExist(err error) error {
	if err != nil && (errors.Is(err, fs.ErrNotExist) || errors.Is(err, unix.ENODEV)) {
		return fmt.Errorf("%w: %w", freezer.ErrNotExist, err)
	}
	return err
}

func withDefaultTimeout(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, d)
}

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
