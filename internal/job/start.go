package job

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/ferry-cr/ferry/internal/cgroup"
	"github.com/ferry-cr/ferry/internal/proc"
)

// Hidden first arguments with which the ferry binary re-executes itself as a
// job's shim or init. main dispatches on them before the CLI parses flags.
const (
	ShimArg = "__shim"
	InitArg = "__init"
)

// startTimeout bounds how long Start waits for the shim to report that the
// job's command is running. A restore waits up to restoreStartTimeout: its
// CRIU may wait for a stream that is still arriving (a migration's early
// restore starts before the source has dumped), which its caller bounds
// more closely by ctx (a migration by the source's silence).
const (
	startTimeout        = 15 * time.Second
	restoreStartTimeout = 10 * time.Minute
)

// Spec describes a job to start.
type Spec struct {
	Name       string   // empty: generated from the command
	Command    []string // argv; Command[0] is looked up in PATH
	Dir        string   // working directory; empty: the caller's
	CgroupRoot string   // cgroupfs mount point; empty: /sys/fs/cgroup
	Logger     *slog.Logger
	Snapshots  *SnapshotPolicy // periodic snapshots, taken by the shim
}

// Start starts a job: a cgroup of its own, a detached shim that supervises
// it, and ferry's init as pid 1 of fresh PID and IPC namespaces running the
// command. It returns once the command runs, or undoes everything it did.
func Start(ctx context.Context, s *Registry, spec Spec) (*Record, error) {
	log := spec.Logger
	if log == nil {
		log = slog.Default()
	}
	if len(spec.Command) == 0 {
		return nil, fmt.Errorf("no command given: %w", ErrCommandNotFound)
	}
	path, err := exec.LookPath(spec.Command[0])
	if err != nil {
		return nil, fmt.Errorf("%q: %w", spec.Command[0], ErrCommandNotFound)
	}
	if path, err = filepath.Abs(path); err != nil {
		return nil, fmt.Errorf("resolving %q: %w", spec.Command[0], err)
	}
	name := spec.Name
	if name == "" {
		name = GenerateName(spec.Command[0])
	}
	if err := ValidateName(name); err != nil {
		return nil, err
	}
	dir := spec.Dir
	if dir == "" {
		if dir, err = os.Getwd(); err != nil {
			return nil, fmt.Errorf("working directory: %w", err)
		}
	}
	rec := &Record{
		Name:    name,
		ID:      NewID(),
		Command: append([]string{path}, spec.Command[1:]...),
		Dir:     dir,
		Created: time.Now().UTC(),
		Status:  Starting,

		Snapshots: spec.Snapshots,
	}
	return launch(ctx, s, rec, false, spec.CgroupRoot, log)
}

// launch is what starting and restoring a job share: claim the name with
// the job's first record, naming this process as its owner (replacing the
// record of an ended job of that name when replaceEnded, and clearing one
// a killed start abandoned), give the job a cgroup, and have a shim bring
// it up. Every step is undone if a later one fails; a replaced record is
// put back.
func launch(ctx context.Context, s *Registry, rec *Record, replaceEnded bool, cgroupRoot string, log *slog.Logger) (_ *Record, retErr error) {
	if cgroupRoot == "" {
		cgroupRoot = cgroup.DefaultRoot
	}
	layout, err := cgroup.DetectLayout(cgroupRoot)
	if err != nil {
		return nil, err
	}
	me, err := proc.ReadStat(os.Getpid())
	if err != nil {
		return nil, fmt.Errorf("reading this process's start time: %w", err)
	}
	rec.OwnerPID, rec.OwnerStart = me.PID, me.StartTime
	old, err := s.claim(ctx, rec, replaceEnded, log)
	if err != nil {
		return nil, err
	}
	defer func() {
		if retErr == nil {
			return
		}
		var err error
		if old != nil {
			// The job ended (typically: checkpointed). Its directory
			// and log carry on; only the record was replaced.
			err = s.Save(old)
		} else {
			err = s.Remove(rec.Name)
		}
		if err != nil {
			log.Warn("undoing job record after failed start", "job", rec.Name, "err", err)
		}
	}()
	cg, err := cgroup.Create(layout, "ferry/"+rec.Name+"-"+rec.ID[:8])
	if err != nil {
		return nil, fmt.Errorf("creating cgroup for job %q: %w", rec.Name, err)
	}
	defer func() {
		if retErr != nil {
			removeCgroup(cg.Path, log)
		}
	}()
	// The cgroup, the shim and the running init are live things, which a
	// crash of the machine ends: their notes need not be synced (see
	// UpdateLive). Each sync costs milliseconds on the way to the job's
	// start, and a migration's destination restores on its downtime.
	if _, err := s.UpdateLive(rec.Name, func(r *Record) error {
		r.Cgroup, r.CgroupVersion = cg.Path, cg.Version
		return nil
	}); err != nil {
		return nil, err
	}
	t := time.Now()
	wait := startTimeout
	if rec.RestoreFrom != "" {
		wait = restoreStartTimeout
	}
	if err := spawnShim(ctx, s, rec.Name, wait, log); err != nil {
		return nil, err
	}
	log.Debug("shim reported", "job", rec.Name, "took", time.Since(t))
	return s.Load(rec.Name)
}

