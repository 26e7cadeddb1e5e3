// Package dump checkpoints a running job: it freezes the job's cgroup,
// drives CRIU to capture the tree, writes the checkpoint durably and only
// then ends the job (or thaws it, with LeaveRunning). Any failure thaws the
// job and removes partial output: a job ferry failed to checkpoint keeps
// running.
package dump

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/checkpoint-restore/go-criu/v7/rpc"
	"github.com/checkpoint-restore/go-criu/v7/stats"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	"github.com/ferry-cr/ferry/internal/checkpoint"
	"github.com/ferry-cr/ferry/internal/criu"
	"github.com/ferry-cr/ferry/internal/job"
)

// Options says how to checkpoint. The zero value (plus Output and Criu) is
// a safe default: the job ends once its checkpoint is durable.
type Options struct {
	Criu         *criu.Binary
	Output       string // checkpoint directory to create
	Force        bool   // replace Output if it exists
	LeaveRunning bool   // thaw the job after the checkpoint instead of ending it

	TCPEstablished bool // checkpoint established TCP connections
	FileLocks      bool
	ExtUnixSk      bool

	FerryVersion string
	Logger       *slog.Logger
}

// Result describes a finished checkpoint.
type Result struct {
	Job       string                `json:"job"`
	Output    string                `json:"output"`
	Processes int                   `json:"processes"`
	Threads   int                   `json:"threads"`
	Memory    int64                 `json:"memoryBytes"`
	Size      int64                 `json:"sizeBytes"`
	Frozen    time.Duration         `json:"frozenNs"`
	Total     time.Duration         `json:"totalNs"`
	JobEnded  bool                  `json:"jobEnded"`
	CriuStats *stats.DumpStatsEntry `json:"criuStats,omitempty"`
	Inventory *Inventory            `json:"inventory,omitempty"`
	Plan      *Plan                 `json:"plan,omitempty"`
}

// DryRun walks job name and plans its checkpoint without freezing it.
func DryRun(s *job.Store, name string, allow Allowed) (*Inventory, *Plan, error) {
	rec, err := s.Load(name)
	if err != nil {
		return nil, nil, err
	}
	if !rec.InitAlive() {
		return nil, nil, &job.NameError{Name: name, Err: job.ErrNotRunning}
	}
	inv, err := Walk(rec.InitPID)
	if err != nil {
		return nil, nil, fmt.Errorf("walking job %q: %w", name, err)
	}
	return inv, MakePlan(inv, allow), nil
}

