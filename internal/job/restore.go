package job

import (
	"context"
	"log/slog"
	"os"
	"time"

	"github.com/ferry-cr/ferry/internal/cgroup"
)

// Restorer brings a checkpointed tree back to life for a shim: it must
// start the tree as a child of the calling process (CRIU's RstSibling),
// inside cg, with out as the tree's stdout and stderr, and return the host
// pid of the tree's root, which becomes the job's init.
//
// ctx ends, with the cause ErrOwnerGone, when the restore is a
// migration's copy and the ferry serve that asked for it dies first: only
// that process could tell the source the copy exists, so the copy can
// never become the job, and no one is left to undo the start. The
// Restorer then leaves nothing of the tree running; the record stays,
// abandoned (Record.Stale), for the next serve's Recover or ferry rm.
type Restorer func(ctx context.Context, req RestoreRequest) (initPID int, err error)

// RestoreRequest is what a Restorer gets.
type RestoreRequest struct {
	Record  *Record
	Cgroup  *cgroup.Cgroup
	Output  *os.File // write end of the pipe the shim reads the job's output from
	WorkDir string   // where CRIU's log goes (the job's directory)
	Log     *slog.Logger
}

// RestoreSpec describes a job to bring back from a checkpoint.
type RestoreSpec struct {
	Name       string // required
	Checkpoint string // absolute path of the checkpoint
	Criu       string // CRIU binary the shim restores with
	Foreign    bool   // a tree ferry did not start: restored by a new init
	Stopped    bool   // leave the restored tree frozen (Thaw starts it)
	// Migration, when set, is in the record from its creation: a copy a
	// migration restores says what it is before CRIU runs, so that a
	// ferry that dies while it restores leaves no frozen copy unexplained.
	Migration *MigrationNote
	// LazyPages restores with CRIU lazy pages (post-copy): a `criu
	// lazy-pages` daemon listens in the checkpoint directory, which is
	// then also CRIU's work directory, by the time CRIU connects to it
	// (see restore.Options.LazyReady).
	LazyPages  bool
	Command    []string
	Dir        string
	CgroupRoot string
	Logger     *slog.Logger
	Snapshots  *SnapshotPolicy // periodic snapshots, taken by the shim
}

// StartRestored creates the record and cgroup of a job that comes back
// from a checkpoint and has a shim restore it (the shim must be the
// restored tree's parent). A record of that name that has exited is
// replaced, and so is one whose start was abandoned (Record.Stale: its
// leftovers are cleared first); a live one is not.
func StartRestored(ctx context.Context, s *Registry, spec RestoreSpec) (*Record, error) {
	log := spec.Logger
	if log == nil {
		log = slog.Default()
	}
	if err := ValidateName(spec.Name); err != nil {
		return nil, err
	}
	rec := &Record{
		Name:        spec.Name,
		ID:          NewID(),
		Command:     spec.Command,
		Dir:         spec.Dir,
		Created:     time.Now().UTC(),
		Status:      Starting,
		RestoreFrom: spec.Checkpoint,
		RestoreCriu: spec.Criu,
		Foreign:     spec.Foreign,

		RestoreStopped: spec.Stopped,
		RestoreLazy:    spec.LazyPages,
		Snapshots:      spec.Snapshots,
		Migration:      spec.Migration,
	}
	return launch(ctx, s, rec, true, spec.CgroupRoot, log)
}

// InitRestorer restores a foreign tree from inside a new job's namespaces,
// run by ferry's init (pid 1 there): CRIU must run where the tree will
// live, with a /proc of that PID namespace, and the restored root becomes
// the init's child (CRIU's RstSibling). It returns the root's pid.
type InitRestorer func(ctx context.Context, req InitRestoreRequest) (int, error)

// InitRestoreRequest is what an InitRestorer gets.
type InitRestoreRequest struct {
	Criu       string
	Checkpoint string
	WorkDir    string
	Stopped    bool     // leave the tree stopped (the shim freezes it)
	Output     *os.File // the init's stdout: the pipe to the shim
}
