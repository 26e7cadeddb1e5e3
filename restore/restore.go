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
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/checkpoint-restore/go-criu/v7/rpc"
	"golang.org/x/sys/unix"
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
	Checkpoint string    // a directory, a .ferry file, or "-" for Stdin
	Stdin      io.Reader // the stream when Checkpoint is "-"
	// UnpackDir is where a streamed checkpoint is unpacked (and checked,
	// every chunk) before CRIU sees any of it; removed afterwards.
	UnpackDir  string
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
	if checkpoint.IsStream(opts.Checkpoint) {
		tmp, err := unpack(opts)
		if err != nil {
			return nil, err
		}
		defer os.RemoveAll(tmp)
		dir = tmp
	}
	m, err := checkpoint.Load(dir)
	if err != nil {
		return nil, err
	}
	if v, err := criu.ParseVersion("Version: " + m.CriuVersion); err == nil && !opts.Criu.Version.AtLeast(v) {
		return nil, fmt.Errorf("%s was taken with CRIU %s, this CRIU is %s: restore with CRIU >= %s: %w",
			dir, m.CriuVersion, opts.Criu.Version, m.CriuVersion, checkpoint.ErrUnsupportedVersion)
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
		Foreign:    m.Foreign,
		CgroupRoot: opts.CgroupRoot,
		Logger:     opts.Logger,
	})
}

// unpack checks and unpacks a streamed checkpoint into a new directory.
func unpack(opts Options) (string, error) {
	var r io.Reader = opts.Stdin
	name := "standard input"
	if opts.Checkpoint != "-" {
		f, err := os.Open(opts.Checkpoint)
		if err != nil {
			return "", fmt.Errorf("%q: %w: %w", opts.Checkpoint, checkpoint.ErrNotCheckpoint, err)
		}
		defer f.Close()
		r, name = f, opts.Checkpoint
	}
	base := unpackBase(opts)
	if err := os.MkdirAll(base, 0o700); err != nil {
		return "", err
	}
	tmp, err := os.MkdirTemp(base, "restore-")
	if err != nil {
		return "", err
	}
	if _, err := checkpoint.Unpack(r, tmp); err != nil {
		os.RemoveAll(tmp)
		return "", fmt.Errorf("reading checkpoint from %s: %w", name, err)
	}
	return tmp, nil
}

// unpackBase is where a stream is unpacked: tmpfs when it surely has room
// (four times the file, which covers zstd's usual ratio on process
// memory; 4 GiB for a pipe of unknown length), else opts.UnpackDir.
func unpackBase(opts Options) string {
	const shm = "/dev/shm/ferry-unpack"
	need := int64(4 << 30)
	if opts.Checkpoint != "-" {
		if st, err := os.Stat(opts.Checkpoint); err == nil {
			need = 4*st.Size() + 64<<20
		}
	}
	var st unix.Statfs_t
	if unix.Statfs("/dev/shm", &st) == nil && int64(st.Bavail)*int64(st.Bsize) > need {
		return shm
	}
	return opts.UnpackDir
}

// Restorer is the job.Restorer the shim uses for ferry's own jobs: it runs
// CRIU's restore of req.Record.RestoreFrom with CRIU inside the job's
// cgroup; CRIU recreates the job's namespaces, init included.
func Restorer(ctx context.Context, req job.RestoreRequest) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, restoreTimeout)
	defer cancel()
	return run(ctx, req.Record.RestoreCriu, req.Record.RestoreFrom, req.WorkDir, req.Output, req.Cgroup.AddProc)
}

// InitRestorer is the job.InitRestorer ferry's init uses for foreign
// trees: CRIU runs inside the new job's namespaces, as the init's child.
func InitRestorer(ctx context.Context, req job.InitRestoreRequest) (int, error) {
	return run(ctx, req.Criu, req.Checkpoint, req.WorkDir, req.Output, nil)
}

func run(ctx context.Context, criuPath, dir, workDirPath string, output *os.File, started func(int) error) (int, error) {
	m, err := checkpoint.Load(dir)
	if err != nil {
		return 0, err
	}
	imgDir, err := os.Open(dir)
	if err != nil {
		return 0, err
	}
	defer imgDir.Close()
	workDir, err := os.Open(workDirPath)
	if err != nil {
		return 0, err
	}
	defer workDir.Close()
	opts := &rpc.CriuOpts{
		ImagesDirFd:       proto.Int32(int32(imgDir.Fd())),
		WorkDirFd:         proto.Int32(int32(workDir.Fd())),
		LogLevel:          proto.Int32(2),
		LogFile:           proto.String("restore.log"),
		RstSibling:        proto.Bool(true),
		ManageCgroupsMode: rpc.CriuCgMode_IGNORE.Enum(),
		TcpEstablished:    proto.Bool(m.TCPEstablished),
		FileLocks:         proto.Bool(m.FileLocks),
		ExtUnixSk:         proto.Bool(m.ExtUnixSk),
		ShellJob:          proto.Bool(m.ShellJob),
	}
	switch m.NetworkLock {
	case "nftables":
		opts.NetworkLock = rpc.CriuNetworkLockMethod_NFTABLES.Enum()
	case "iptables":
		opts.NetworkLock = rpc.CriuNetworkLockMethod_IPTABLES.Enum()
	}
	var extra []*os.File
	inherit := func(key string, f *os.File) {
		opts.InheritFd = append(opts.InheritFd, &rpc.InheritFd{Key: proto.String(key), Fd: proto.Int32(criu.ExtraFD(len(extra)))})
		extra = append(extra, f)
	}
	for _, key := range m.OutputPipes() {
		inherit(key, output)
	}
	if m.ExternalPidNS {
		// The tree's PID namespace is the one we run in (the new init's).
		ns, err := os.Open("/proc/self/ns/pid")
		if err != nil {
			return 0, err
		}
		defer ns.Close()
		inherit(checkpoint.PidNSKey, ns)
	}
	resp, err := criu.Do(ctx, criuPath, criu.Call{
		Type:       rpc.CriuReqType_RESTORE,
		Opts:       opts,
		ExtraFiles: extra,
		// Restored tasks are forked by CRIU and so start in CRIU's cgroup.
		Started: started,
	})
	if err != nil {
		return 0, fmt.Errorf("restoring %s: %w", dir, criu.Explain(err, filepath.Join(workDirPath, "restore.log")))
	}
	pid := int(resp.GetRestore().GetPid())
	if pid <= 0 {
		return 0, errors.New("criu restored no process")
	}
	return pid, nil
}
