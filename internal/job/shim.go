package job

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferry-cr/ferry/internal/cgroup"
	"github.com/ferry-cr/ferry/internal/proc"
)

// The shim is the job's supervisor, outside the job's namespaces and
// cgroup, like conmon is for a container: it is the parent of the job's
// init, appends the job's output to the log, records the exit status and
// removes the cgroup when the job ends. Keeping it outside the job matters
// for checkpoints: the job's stdout and stderr are pipes whose reader is
// the shim, which a restore can hand fresh pipes for, instead of a log file
// whose growing size CRIU would refuse at restore.

// shimDrainTimeout bounds how long the shim keeps reading the job's output
// after the init has exited (every writer is in the job's PID namespace,
// which the kernel empties when its init dies).
const shimDrainTimeout = 5 * time.Second

// ShimMain is the body of `ferry __shim ROOT NAME`. fd 3 is the pipe on
// which `ferry run` waits for "ok" or an error line. It returns the shim's
// exit code.
func ShimMain(root, name string, restorer Restorer) int {
	ready := os.NewFile(3, "ready")
	report := func(format string, a ...any) {
		if ready != nil {
			fmt.Fprintf(ready, format+"\n", a...)
			ready.Close()
			ready = nil
		}
	}
	s := &Registry{Root: root}
	logf, err := os.OpenFile(s.ShimLogPath(name), os.O_WRONLY|os.O_APPEND|os.O_CREATE|unix.O_CLOEXEC, 0o600)
	if err != nil {
		report("error: opening shim log: %s", err)
		return 1
	}
	log := slog.New(slog.NewTextHandler(logf, &slog.HandlerOptions{Level: slog.LevelDebug})).With("job", name, "shim", os.Getpid())
	rec, err := s.Load(name)
	if err != nil {
		report("error: %s", err)
		return 1
	}
	var initPID int
	var outR *os.File
	if rec.RestoreFrom != "" && !rec.Foreign {
		initPID, outR, err = restoreInit(s, rec, restorer, log)
	} else {
		initPID, outR, err = startInit(s, rec, log)
	}
	if err == nil && rec.RestoreStopped {
		t := time.Now()
		err = holdFrozen(rec)
		log.Debug("held frozen", "err", err, "took", time.Since(t))
		if err != nil {
			_ = unix.Kill(initPID, unix.SIGKILL)
			var ws unix.WaitStatus
			_, _ = wait4(initPID, &ws)
		}
	}
	if err != nil {
		log.Error("starting job", "err", err)
		report("error: %s", err)
		return 1
	}
	report("ok")
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	guardLeases(ctx, s, rec, initPID, log)
	if p := rec.Snapshots; p != nil && p.Every > 0 {
		go snapshotEvery(ctx, s, name, *p, log)
	}
	return supervise(s, name, initPID, outR, log)
}

// snapshotEvery adds a snapshot of job name to the policy's store every
// p.Every until ctx ends, by running `ferry checkpoint --store` (the same
// binary): a snapshot that fails costs that snapshot only, never the
// shim, and the job runs on.
func snapshotEvery(ctx context.Context, s *Registry, name string, p SnapshotPolicy, log *slog.Logger) {
	self, err := os.Executable()
	if err != nil {
		log.Error("periodic snapshots: finding ferry's binary", "err", err)
		return
	}
	t := time.NewTicker(p.Every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		args := []string{"--root", s.Root, "checkpoint", "--store", p.Store, "--leave-running", name}
		if p.Keep > 0 {
			args = append(args, "--keep", strconv.Itoa(p.Keep))
		}
		cmd := exec.CommandContext(ctx, self, args...)
		// Ended with the job: SIGTERM, not SIGKILL, so that a snapshot
		// still dumping gives up cleanly and one that has committed still
		// applies --keep (the checkpoint prunes before it reports).
		cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
		cmd.WaitDelay = 30 * time.Second
		out, err := cmd.CombinedOutput()
		if err != nil {
			if ctx.Err() != nil {
				return // the job ended meanwhile
			}
			log.Warn("periodic snapshot failed", "err", err, "output", strings.TrimSpace(string(out)))
			continue
		}
		log.Info("periodic snapshot", "output", strings.TrimSpace(string(out)))
	}
}