// spawnShim starts `ferry __shim ROOT NAME` in a session of its own and
// waits for its one-line report: "ok" or the reason the job did not start.
func spawnShim(ctx context.Context, s *Registry, name string, wait time.Duration, log *slog.Logger) error {
	self, err := os.Executable()
	if err != nil {
		return fmt.Errorf("locating the ferry binary: %w", err)
	}
	readyR, readyW, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("creating shim pipe: %w", err)
	}
	defer readyR.Close()
	// Whatever descriptors ferry's caller left open (a shell's fd 7, the
	// lock of `flock FILE ferry run`) must not reach the shim, hence the
	// job: a job holding its caller's lock can never be checkpointed.
	cloexecInherited()
	cmd := exec.Command(self, ShimArg, s.Root, name)
	cmd.ExtraFiles = []*os.File{readyW} // fd 3 in the shim
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	cmd.Dir = "/"
	if err := cmd.Start(); err != nil {
		readyW.Close()
		return fmt.Errorf("starting shim: %w", err)
	}
	readyW.Close()
	shim := cmd.Process
	// Until the shim has the job running, the record names it beside its
	// owner: a start this process abandons is still the shim's to finish
	// or fail (see Record.Stale).
	if err := s.recordShim(name, shim.Pid); err != nil {
		_ = shim.Kill()
		_, _ = shim.Wait()
		return err
	}

	type answer struct {
		line string
		err  error
	}
	ch := make(chan answer, 1)
	go func() {
		line, err := bufio.NewReader(readyR).ReadString('\n')
		ch <- answer{strings.TrimSpace(line), err}
	}()
	var a answer
	select {
	case a = <-ch:
	case <-time.After(wait):
		a.err = fmt.Errorf("shim gave no answer within %s", wait)
	case <-ctx.Done():
		a.err = ctx.Err()
	}
	if a.err == nil && a.line == "ok" {
		// The shim lives on, detached; we never wait for it.
		return shim.Release()
	}
	// The shim is ours and failed: make sure it is gone before cleanup.
	_ = shim.Kill()
	_, _ = shim.Wait()
	switch {
	case a.line != "":
		msg := strings.TrimPrefix(a.line, "error: ")
		if strings.HasPrefix(msg, "exec: ") {
			return fmt.Errorf("%s: %w", strings.TrimPrefix(msg, "exec: "), ErrCommandNotFound)
		}
		return &startError{msg: msg}
	case a.err != nil:
		// The job directory, shim log included, is removed by the caller's
		// undo: quote the shim's last words now.
		last := ""
		if data, err := os.ReadFile(s.ShimLogPath(name)); err == nil && len(bytes.TrimSpace(data)) > 0 {
			lines := strings.Split(strings.TrimSpace(string(data)), "\n")
			last = ": " + lines[len(lines)-1]
		}
		log.Debug("shim failed", "err", a.err)
		return fmt.Errorf("%w: the shim exited without a report (%w)%s", ErrStart, a.err, last)
	}
	return ErrStart
}

// claim writes rec, the first record of a job, under its name, and
// returns the record it replaced, if any. The name is free when no job
// has it, when its job ended and replaceEnded (a restore carries on a
// checkpointed job's directory and log), and when a killed start
// abandoned it (Record.Stale): what that start left in the job's cgroup
// is killed, the cgroup removed, and the name taken over (by a restore,
// keeping the directory; by a fresh start, without it). The check and
// the write are one step under the job's lock.
func (s *Registry) claim(ctx context.Context, rec *Record, replaceEnded bool, log *slog.Logger) (*Record, error) {
	err := s.Create(rec)
	if !errors.Is(err, ErrExists) {
		return nil, err
	}
	var old *Record
	_, err = s.Update(rec.Name, func(cur *Record) error {
		switch {
		case cur.Stale():
			if err := s.clearAbandoned(ctx, cur, log); err != nil {
				return err
			}
		case cur.Status == Exited && !cur.InitAlive() && replaceEnded:
		default:
			return &NameError{Name: rec.Name, Err: ErrExists}
		}
		prev := *cur
		old = &prev
		if !replaceEnded {
			return errFresh
		}
		*cur = *rec
		return nil
	})
	switch {
	case errors.Is(err, ErrNotFound):
		// A directory without a record: one being made or removed.
		return nil, &NameError{Name: rec.Name, Err: ErrExists}
	case errors.Is(err, errFresh):
		// A fresh start over an abandoned one: the name is free once the
		// old directory is gone.
		if err := s.Remove(rec.Name); err != nil {
			return nil, err
		}
		return nil, s.Create(rec)
	case err != nil:
		return nil, err
	}
	return old, nil
}

// errFresh has claim's update return without saving.
var errFresh = errors.New("start afresh")

// recordShim notes in job name's record the shim spawned for it, with its
// start time.
func (s *Registry) recordShim(name string, pid int) error {
	st, err := proc.ReadStat(pid)
	if err != nil {
		return fmt.Errorf("reading the shim's start time: %w", err)
	}
	_, err = s.UpdateLive(name, func(r *Record) error {
		r.ShimPID, r.ShimStart = pid, st.StartTime
		return nil
	})
	return err
}

// startError is the shim's own account of why a job did not start; it
// reads as that account alone and matches ErrStart.
type startError struct{ msg string }

func (e *startError) Error() string { return e.msg }

func (e *startError) Unwrap() error { return ErrStart }
