// Package restore brings a checkpoint back as an ordinary ferry job: it
// checks the checkpoint before touching anything, then has a new shim run
// CRIU so that the restored tree becomes the shim's child, in a cgroup of
// its own and in fresh PID and IPC namespaces (CRIU recreates the ones the
// tree had, ferry's init as pid 1 included), with fresh stdout and stderr.
// If CRIU fails, nothing of the tree is left and the checkpoint is
// untouched (CRIU only reads it).
package restore

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/checkpoint-restore/go-criu/v7/rpc"
	"google.golang.org/protobuf/proto"

	"github.com/ferry-cr/ferry/internal/checkpoint"
	"github.com/ferry-cr/ferry/internal/criu"
	"github.com/ferry-cr/ferry/internal/job"
)

// restoreTimeout bounds one CRIU restore run by the shim.
const restoreTimeout = 5 * time.Minute

// Options says how to restore. Name defaults to the checkpointed job's.
type Options struct {
	Criu       *criu.Binary
	Checkpoint string
	Name       string
	CgroupRoot string
	Logger     *slog.Logger
}

// Job restores the checkpoint opts.Checkpoint as a job of store s and
// returns its record once the restored tree runs.
func Job(ctx context.Context, s *job.Store, opts Options) (*job.Record, error) {
	dir, err := filepath.Abs(opts.Checkpoint)
	if err != nil {
		return nil, err
	}
	m, err := checkpoint.Load(dir)
	if err != nil {
		return nil, err
	}
	if m.Init != nil {
		if err := m.Init.Check(); err != nil {
			return nil, err
		}
	}
	name := opts.Name
	if name == "" {
		name = m.Job
	}
	return job.StartRestored(ctx, s, job.RestoreSpec{
		Name:       name,
		Checkpoint: dir,
		Criu:       opts.Criu.Path,
		Command:    m.Command,
		Dir:        m.Dir,
		CgroupRoot: opts.CgroupRoot,
		Logger:     opts.Logger,
	})
}

// Restorer is the job.Restorer the shim uses: it runs CRIU's restore of
// req.Record.RestoreFrom with CRIU inside the job's cgroup.
func Restorer(ctx context.Context, req job.RestoreRequest) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, restoreTimeout)
	defer cancel()
	rec := req.Record
	m, err := checkpoint.Load(rec.RestoreFrom)
	if err != nil {
		return 0, err
	}
	imgDir, err := os.Open(rec.RestoreFrom)
	if err != nil {
		return 0, err
	}
	defer imgDir.Close()
	workDir, err := os.Open(req.WorkDir)
	if err != nil {
		return 0, err
	}
	defer workDir.Close()
	opts := &rpc.CriuOpts{
		ImagesDirFd:       proto.Int32(int32(imgDir.Fd())),
		WorkDirFd:         proto.Int32(int32(workDir.Fd())),
		LogLevel:          proto.Int32(4),
		LogFile:           proto.String("restore.log"),
		RstSibling:        proto.Bool(true),
		ManageCgroupsMode: rpc.CriuCgMode_IGNORE.Enum(),
		TcpEstablished:    proto.Bool(m.TCPEstablished),
		FileLocks:         proto.Bool(m.FileLocks),
		ExtUnixSk:         proto.Bool(m.ExtUnixSk),
	}
	switch m.NetworkLock {
	case "nftables":
		opts.NetworkLock = rpc.CriuNetworkLockMethod_NFTABLES.Enum()
	case "iptables":
		opts.NetworkLock = rpc.CriuNetworkLockMethod_IPTABLES.Enum()
	}
	var extra []*os.File
	if m.OutputPipe != "" {
		opts.InheritFd = append(opts.InheritFd, &rpc.InheritFd{Key: proto.String(m.OutputPipe), Fd: proto.Int32(criu.ExtraFD(len(extra)))})
		extra = append(extra, req.Output)
	}
	resp, err := criu.Do(ctx, rec.RestoreCriu, criu.Call{
		Type:       rpc.CriuReqType_RESTORE,
		Opts:       opts,
		ExtraFiles: extra,
		// Restored tasks are forked by CRIU and so start in CRIU's cgroup.
		Started: req.Cgroup.AddProc,
	})
	if err != nil {
		return 0, fmt.Errorf("restoring %s: %w", rec.RestoreFrom, criu.Explain(err, filepath.Join(req.WorkDir, "restore.log")))
	}
	pid := int(resp.GetRestore().GetPid())
	if pid <= 0 {
		return 0, errors.New("criu restored no process")
	}
	return pid, nil
}