// startInit forks ferry's init into fresh PID and IPC namespaces, puts it
// into the job's cgroup, lets it start the command and waits for its word
// that the command runs.
func startInit(s *Registry, rec *Record, log *slog.Logger) (initPID int, outR *os.File, retErr error) {
	self, err := os.Executable()
	if err != nil {
		return 0, nil, fmt.Errorf("locating the ferry binary: %w", err)
	}
	cg, err := cgroup.Open(rec.Cgroup)
	if err != nil {
		return 0, nil, err
	}
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		return 0, nil, err
	}
	defer devnull.Close()
	outR, outW, err := os.Pipe()
	if err != nil {
		return 0, nil, err
	}
	defer outW.Close()
	defer func() {
		if retErr != nil {
			outR.Close()
		}
	}()
	goR, goW, err := os.Pipe()
	if err != nil {
		return 0, nil, err
	}
	defer goW.Close()
	defer goR.Close()
	okR, okW, err := os.Pipe()
	if err != nil {
		return 0, nil, err
	}
	defer okR.Close()
	defer okW.Close()

	initPath, argv := self, append([]string{"ferry-init", InitArg}, rec.Command...)
	if small := smallInit(self); small != "" {
		initPath = small
	}
	flags := uintptr(syscall.CLONE_NEWPID | syscall.CLONE_NEWIPC)
	if rec.Foreign && rec.RestoreFrom != "" {
		initPath = self // the Go init restores the tree itself
		// The init restores the tree itself, in a mount namespace of its
		// own where it mounts a /proc of the new PID namespace.
		argv = []string{"ferry-init", InitArg, initRestoreArg, rec.RestoreCriu, rec.RestoreFrom, s.Dir(rec.Name), strconv.FormatBool(rec.RestoreStopped)}
		flags |= syscall.CLONE_NEWNS
	}
	// syscall.ForkExec rather than os/exec: it does not hold a pidfd, and
	// it lets us ask for the new namespaces with plain clone flags.
	pid, err := syscall.ForkExec(initPath, argv, &syscall.ProcAttr{
		Dir:   rec.Dir,
		Env:   os.Environ(),
		Files: []uintptr{devnull.Fd(), outW.Fd(), outW.Fd(), goR.Fd(), okW.Fd()},
		Sys: &syscall.SysProcAttr{
			Setsid:     true,
			Cloneflags: flags,
		},
	})
	if err != nil {
		return 0, nil, fmt.Errorf("starting init: %w", err)
	}
	fail := func(err error) (int, *os.File, error) {
		_ = unix.Kill(pid, unix.SIGKILL)
		var ws unix.WaitStatus
		_, _ = wait4(pid, &ws)
		return 0, nil, err
	}
	goR.Close()
	okW.Close()
	if err := cg.AddProc(pid); err != nil {
		return fail(fmt.Errorf("moving init into cgroup: %w", err))
	}
	if err := s.markRunning(rec.Name, pid); err != nil {
		return fail(err)
	}
	if _, err := goW.Write([]byte("go\n")); err != nil {
		return fail(fmt.Errorf("releasing init: %w", err))
	}
	goW.Close()
	line, _ := bufio.NewReader(okR).ReadString('\n')
	line = strings.TrimSpace(line)
	if line != "ok" {
		if line == "" {
			line = "init exited before starting the command"
		}
		return fail(errors.New(line))
	}
	log.Info("job started", "init", pid, "command", rec.Command)
	return pid, outR, nil
}

// restoreInit has the restorer bring the job's tree back as a child of
// this shim, with a fresh output pipe in place of the one the tree had.
func restoreInit(s *Registry, rec *Record, restorer Restorer, log *slog.Logger) (int, *os.File, error) {
	if restorer == nil {
		return 0, nil, errors.New("this ferry cannot restore")
	}
	cg, err := cgroup.Open(rec.Cgroup)
	if err != nil {
		return 0, nil, err
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		return 0, nil, err
	}
	defer outW.Close()
	ctx := context.Background()
	if rec.Migration != nil && rec.OwnerPID > 0 {
		var cancel context.CancelCauseFunc
		ctx, cancel = context.WithCancelCause(ctx)
		defer cancel(nil)
		stop := cancelWhenGone(rec.OwnerPID, rec.OwnerStart, cancel)
		defer stop()
	}
	t := time.Now()
	pid, err := restorer(ctx, RestoreRequest{Record: rec, Cgroup: cg, Output: outW, WorkDir: s.Dir(rec.Name), Log: log})
	log.Debug("restorer returned", "err", err, "took", time.Since(t))
	if err != nil {
		outR.Close()
		return 0, nil, err
	}
	fail := func(err error) (int, *os.File, error) {
		_ = unix.Kill(pid, unix.SIGKILL)
		var ws unix.WaitStatus
		_, _ = wait4(pid, &ws)
		outR.Close()
		return 0, nil, err
	}
	if err := s.markRunning(rec.Name, pid); err != nil {
		return fail(err)
	}
	log.Info("job restored", "init", pid, "from", rec.RestoreFrom)
	return pid, outR, nil
}

// cancelWhenGone cancels with ErrOwnerGone once the task pid that started
// at start has exited, until stop is called.
func cancelWhenGone(pid int, start uint64, cancel context.CancelCauseFunc) (stop func()) {
	gone, unwatch := proc.Gone(pid, start)
	done := make(chan struct{})
	ended := make(chan struct{})
	go func() {
		defer close(ended)
		select {
		case <-gone:
			cancel(ErrOwnerGone)
		case <-done:
		}
	}()
	return func() {
		close(done)
		<-ended
		unwatch()
	}
}