// Job checkpoints the running job name of store s into opts.Output.
func Job(ctx context.Context, s *job.Store, name string, opts Options) (_ *Result, retErr error) {
	start := time.Now()
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	rec, err := s.Load(name)
	if err != nil {
		return nil, err
	}
	if !rec.InitAlive() {
		return nil, &job.NameError{Name: name, Err: job.ErrNotRunning}
	}
	out, err := filepath.Abs(opts.Output)
	if err != nil {
		return nil, err
	}
	if err := checkOutput(out, opts.Force); err != nil {
		return nil, err
	}
	// Walk and plan before freezing anything: a tree that cannot be
	// checkpointed as asked is refused while it runs on untouched.
	inv, err := Walk(rec.InitPID)
	if err != nil {
		return nil, fmt.Errorf("walking job %q: %w", name, err)
	}
	plan := MakePlan(inv, Allowed{TCPEstablished: opts.TCPEstablished, ExtUnixSk: opts.ExtUnixSk, FileLocks: opts.FileLocks})
	if err := plan.Refusal(); err != nil {
		return nil, fmt.Errorf("job %q: %w", name, err)
	}
	cg, err := rec.OpenCgroup()
	if err != nil {
		return nil, err
	}
	outputPipe, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/1", rec.InitPID))
	if !strings.HasPrefix(outputPipe, "pipe:[") {
		outputPipe = ""
	}

	tmp, err := os.MkdirTemp(filepath.Dir(out), "."+filepath.Base(out)+".partial-")
	if err != nil {
		return nil, fmt.Errorf("creating checkpoint directory: %w", err)
	}
	defer func() {
		if retErr != nil {
			os.RemoveAll(tmp)
		}
	}()
	if err := os.Chmod(tmp, 0o700); err != nil {
		return nil, err
	}
	imgDir, err := os.Open(tmp)
	if err != nil {
		return nil, err
	}
	defer imgDir.Close()

	// Freeze first, so the job stands still from the first CRIU look to
	// the last; CRIU sees the cgroup frozen and leaves it frozen.
	freezeStart := time.Now()
	if err := cg.Freeze(ctx); err != nil {
		return nil, fmt.Errorf("freezing job %q: %w", name, err)
	}
	thawed := false
	thaw := func() {
		if thawed {
			return
		}
		thawed = true
		tctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		if err := cg.Thaw(tctx); err != nil {
			log.Error("thawing job after failed checkpoint", "job", name, "err", err)
			retErr = errors.Join(retErr, fmt.Errorf("thawing job %q: %w", name, err))
		}
	}
	defer func() {
		if retErr != nil {
			thaw()
		}
	}()

	// CRIU's log and statistics go to the job's directory, so a failed
	// checkpoint leaves its log behind while its partial images vanish.
	workDir, err := os.Open(s.Dir(name))
	if err != nil {
		return nil, err
	}
	defer workDir.Close()
	logPath := filepath.Join(s.Dir(name), "dump.log")
	copts := &rpc.CriuOpts{
		ImagesDirFd:       proto.Int32(int32(imgDir.Fd())),
		WorkDirFd:         proto.Int32(int32(workDir.Fd())),
		Pid:               proto.Int32(int32(rec.InitPID)),
		LogLevel:          proto.Int32(4),
		LogFile:           proto.String("dump.log"),
		LeaveRunning:      proto.Bool(true), // ferry ends the job itself, once the checkpoint is durable
		FreezeCgroup:      proto.String(cg.Path),
		ManageCgroupsMode: rpc.CriuCgMode_IGNORE.Enum(),
		TcpEstablished:    proto.Bool(plan.TCPEstablished),
		FileLocks:         proto.Bool(plan.FileLocks),
		ExtUnixSk:         proto.Bool(plan.ExtUnixSk),
		ShellJob:          proto.Bool(plan.ShellJob),
	}
	netLock := ""
	if plan.TCPEstablished {
		m := networkLock(ctx, opts.Criu)
		copts.NetworkLock = m.Enum()
		netLock = strings.ToLower(m.String())
	}
	if deadline, ok := ctx.Deadline(); ok {
		copts.Timeout = proto.Uint32(uint32(max(1, time.Until(deadline).Seconds())))
	}
	if _, err := criu.Do(ctx, opts.Criu.Path, criu.Call{Type: rpc.CriuReqType_DUMP, Opts: copts}); err != nil {
		return nil, fmt.Errorf("checkpointing job %q: %w", name, criu.Explain(err, logPath))
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}

	res := &Result{Job: name, Output: out, Inventory: inv, Plan: plan}
	if st, err := stats.CriuGetDumpStats(workDir); err == nil {
		res.CriuStats = st
		res.Memory = int64(st.GetPagesWritten()) * int64(os.Getpagesize())
	}
	res.Processes, res.Threads = countTasks(tmp)
	m := &checkpoint.Manifest{
		Format:         checkpoint.FormatVersion,
		FerryVersion:   opts.FerryVersion,
		CriuVersion:    opts.Criu.Version.String(),
		Kernel:         kernelRelease(),
		Created:        time.Now().UTC(),
		Job:            name,
		Command:        rec.Command,
		Dir:            rec.Dir,
		OutputPipe:     outputPipe,
		TCPEstablished: plan.TCPEstablished,
		NetworkLock:    netLock,
		FileLocks:      plan.FileLocks,
		ExtUnixSk:      plan.ExtUnixSk,
		Processes:      res.Processes,
		Threads:        res.Threads,
		MemoryBytes:    res.Memory,
	}
	m.Host, _ = os.Hostname()
	if exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", rec.InitPID)); err == nil {
		if m.Init, err = checkpoint.Identify(exe); err != nil {
			return nil, fmt.Errorf("identifying the job's init binary: %w", err)
		}
	}
	if res.Size, err = finish(tmp, out, m, opts.Force); err != nil {
		return nil, err
	}
	res.Frozen = time.Since(freezeStart)

	if opts.LeaveRunning {
		thaw()
		if retErr != nil {
			return res, retErr
		}
	} else {
		// The checkpoint is durable: now, and only now, end the job.
		if err := s.EndCheckpointed(ctx, name, log); err != nil {
			return res, fmt.Errorf("checkpoint written to %s, but ending the job: %w", out, err)
		}
		res.JobEnded = true
	}
	res.Total = time.Since(start)
	return res, nil
}

