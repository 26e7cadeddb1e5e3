package dump

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferry-cr/ferry/freezer"
	"github.com/ferry-cr/ferry/internal/cgroup"
	"github.com/ferry-cr/ferry/internal/lease"
	"github.com/ferry-cr/ferry/internal/proc"
)

// A tree ferry did not start (checkpoint --pid) has no shim to guard its
// lease, so the checkpoint starts a guardian for it: `ferry __guard`, a
// process in a session of its own that holds the other end of the
// lease's connection and outlives the checkpoint if it dies. It serves
// that one lease and exits.

// GuardianArg is argv[1] of the guardian.
const GuardianArg = "__guard"

// guardianLease starts a guardian for the tree rooted at root (cg, if
// not nil, is the cgroup that is exactly the tree) and takes the lease
// from it.
func guardianLease(root int, cg *cgroup.Cgroup, op string) (*lease.Lease, error) {
	st, err := proc.ReadStat(root)
	if err != nil {
		return nil, err
	}
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("starting the tree's guardian: %w", err)
	}
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	ours, theirs := os.NewFile(uintptr(fds[0]), "lease"), os.NewFile(uintptr(fds[1]), "lease")
	defer theirs.Close()
	defer ours.Close()
	cgPath := "-"
	if cg != nil {
		cgPath = cg.Path
	}
	cmd := exec.Command(self, GuardianArg, strconv.Itoa(root), strconv.FormatUint(st.StartTime, 10), cgPath)
	cmd.ExtraFiles = []*os.File{theirs}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true} // Ctrl-C of the checkpoint is not its
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting the tree's guardian: %w", err)
	}
	go func() { _ = cmd.Wait() }() // it exits once the lease ends
	fc, err := net.FileConn(ours)
	if err != nil {
		_ = cmd.Process.Kill()
		return nil, err
	}
	return lease.TakeOver(fc.(*net.UnixConn), op)
}

// GuardianMain is the body of `ferry __guard ROOT START CGROUP`, with the
// lease's connection on fd 3. It returns the exit status.
func GuardianMain(args []string) int {
	if len(args) != 3 {
		return 2
	}
	root, err1 := strconv.Atoi(args[0])
	start, err2 := strconv.ParseUint(args[1], 10, 64)
	if err1 != nil || err2 != nil {
		return 2
	}
	g := &treeGuard{root: root, start: start}
	if args[2] != "-" {
		cg, err := cgroup.Open(args[2])
		if err != nil {
			return 1
		}
		g.cg = cg
	}
	fc, err := net.FileConn(os.NewFile(3, "lease"))
	if err != nil {
		return 1
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil)).With("guardian", os.Getpid(), "tree", root)
	lease.NewGuard(g, log).Handle(context.Background(), fc.(*net.UnixConn))
	return 0
}

// treeGuard is a --pid tree as its guardian sees it.
type treeGuard struct {
	root  int
	start uint64
	cg    *cgroup.Cgroup // nil: CRIU seizes the tasks
	// before is the tree's tasks when the lease was taken: each one's
	// start time, whether it was stopped, and its tracer.
	before map[int]taskState
}

type taskState struct {
	start   uint64
	stopped bool
	tracer  int
}

func (g *treeGuard) tasks() map[int]taskState {
	out := map[int]taskState{}
	if !proc.Alive(g.root, g.start) {
		return out
	}
	pids, _ := tree(g.root)
	for _, pid := range pids {
		st, err := proc.ReadStat(pid)
		if err != nil {
			continue
		}
		out[pid] = taskState{start: st.StartTime, stopped: st.State == 'T' || st.State == 't', tracer: proc.TracerPID(pid)}
	}
	return out
}

func (g *treeGuard) Frozen() (bool, error) {
	g.before = g.tasks()
	if g.cg == nil {
		return false, nil
	}
	st, err := g.cg.State()
	if err != nil {
		return false, err
	}
	return st == freezer.Frozen || st == freezer.Freezing, nil
}

func (g *treeGuard) IsFrozen() (bool, error) {
	if g.cg == nil {
		return false, nil
	}
	if !proc.Alive(g.root, g.start) {
		return false, errors.New("the tree is gone")
	}
	st, err := g.cg.State()
	return st == freezer.Frozen || st == freezer.Freezing, err
}

// GiveBack waits (a minute at most) for a CRIU that outlived the
// checkpoint to let go of the tree (it leaves the tasks stopped, or
// resumes them), then continues the tasks that are stopped now but were
// not before, and thaws the cgroup unless it was frozen before.
func (g *treeGuard) GiveBack(ctx context.Context, wasFrozen bool) error {
	criu := map[int]bool{}
	for pid, now := range g.tasks() {
		if was, ok := g.before[pid]; now.tracer != 0 && (!ok || was.start != now.start || was.tracer != now.tracer) {
			criu[now.tracer] = true
		}
	}
	proc.WaitGone(criu, time.Minute) // CRIU lets go of the tree, leaving it stopped or resumed
	var errs []error
	for pid, now := range g.tasks() {
		if was, ok := g.before[pid]; now.stopped && (!ok || was.start != now.start || !was.stopped) {
			if err := unix.Kill(pid, unix.SIGCONT); err != nil && !errors.Is(err, unix.ESRCH) {
				errs = append(errs, err)
			}
		}
	}
	if g.cg != nil && !wasFrozen {
		errs = append(errs, g.cg.Thaw(ctx))
	}
	return errors.Join(errs...)
}

// End ends a tree whose checkpoint was committed when its checkpoint's
// ferry vanished before it could.
func (g *treeGuard) End(ctx context.Context, _ string) error {
	for pid, now := range g.tasks() {
		if now.start != 0 {
			_ = unix.Kill(pid, unix.SIGKILL)
		}
	}
	if g.cg != nil {
		return g.cg.Thaw(ctx) // frozen v1 tasks take SIGKILL only once thawed
	}
	return nil
}

func (g *treeGuard) Note(string, string) {}