// markRunning records that this shim supervises init pid of job name,
// with the pid's start time, which guards every later signal against pid
// reuse. The note is live (UpdateLive): a crash of the machine ends the
// job with it, and the record then reads as a start abandoned.
func (s *Registry) markRunning(name string, pid int) error {
	st, err := proc.ReadStat(pid)
	if err != nil {
		return fmt.Errorf("reading init's start time: %w", err)
	}
	_, err = s.UpdateLive(name, func(r *Record) error {
		r.Status = Running
		r.ShimPID = os.Getpid()
		r.InitPID = pid
		r.InitStart = st.StartTime
		return nil
	})
	return err
}

// supervise copies the job's output into its log until the init exits,
// then records how it ended and removes the cgroup.
func supervise(s *Registry, name string, initPID int, outR *os.File, log *slog.Logger) int {
	copied := make(chan struct{})
	go func() {
		defer close(copied)
		logf, err := os.OpenFile(s.LogPath(name), os.O_WRONLY|os.O_APPEND|os.O_CREATE|unix.O_CLOEXEC, 0o600)
		if err != nil {
			log.Error("opening job log", "err", err)
			_, _ = io.Copy(io.Discard, outR)
			return
		}
		defer logf.Close()
		if _, err := io.Copy(logf, outR); err != nil {
			log.Warn("copying job output", "err", err)
		}
	}()
	var ws unix.WaitStatus
	if _, err := wait4(initPID, &ws); err != nil {
		log.Error("waiting for init", "err", err)
	}
	select {
	case <-copied:
	case <-time.After(shimDrainTimeout):
		log.Warn("job output still open after init exited")
	}
	outR.Close()
	exit := &ExitStatus{Time: time.Now().UTC()}
	switch {
	case ws.Signaled():
		exit.Signal = unix.SignalName(ws.Signal())
		exit.Code = 128 + int(ws.Signal())
	default:
		exit.Code = ws.ExitStatus()
	}
	log.Info("job ended", "exit", exit.String())
	rec, err := s.Update(name, func(r *Record) error {
		if r.InitPID != initPID {
			// The record has moved on (a restore adopted the name); leave it.
			return errStale
		}
		r.Status = Exited
		r.Operation = "" // whatever was under way ended with the job
		if r.Exit == nil {
			r.Exit = exit
		} else {
			// ferry kill set a reason; keep it, fill in the facts.
			exit.Reason = r.Exit.Reason
			r.Exit = exit
		}
		return nil
	})
	if err != nil && !errors.Is(err, errStale) {
		log.Error("recording exit", "err", err)
	}
	if rec != nil && rec.Cgroup != "" && !errors.Is(err, errStale) {
		removeCgroup(rec.Cgroup, log)
	}
	return 0
}

var errStale = errors.New("record belongs to another incarnation")

func removeCgroup(path string, log *slog.Logger) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cg, err := cgroup.Open(path)
	if err != nil {
		return // already gone
	}
	if empty, err := cg.Empty(); err == nil && !empty {
		if err := cg.Kill(ctx); err != nil {
			log.Warn("killing leftovers in cgroup", "cgroup", path, "err", err)
		}
	}
	if err := cg.Remove(ctx); err != nil {
		log.Warn("removing cgroup", "cgroup", path, "err", err)
	}
}

// wait4 waits for pid, retrying on EINTR.
func wait4(pid int, ws *unix.WaitStatus) (int, error) {
	for {
		wpid, err := unix.Wait4(pid, ws, 0, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		return wpid, err
	}
}

// holdFrozen turns a tree CRIU restored stopped (--leave-stopped, every
// task SIGSTOPped) into a frozen job: freeze the cgroup, then SIGCONT
// every task, which takes effect only at the thaw. Thaw starts the job.
func holdFrozen(rec *Record) error {
	cg, err := cgroup.Open(rec.Cgroup)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := cg.Freeze(ctx); err != nil {
		return fmt.Errorf("freezing the restored job: %w", err)
	}
	pids, err := cg.Procs()
	if err != nil {
		return err
	}
	for _, pid := range pids {
		_ = unix.Kill(pid, unix.SIGCONT)
	}
	return nil
}

// SmallInit is the name of the job's small pid 1 (cinit/ferry-init.c,
// built by make build beside the ferry binary). Where it is missing, the
// ferry binary itself is the init (InitMain), which does the same with a
// Go runtime that every checkpoint of the job then carries.
const SmallInit = "ferry-init"

// smallInit is the small init beside the ferry binary self, or "".
func smallInit(self string) string {
	p := filepath.Join(filepath.Dir(self), SmallInit)
	if st, err := os.Stat(p); err != nil || !st.Mode().IsRegular() || st.Mode()&0o111 == 0 {
		return ""
	}
	return p
}