// checkOutput refuses to replace an existing path without force.
func checkOutput(out string, force bool) error {
	if _, err := os.Lstat(out); err == nil {
		if !force {
			return fmt.Errorf("%q: %w (use --force to replace it)", out, fs.ErrExist)
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if st, err := os.Stat(filepath.Dir(out)); err != nil {
		return fmt.Errorf("%w: directory %q does not exist", ErrBadOutput, filepath.Dir(out))
	} else if !st.IsDir() {
		return fmt.Errorf("%w: %q is not a directory", ErrBadOutput, filepath.Dir(out))
	}
	return nil
}

// finish fsyncs every image, writes the manifest, and moves the
// checkpoint into place: after it returns, the checkpoint survives a crash.
func finish(tmp, out string, m *checkpoint.Manifest, force bool) (int64, error) {
	entries, err := os.ReadDir(tmp)
	if err != nil {
		return 0, err
	}
	m.Files = make(map[string]int64, len(entries))
	var total int64
	for _, e := range entries {
		if !e.Type().IsRegular() {
			continue
		}
		p := filepath.Join(tmp, e.Name())
		f, err := os.Open(p)
		if err != nil {
			return 0, err
		}
		st, err := f.Stat()
		if err == nil {
			err = f.Sync()
		}
		f.Close()
		if err != nil {
			return 0, fmt.Errorf("syncing %s: %w", e.Name(), err)
		}
		m.Files[e.Name()] = st.Size()
		total += st.Size()
	}
	data, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return 0, err
	}
	mf, err := os.OpenFile(filepath.Join(tmp, checkpoint.ManifestFile), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return 0, err
	}
	if _, err := mf.Write(append(data, '\n')); err == nil {
		err = mf.Sync()
	}
	if cerr := mf.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return 0, fmt.Errorf("writing manifest: %w", err)
	}
	total += int64(len(data) + 1)
	if err := syncDir(tmp); err != nil {
		return 0, err
	}
	if force {
		if err := os.RemoveAll(out); err != nil {
			return 0, fmt.Errorf("replacing %q: %w", out, err)
		}
	}
	if err := os.Rename(tmp, out); err != nil {
		return 0, fmt.Errorf("moving checkpoint into place: %w", err)
	}
	return total, syncDir(filepath.Dir(out))
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("syncing %q: %w", dir, err)
	}
	return nil
}

// countTasks counts processes (core-*.img per thread, pstree per
// process) from the image names: one core-TID.img per thread.
func countTasks(dir string) (procs, threads int) {
	cores, _ := filepath.Glob(filepath.Join(dir, "core-*.img"))
	mms, _ := filepath.Glob(filepath.Join(dir, "mm-*.img"))
	return len(mms), len(cores)
}

func kernelRelease() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return ""
	}
	return unix.ByteSliceToString(u.Release[:])
}

// networkLock picks how CRIU keeps a tree's TCP peers quiet while it is
// dumped: nftables where the kernel has it (it needs no iptables binary),
// else iptables.
func networkLock(ctx context.Context, b *criu.Binary) rpc.CriuNetworkLockMethod {
	if ok, _ := b.HasFeature(ctx, "network_lock_nftables"); ok {
		return rpc.CriuNetworkLockMethod_NFTABLES
	}
	return rpc.CriuNetworkLockMethod_IPTABLES
}
