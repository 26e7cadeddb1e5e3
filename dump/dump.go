// Package dump checkpoints a running job: it freezes the job's cgroup,
// drives CRIU to capture the tree, writes the checkpoint durably and only
// then ends the job (or thaws it, with LeaveRunning). Any failure thaws the
// job and removes partial output: a job ferry failed to checkpoint keeps
// running.
package dump

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/checkpoint-restore/go-criu/v7/rpc"
	"github.com/checkpoint-restore/go-criu/v7/stats"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	"github.com/ferry-cr/ferry/image"
	"github.com/ferry-cr/ferry/internal/cgroup"
	"github.com/ferry-cr/ferry/internal/checkpoint"
	"github.com/ferry-cr/ferry/internal/criu"
	"github.com/ferry-cr/ferry/internal/job"
	"github.com/ferry-cr/ferry/internal/proc"
	"github.com/ferry-cr/ferry/internal/progress"
	"github.com/ferry-cr/ferry/store"
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
	// CriuLogLevel is CRIU's log level (0: 2, warnings and errors; 4
	// doubles the time of a dump).
	CriuLogLevel int
	// LogDir holds CRIU's logs for trees that are not jobs (--pid).
	LogDir string
	// CgroupRoot is the cgroupfs mount point (default /sys/fs/cgroup).
	CgroupRoot string
	// Store, when set, adds the checkpoint to this snapshot store as a
	// snapshot of the job (Output and Stream are then ignored): CRIU dumps
	// into scratch space (tmpfs when there is room) and the store keeps
	// only the chunks it does not already hold.
	Store *store.Store
	// Stream writes the checkpoint as one image stream (a .ferry file, or
	// StreamTo when Output is "-") instead of a directory.
	Stream   bool
	StreamTo io.Writer
	Image    image.WriterOptions
	// Progress is told the phase and counts the checkpoint's bytes as
	// they are written; nil for none.
	Progress *progress.Meter
	// Handover, when set (and not LeaveRunning), runs once the checkpoint
	// is completely written, while the tree is still stopped: the tree is
	// ended only if it returns nil, and resumed if it fails. Migration
	// uses it to end the source only once the destination holds the job.
	Handover func(ctx context.Context) error
	// PostCopy, when set (with Stream, Output "-" and Handover), dumps
	// everything but the tree's private memory, which CRIU then serves to
	// the destination's lazy-pages daemon (see PostCopy).
	PostCopy *PostCopy
	// Prepared, when set (a migration: Stream to StreamTo), runs once the
	// stream's first record is out (the manifest as known before CRIU
	// runs, which holds all a restore needs to start) and before CRIU
	// starts: a destination that starts its restore from that record says
	// here that it is up, so that its start-up competes with neither the
	// dump nor the downtime. An error fails the checkpoint before anything
	// was frozen.
	Prepared func(ctx context.Context) error
	// EndReason is what an ended job's record gives as the reason
	// ("checkpointed" unless set; migration says "migrated").
	EndReason string
	// PagesLast, with Handover on a streamed dump, holds CRIU's pages
	// files back and sends them after every other image, behind a
	// REMAINING record, so that a destination restoring as the stream
	// arrives starts before the memory does (see held.go).
	PagesLast bool
}

// PostCopy is the source side of a post-copy migration.
//
// The checkpoint stream carries every image but the tree's private
// anonymous memory; CRIU keeps that memory and, once the images are
// written, serves it over Pages. After Handover succeeds, Serve runs
// while CRIU serves: it lets the destination run its copy and follows
// the transfer until served yields CRIU's exit (nil once the destination
// holds every page). Serve's result decides the tree's fate: nil ends it
// (the job lives on at the destination); an error wrapping
// ErrKeepStopped leaves it frozen (the outcome is in doubt); any other
// error resumes it (the destination confirmed its copy is gone).
//
// The tree must be frozen by its cgroup: CRIU resumes the tasks it
// seized when a page transfer fails, which must never happen while the
// destination's copy may run. Under a frozen cgroup they stay frozen
// until ferry decides.
type PostCopy struct {
	// Pages is a connected socket to the destination (CRIU's --ps-socket).
	Pages *os.File
	Serve func(ctx context.Context, served <-chan error) error
}

// ErrKeepStopped is a Handover or PostCopy.Serve verdict: neither end nor
// resume the tree; it stays frozen for the operator to settle.
var ErrKeepStopped = errors.New("tree kept frozen")

// Result describes a finished checkpoint.
type Result struct {
	Job       string                `json:"job"`
	Output    string                `json:"output"`
	Processes int                   `json:"processes"`
	Threads   int                   `json:"threads"`
	Memory    int64                 `json:"memoryBytes"`
	Size      int64                 `json:"sizeBytes"`
	Frozen    time.Duration         `json:"frozenNs"`
	FrozenAt  time.Time             `json:"frozenAt"`
	Total     time.Duration         `json:"totalNs"`
	JobEnded  bool                  `json:"jobEnded"`
	StoppedBy string                `json:"stoppedBy"`           // "cgroup freezer" or "criu" (ptrace)
	LazyPages int64                 `json:"lazyPages,omitempty"` // post-copy: pages left for the destination to fetch
	Snapshot  *store.Snapshot       `json:"snapshot,omitempty"`  // the snapshot added, with Options.Store
	CriuStats *stats.DumpStatsEntry `json:"criuStats,omitempty"`
	Inventory *Inventory            `json:"inventory,omitempty"`
	Plan      *Plan                 `json:"plan,omitempty"`
}

// DryRun walks job name and plans its checkpoint without freezing it.
func DryRun(s *job.Registry, name string, allow Allowed) (*Inventory, *Plan, error) {
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

// target is what a checkpoint works on, whatever kind of tree it is.
type target struct {
	name     string
	root     int      // host pid of the tree's root
	criuPid  int      // the root's pid as CRIU sees it
	wrapper  []string // run CRIU through this (nsenter into a foreign job)
	byPath   bool     // pass the images directory by path: CRIU inside a job's namespaces cannot see our fds
	freezeCg *cgroup.Cgroup
	pidNS    uint64 // declare this PID namespace external (its init stays out of the checkpoint)
	foreign  bool
	command  []string
	dir      string
	periodic *checkpoint.Periodic                    // the job's snapshot policy, recorded in the manifest
	workDir  string                                  // CRIU's log and statistics end up here
	end      func(context.Context, *Inventory) error // end the tree once the checkpoint is durable
	resume   func(context.Context, *Inventory) error // let the tree run again
}

// DryRunPid walks the tree rooted at pid and plans its checkpoint.
func DryRunPid(pid int, allow Allowed) (*Inventory, *Plan, error) {
	if err := checkPid(pid); err != nil {
		return nil, nil, err
	}
	inv, err := Walk(pid)
	if err != nil {
		return nil, nil, err
	}
	return inv, MakePlan(inv, allow), nil
}

// Job checkpoints the running job name of store s into opts.Output.
func Job(ctx context.Context, s *job.Registry, name string, opts Options) (*Result, error) {
	rec, err := s.Load(name)
	if err != nil {
		return nil, err
	}
	if !rec.InitAlive() {
		return nil, &job.NameError{Name: name, Err: job.ErrNotRunning}
	}
	cg, err := rec.OpenCgroup()
	if err != nil {
		return nil, err
	}
	t := &target{
		name: name, root: rec.InitPID, criuPid: rec.InitPID, freezeCg: cg,
		command: rec.Command, dir: rec.Dir, workDir: s.Dir(name),
		end: func(ctx context.Context, _ *Inventory) error {
			return s.EndAs(ctx, name, cmp.Or(opts.EndReason, "checkpointed"), opts.Logger)
		},
		resume: func(ctx context.Context, _ *Inventory) error { return cg.Thaw(ctx) },
	}
	if p := rec.Snapshots; p != nil && p.Every > 0 {
		t.periodic = &checkpoint.Periodic{Every: p.Every, Keep: p.Keep}
	}
	if rec.Foreign {
		// The tree is the init's child, in namespaces the init made; CRIU
		// works from inside them and leaves the init out.
		if err := t.foreignJob(rec); err != nil {
			return nil, err
		}
	}
	return capture(ctx, t, opts)
}

func (t *target) foreignJob(rec *job.Record) error {
	kids, err := proc.Children(rec.InitPID)
	if err != nil || len(kids) == 0 {
		return fmt.Errorf("job %q: its tree is gone: %w", rec.Name, job.ErrNotRunning)
	}
	ns, err := proc.NSpid(kids[0])
	if err != nil {
		return err
	}
	nsenter, err := exec.LookPath("nsenter")
	if err != nil {
		return fmt.Errorf("checkpointing a restored foreign tree needs nsenter (util-linux): %w", err)
	}
	var st unix.Stat_t
	if err := unix.Stat(fmt.Sprintf("/proc/%d/ns/pid", kids[0]), &st); err != nil {
		return err
	}
	t.root, t.criuPid = kids[0], ns[len(ns)-1]
	t.wrapper = []string{nsenter, "-t", strconv.Itoa(rec.InitPID), "-p", "-m", "--"}
	t.byPath, t.pidNS, t.foreign = true, st.Ino, true
	// The cgroup also holds the init, which is not checkpointed: CRIU
	// seizes the tree's tasks itself.
	t.freezeCg = nil
	t.resume = continueTree
	return nil
}

// Process checkpoints a tree that ferry did not start, rooted at pid.
func Process(ctx context.Context, pid int, opts Options) (*Result, error) {
	if err := checkPid(pid); err != nil {
		return nil, err
	}
	st, err := proc.ReadStat(pid)
	if err != nil {
		return nil, err
	}
	t := &target{
		name: job.GenerateName(st.Comm), root: pid, criuPid: pid, foreign: true,
		end: killTree, resume: continueTree,
	}
	t.command, _ = readCmdline(pid)
	t.dir, _ = os.Readlink(fmt.Sprintf("/proc/%d/cwd", pid))
	if cg := exactCgroup(pid, opts.CgroupRoot); cg != nil {
		// The tree is exactly its cgroup: freeze that, as for a job.
		t.freezeCg = cg
		t.resume = func(ctx context.Context, _ *Inventory) error { return cg.Thaw(ctx) }
		t.end = func(ctx context.Context, inv *Inventory) error {
			// Frozen v1 tasks take SIGKILL only once thawed.
			return errors.Join(killTree(ctx, inv), cg.Thaw(ctx))
		}
	}
	t.workDir = filepath.Join(opts.LogDir, fmt.Sprintf("pid-%d", pid))
	if err := os.MkdirAll(t.workDir, 0o700); err != nil {
		return nil, err
	}
	return capture(ctx, t, opts)
}

// exactCgroup returns the cgroup of pid when its members are exactly the
// tree rooted at pid (not the root cgroup), else nil.
//
// The tree may fork and reap while we look (a shell loop starts a child
// every few milliseconds), so two listings taken one after the other
// never compare reliably. The check is instead made of two inclusions
// that forks and exits cannot break: every member of the cgroup
// descends from pid, and every process of the tree lives in the cgroup.
// Children inherit their parent's cgroup, so both stay true until the
// freeze unless something moves a task on purpose. A process that ends
// while we look is simply skipped.
func exactCgroup(pid int, root string) *cgroup.Cgroup {
	if root == "" {
		root = cgroup.DefaultRoot
	}
	layout, err := cgroup.DetectLayout(root)
	if err != nil {
		return nil
	}
	dir, ok := cgroupDirOf(pid, layout)
	if !ok || dir == "" {
		return nil
	}
	cg, err := cgroup.Open(dir)
	if err != nil {
		return nil
	}
	members, err := cg.Procs()
	if err != nil || !slices.Contains(members, pid) {
		return nil
	}
	for _, m := range members {
		if !descendsFrom(m, pid) {
			return nil
		}
	}
	pids, err := tree(pid)
	if err != nil {
		return nil
	}
	for _, p := range pids {
		if d, ok := cgroupDirOf(p, layout); ok && d != dir {
			return nil
		}
	}
	return cg
}

// cgroupDirOf is the directory of pid's cgroup: the v2 one when the
// layout has v2, else the v1 freezer's. ok is false when pid is gone;
// dir is "" for the root cgroup.
func cgroupDirOf(pid int, layout *cgroup.Layout) (dir string, ok bool) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		return "", false
	}
	for line := range strings.SplitSeq(strings.TrimSpace(string(data)), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 || parts[2] == "/" {
			continue
		}
		switch {
		case parts[0] == "0" && parts[1] == "" && layout.V2 != "":
			dir = filepath.Join(layout.V2, parts[2])
		case slices.Contains(strings.Split(parts[1], ","), "freezer") && layout.V1Freezer != "" && dir == "":
			dir = filepath.Join(layout.V1Freezer, parts[2])
		}
	}
	return dir, true
}

// descendsFrom reports whether p is root or one of its descendants; a
// process that ends while we climb counts as one (it no longer matters).
func descendsFrom(p, root int) bool {
	for range 1 << 15 { // pid_max bounds any real chain
		if p == root {
			return true
		}
		if p <= 1 {
			return false
		}
		st, err := proc.ReadStat(p)
		if err != nil {
			return true
		}
		p = st.PPID
	}
	return false
}

// checkPid refuses pids that are not a tree ferry may checkpoint.
func checkPid(pid int) error {
	if pid <= 0 {
		return fmt.Errorf("pid %d: %w", pid, ErrBadPid)
	}
	st, err := proc.ReadStat(pid)
	if err != nil {
		return fmt.Errorf("pid %d: %w", pid, ErrNoProcess)
	}
	switch {
	case pid == 1:
		return fmt.Errorf("pid 1 is the host's init: %w", ErrBadPid)
	case st.Flags&proc.PFKthread != 0:
		return fmt.Errorf("pid %d (%s) is a kernel thread: %w", pid, st.Comm, ErrBadPid)
	}
	// Neither ferry nor any of its ancestors: the tree would contain ferry.
	for p, i := os.Getpid(), 0; p > 1 && i < 4096; i++ {
		if p == pid {
			return fmt.Errorf("pid %d is ferry itself or one of its ancestors: %w", pid, ErrBadPid)
		}
		ps, err := proc.ReadStat(p)
		if err != nil {
			break
		}
		p = ps.PPID
	}
	return nil
}

func readCmdline(pid int) ([]string, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return nil, err
	}
	return strings.Split(strings.TrimRight(string(data), "\x00"), "\x00"), nil
}

// continueTree sends SIGCONT to every task of a tree CRIU left stopped.
func continueTree(_ context.Context, inv *Inventory) error {
	return signalTree(inv, unix.SIGCONT)
}

// killTree ends a foreign tree that CRIU left stopped.
func killTree(_ context.Context, inv *Inventory) error {
	return signalTree(inv, unix.SIGKILL)
}

// signalTree signals every task of the tree rooted at inv.Root as it is
// now (CRIU left it stopped, so it cannot change under us; the walk may be
// older than the tree's newest tasks). The root must still be the task
// that was walked, so that a reused pid is never hit.
func signalTree(inv *Inventory, sig unix.Signal) error {
	var rootStart uint64
	for _, task := range inv.Tasks {
		if task.PID == inv.Root {
			rootStart = task.StartTime
		}
	}
	if !proc.Alive(inv.Root, rootStart) {
		return nil // gone already
	}
	pids, err := tree(inv.Root)
	if err != nil {
		return err
	}
	var errs []error
	for _, pid := range pids {
		if err := unix.Kill(pid, sig); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("signalling %d: %w", pid, err))
		}
	}
	return errors.Join(errs...)
}

// capture is the checkpoint itself: walk, plan, stop the tree, CRIU,
// make it durable, then end or resume the tree. Any failure lets the tree
// run on and removes partial output.
func capture(ctx context.Context, t *target, opts Options) (_ *Result, retErr error) {
	start := time.Now()
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	if opts.Store != nil {
		opts.Output, opts.Stream = "-", true // scratch space, packed into the store
	}
	toPipe := opts.Output == "-"
	out := opts.Output
	if !toPipe {
		var err error
		if out, err = filepath.Abs(opts.Output); err != nil {
			return nil, err
		}
		if err := checkOutput(out, opts.Force); err != nil {
			return nil, err
		}
	}
	// Walk and plan before stopping anything: a tree that cannot be
	// checkpointed as asked is refused while it runs on untouched.
	inv, err := Walk(t.root)
	if err != nil {
		return nil, fmt.Errorf("walking %s: %w", t.name, err)
	}
	plan := MakePlan(inv, Allowed{TCPEstablished: opts.TCPEstablished, ExtUnixSk: opts.ExtUnixSk, FileLocks: opts.FileLocks})
	if err := plan.Refusal(); err != nil {
		return nil, fmt.Errorf("%s: %w", t.name, err)
	}
	pipeKey := func(fd int) string {
		l, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%d", t.root, fd))
		if strings.HasPrefix(l, "pipe:[") {
			return l
		}
		return ""
	}
	outPipe, errPipe := pipeKey(1), pipeKey(2)

	tmpBase := filepath.Dir(out)
	if opts.Stream {
		// CRIU's images only pass through on their way into the stream:
		// keep them in memory when there is room.
		tmpBase = scratchDir(inv.Memory.RSS, tmpBase, toPipe)
	}
	tmp, err := os.MkdirTemp(tmpBase, "."+filepath.Base(out)+".partial-")
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
	workDir, err := os.Open(t.workDir)
	if err != nil {
		return nil, err
	}
	defer workDir.Close()
	logPath := filepath.Join(t.workDir, "dump.log")

	// Stop the tree: freeze its cgroup (CRIU sees it frozen and leaves it
	// frozen), or let CRIU seize the tasks and leave them stopped.
	// With --leave-running the job may run on as soon as CRIU has its
	// snapshot, so CRIU freezes the cgroup itself, after its own start-up,
	// and thaws it when done: the job stands still only as long as CRIU
	// needs. Otherwise ferry freezes first and the job stays frozen until
	// the checkpoint is durable and the job is ended.
	// Streamed images must not change while they drain from CRIU's pipes
	// (CRIU gifts pages to the pipe without copying): the tree stays
	// stopped until the stream is complete, whatever --leave-running says.
	//
	// So with --leave-running, when tmpfs has room, CRIU dumps to tmpfs
	// instead and ferry packs the stream once the job runs again: the job
	// pauses only as long as CRIU needs (CRIU's own frozen time), not as
	// long as compression takes.
	postCopy := opts.PostCopy != nil
	if postCopy && (t.freezeCg == nil || opts.LeaveRunning || !opts.Stream || !toPipe) {
		return nil, fmt.Errorf("%s: %w", t.name, ErrNoPostCopy)
	}
	spool := opts.LeaveRunning && scratchDir(inv.Memory.RSS, "", false) == shmDir
	streaming := opts.Stream && !spool && !postCopy && opts.Store == nil && opts.Criu.HasStream(ctx)
	// A streamed handover (stop-copy migration) waits for the verdict
	// inside CRIU's post-dump action, so that CRIU itself ends the tree
	// while its TCP connections are still locked and in repair mode: the
	// peers see no FIN or RST, and nothing they send meanwhile is
	// acknowledged by a copy that will not run on. That needs CRIU to be
	// able to kill a frozen tree (cgroup v2) and to run in ferry's
	// namespaces (the hook's socket path).
	gated := streaming && opts.Handover != nil && !opts.LeaveRunning &&
		t.freezeCg != nil && t.freezeCg.Version == 2 && t.wrapper == nil
	// A migration's dump (gated, post-copy) freezes late, in CRIU's
	// pre-dump action: CRIU's start-up (exec, kerndat: tens of ms) then
	// passes while the job still runs, not in its downtime. CRIU finds the
	// cgroup frozen and leaves it frozen, as when ferry froze first; that
	// is the same with the v1 freezer (which post-copy may use). The
	// action's script reaches ferry through files in ferry's mount
	// namespace, so CRIU must run there (no wrapper).
	lateFreeze := (gated || postCopy) && t.wrapper == nil
	preFreeze := t.freezeCg != nil && (!opts.LeaveRunning || streaming) && !lateFreeze
	// The init binary's identity (a SHA-256 of ferry's binary, tens of
	// milliseconds) is taken while the job still runs.
	var initExe *checkpoint.Executable
	if !t.foreign {
		if exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", t.root)); err == nil {
			if initExe, err = checkpoint.Identify(exe); err != nil {
				return nil, fmt.Errorf("identifying the job's init binary: %w", err)
			}
		}
	}
	if postCopy || gated {
		// A migration writes its stream while the job is frozen.
		image.Warm(2 * runtime.GOMAXPROCS(0))
	}
	var stop stopState
	stop.since = time.Now()
	opts.Progress.SetPhase("freezing")
	if preFreeze {
		if err := t.freezeCg.Freeze(ctx); err != nil {
			return nil, fmt.Errorf("freezing %s: %w", t.name, err)
		}
	}
	stop.stopped = preFreeze
	// freezeLate is the late freeze, answering CRIU's pre-dump action on
	// another goroutine: from its success on, a failure thaws the tree.
	freezeLate := func() error {
		at := time.Now()
		if err := t.freezeCg.Freeze(ctx); err != nil {
			return stop.failed(fmt.Errorf("freezing %s: %w", t.name, err))
		}
		stop.frozen(at)
		return nil
	}
	resumed := false
	resume := func() {
		if resumed {
			return
		}
		resumed = true
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		if err := t.resume(rctx, inv); err != nil {
			log.Error("resuming the tree after a failed checkpoint", "tree", t.name, "err", err)
			retErr = errors.Join(retErr, fmt.Errorf("resuming %s: %w", t.name, err))
		}
	}
	defer func() {
		if retErr != nil && stop.isStopped() {
			resume()
		}
	}()

	copts := &rpc.CriuOpts{
		Pid:               proto.Int32(int32(t.criuPid)),
		LogLevel:          proto.Int32(int32(cmp.Or(opts.CriuLogLevel, 2))),
		LogFile:           proto.String("dump.log"),
		ManageCgroupsMode: rpc.CriuCgMode_IGNORE.Enum(),
		TcpEstablished:    proto.Bool(plan.TCPEstablished),
		FileLocks:         proto.Bool(plan.FileLocks),
		ExtUnixSk:         proto.Bool(plan.ExtUnixSk),
		ShellJob:          proto.Bool(plan.ShellJob),
		LinkRemap:         proto.Bool(plan.LinkRemap),
	}
	if plan.GhostLimit > 0 {
		copts.GhostLimit = proto.Uint32(plan.GhostLimit)
	}
	if t.byPath {
		// CRIU inside the job's namespaces cannot reopen our fds through
		// /proc; it writes its log and statistics beside the images.
		copts.ImagesDirFd, copts.ImagesDir = proto.Int32(-1), proto.String(tmp)
	} else {
		copts.ImagesDirFd = proto.Int32(int32(imgDir.Fd()))
		copts.WorkDirFd = proto.Int32(int32(workDir.Fd()))
	}
	if gated {
		copts.FreezeCgroup = proto.String(t.freezeCg.Path)
		// Left to itself CRIU ends the tree; a refused post-dump rolls
		// back and leaves the cgroup frozen, as ferry froze it (late).
	} else if t.freezeCg != nil {
		copts.FreezeCgroup = proto.String(t.freezeCg.Path)
		// CRIU leaves the cgroup as it found it: frozen by ferry (which
		// ends the job once the checkpoint is durable), or thawed.
		copts.LeaveRunning = proto.Bool(true)
	} else if opts.LeaveRunning && !streaming {
		// Images land in files, not pipes: the tree may run on at once.
		copts.LeaveRunning = proto.Bool(true)
	} else {
		copts.LeaveStopped = proto.Bool(true)
	}
	if t.pidNS != 0 {
		copts.External = append(copts.External, fmt.Sprintf("pid[%d]:%s", t.pidNS, checkpoint.PidNSKey))
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
	var (
		sk         *sink
		iw         *image.Writer
		sizes      map[string]int64
		handedOver bool       // the gate's Handover succeeded: CRIU ended the tree
		held       *heldFiles // PagesLast: the pages files, sent last
	)
	// manifest is what is known of the checkpoint before CRIU runs: all
	// a restore needs to start (a stream's first record carries it).
	manifest := func() *checkpoint.Manifest {
		m := &checkpoint.Manifest{
			Format:         checkpoint.FormatVersion,
			FerryVersion:   opts.FerryVersion,
			CriuVersion:    opts.Criu.Version.String(),
			Kernel:         kernelRelease(),
			Created:        time.Now().UTC(),
			Job:            t.name,
			Command:        t.command,
			Dir:            t.dir,
			Foreign:        t.foreign,
			ExternalPidNS:  t.pidNS != 0,
			ShellJob:       plan.ShellJob,
			OutputPipe:     outPipe,
			ErrorPipe:      errPipe,
			TCPEstablished: plan.TCPEstablished,
			NetworkLock:    netLock,
			FileLocks:      plan.FileLocks,
			ExtUnixSk:      plan.ExtUnixSk,
			Periodic:       t.periodic,
			Init:           initExe,
		}
		m.Host, _ = os.Hostname()
		m.Inventory, _ = json.Marshal(inv)
		m.Plan, _ = json.Marshal(plan)
		return m
	}
	// A post-copy stream starts before CRIU does, with what is known of
	// the checkpoint: the destination starts its restore's slow parts
	// (two CRIUs' start-up) while this side dumps, not in the downtime.
	var (
		lazyStream *image.Writer
		lazyOut    *countingWriter
	)
	// retrySeize says whether CRIU's failure err is worth one more try,
	// and readies the tree for it. CRIU gives up seizing a task that sits
	// in an uninterruptible wait past its timeout (10 s): seen about once
	// in 25 checkpoints of a shell that forks a child every 20 ms, when
	// the freeze caught a vfork parent waiting for a child frozen before
	// it exec'd (the parent stays in D). CRIU fails before it writes
	// anything and leaves the tree as it found it; a moment of running
	// lets the child exec, and the second try seizes a fresh state.
	retrySeize := func(err error) bool {
		if ctx.Err() != nil || !seizeStuck(logPath) {
			return false
		}
		log.Warn("criu could not seize a task of the tree in time; letting the tree run a moment and trying once more",
			"tree", t.name, "err", criu.Explain(err, logPath))
		if stop.isStopped() && t.freezeCg != nil {
			if err := t.freezeCg.Thaw(ctx); err != nil {
				return false
			}
			time.Sleep(20 * time.Millisecond)
			// The frozen time counts from the first freeze still: the
			// job stood still through the first try.
			if err := t.freezeCg.Freeze(ctx); err != nil {
				stop.set(false) // running, as a failed checkpoint leaves it
				return false
			}
		}
		return true
	}
	// seal builds the result and the manifest from what CRIU wrote and
	// completes the checkpoint: once it returns, the output is whole.
	var res *Result
	seal := func(sizes map[string]int64) error {
		var err error
		res = &Result{Job: t.name, Output: out, Inventory: inv, Plan: plan, StoppedBy: "criu"}
		if t.freezeCg != nil {
			res.StoppedBy = "cgroup freezer"
		}
		if postCopy {
			// CRIU's statistics come when the pages have gone; till then the
			// walk's figure for resident memory stands in.
			res.Memory = inv.Memory.RSS
			res.LazyPages = lazyPages(tmp)
		} else if st, err := stats.CriuGetDumpStats(workDir); err == nil {
			res.CriuStats = st
			res.Memory = int64(st.GetPagesWritten()) * int64(os.Getpagesize())
		} else {
			// Sealed inside CRIU's post-dump action: its statistics come later.
			res.Memory = pagesBytes(sizes)
		}
		if streaming {
			res.Processes, res.Threads = countNames(sizes)
		} else {
			res.Processes, res.Threads = countTasks(tmp)
		}
		m := manifest()
		m.Processes, m.Threads, m.MemoryBytes = res.Processes, res.Threads, res.Memory
		if res.CriuStats != nil {
			m.CriuStats, _ = json.Marshal(res.CriuStats)
		}
		switch {
		case opts.Store != nil:
			res.Snapshot, err = finishStore(ctx, tmp, t.name, m, opts)
			if err == nil {
				res.Size = res.Snapshot.StoredBytes
			}
			os.RemoveAll(tmp)
		case streaming:
			res.Size, err = finishStreamed(iw, sk, m, sizes, held)
			os.RemoveAll(tmp)
		case lazyStream != nil:
			opts.Progress.SetPhase("packing")
			if _, err = seal(tmp, m, false); err == nil {
				err = checkpoint.PackInto(lazyStream, tmp, m, checkpoint.ToProto(m))
			}
			res.Size = lazyOut.n
			os.RemoveAll(tmp)
		case opts.Stream:
			res.Size, err = finishStream(tmp, out, m, opts)
			os.RemoveAll(tmp)
		default:
			res.Size, err = finish(tmp, out, m, opts.Force)
		}
		if err != nil {
			return err
		}
		_, freezeStart := stop.get()
		res.Frozen = time.Since(freezeStart)
		if opts.LeaveRunning && !streaming && res.CriuStats != nil {
			// CRIU stopped and resumed the tree itself: its figure is the truth.
			res.Frozen = time.Duration(res.CriuStats.GetFrozenTime()) * time.Microsecond
		}

		res.FrozenAt = freezeStart
		return nil
	}
	// refused turns a Handover or Serve error into capture's: the tree is
	// kept frozen on ErrKeepStopped, else the deferred resume lets it run on.
	refused := func(err error) (*Result, error) {
		if errors.Is(err, ErrKeepStopped) {
			stop.set(false)
			return res, err
		}
		return nil, err
	}
	opts.Progress.SetPhase("dumping")
	var lazy *criu.Daemon
	if postCopy {
		_ = os.Remove(filepath.Join(t.workDir, "stats-dump")) // CRIU writes it once the pages have gone
		var release func()
		if release, err = criu.RaisePipeMax(criu.LazyPipeSize); err != nil {
			return nil, err
		}
		defer release()
		if out == "-" {
			lazyOut = &countingWriter{w: opts.StreamTo, meter: opts.Progress}
			if lazyStream, err = image.NewWriter(lazyOut, checkpoint.ToProto(manifest()), opts.Image); err != nil {
				return nil, err
			}
			defer lazyStream.Abort() // a failed dump leaves the stream incomplete; no-op once closed
		}
		if opts.Prepared != nil {
			if err := opts.Prepared(ctx); err != nil {
				return nil, err
			}
		}
		args := append(cliArgs(copts, tmp, t.workDir, false), "--lazy-pages", "--ps-socket", strconv.Itoa(int(criu.ExtraFD(0))))
		var hook *criu.Actions
		if lateFreeze {
			// CRIU's pre-dump action comes before it is ready, so the hook
			// serves before CRIU starts. Its files get a directory of their
			// own: tmp's files are the checkpoint.
			hookDir := filepath.Join(tmp, "hook")
			if err := os.Mkdir(hookDir, 0o700); err != nil {
				return nil, err
			}
			if hook, err = criu.BridgeActions(hookDir, criu.ActionPreDump); err != nil {
				return nil, err
			}
			defer hook.Close()
			hookArgs, _, err := hook.HookArgs()
			if err != nil {
				return nil, err
			}
			args = append(args, hookArgs...)
			go hook.Serve(ctx, func(string) error { return freezeLate() })
		}
		lazy, err = criu.Command{Path: opts.Criu.Path, ExtraFiles: []*os.File{opts.PostCopy.Pages}, Args: args}.StartReady(ctx)
		if hook != nil {
			_ = hook.Close() // CRIU runs no action once ready; a freeze in progress ends first
			if err == nil && !stop.isStopped() {
				err = errNoLateFreeze
			}
		}
		_, since := stop.get()
		log.Debug("lazy dump ready", "job", t.name, "err", err, "since freeze", time.Since(since))
		if lazy != nil {
			// Whatever happens next, CRIU stops serving (a closed link
			// fails its page server, and with it the destination's
			// daemon) before the tree is ended or resumed.
			defer func() {
				select {
				case <-lazy.Done():
				default:
					_ = unix.Shutdown(int(opts.PostCopy.Pages.Fd()), unix.SHUT_RDWR)
					_ = lazy.Wait()
				}
			}()
		}
	} else if streaming {
		if sk, err = openSink(out, opts); err != nil {
			return nil, err
		}
		defer sk.abort()
		if iw, err = image.NewWriter(sk, checkpoint.ToProto(manifest()), opts.Image); err != nil {
			return nil, err
		}
		if opts.Prepared != nil {
			if err := opts.Prepared(ctx); err != nil {
				iw.Abort()
				return nil, err
			}
		}
		var gate func(map[string]int64) error
		var handoverErr error
		if gated && opts.PagesLast {
			held = &heldFiles{}
			defer held.close()
		}
		if gated {
			_ = os.Remove(filepath.Join(t.workDir, "stats-dump")) // CRIU writes it after the verdict
			gate = func(sizes map[string]int64) error {
				if !stop.isStopped() {
					return errNoLateFreeze // CRIU rolls back
				}
				if err := seal(sizes); err != nil {
					return err
				}
				opts.Progress.SetPhase("handing over")
				if handoverErr = opts.Handover(ctx); handoverErr != nil {
					return handoverErr
				}
				handedOver = true
				return nil
			}
		}
		var gateErr error
		var freeze func() error
		if lateFreeze {
			freeze = freezeLate
		}
		sizes, gateErr, err = streamDump(ctx, opts.Criu.Path, t.wrapper, copts, tmp, t.workDir, iw, held, freeze, gate)
		if err != nil && !lateFreeze && retrySeize(err) {
			// Nothing of the tree was written: CRIU fails before that.
			sizes, gateErr, err = streamDump(ctx, opts.Criu.Path, t.wrapper, copts, tmp, t.workDir, iw, held, freeze, gate)
		}
		switch {
		case handedOver:
			// The destination holds the job: whatever CRIU says now,
			// this copy must go (ended below if CRIU did not).
			if err != nil {
				log.Warn("criu failed after the handover; ferry ends the tree itself", "tree", t.name, "err", err)
				err = nil
			}
		case handoverErr != nil:
			stop.set(true)
			return refused(handoverErr)
		case gateErr != nil:
			err = gateErr
		}
		if err != nil {
			_ = iw.Close()
		}
	} else {
		_, err = criu.Do(ctx, opts.Criu.Path, criu.Call{Type: rpc.CriuReqType_DUMP, Opts: copts, Wrapper: t.wrapper})
		if err != nil && retrySeize(err) {
			_, err = criu.Do(ctx, opts.Criu.Path, criu.Call{Type: rpc.CriuReqType_DUMP, Opts: copts, Wrapper: t.wrapper})
		}
	}
	if t.byPath {
		for _, f := range []string{"dump.log", "stats-dump"} {
			_ = os.Rename(filepath.Join(tmp, f), filepath.Join(t.workDir, f))
		}
	}
	if !lateFreeze {
		// From here on the tree is stopped until ended or resumed. A late
		// freeze says so itself: a CRIU that failed before it froze
		// nothing.
		stop.set(true)
	}
	if err != nil {
		if ferr := stop.freezeErr(); ferr != nil {
			return nil, ferr // CRIU failed because the late freeze did
		}
		return nil, fmt.Errorf("checkpointing %s: %w", t.name, criu.Explain(err, logPath))
	}
	if err := ctx.Err(); err != nil && !handedOver {
		return nil, err
	}
	if res == nil {
		if err := seal(sizes); err != nil {
			return nil, err
		}
	} else if st, err := stats.CriuGetDumpStats(workDir); err == nil {
		res.CriuStats = st
	}

	if opts.Handover != nil && !opts.LeaveRunning && !handedOver {
		opts.Progress.SetPhase("handing over")
		if err := opts.Handover(ctx); err != nil {
			return refused(err)
		}
	}
	if lazy != nil {
		opts.Progress.SetPhase("serving pages")
		served := make(chan error, 1)
		go func() {
			if err := lazy.Wait(); err != nil {
				served <- criu.Explain(err, logPath)
				return
			}
			served <- nil
		}()
		if err := opts.PostCopy.Serve(ctx, served); err != nil {
			return refused(err)
		}
		if st, err := stats.CriuGetDumpStats(workDir); err == nil {
			res.CriuStats = st
		}
	}
	if opts.LeaveRunning {
		resume()
		if retErr != nil {
			return res, retErr
		}
	} else {
		// The checkpoint is durable: now, and only now, end the tree.
		ectx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 15*time.Second)
		defer cancel()
		if err := t.end(ectx, inv); err != nil {
			if opts.Handover != nil {
				// Another copy holds the job now: this one must not
				// run again, whatever is left of it.
				stop.set(false)
				return res, fmt.Errorf("%w: %s was handed over, but ending it here failed: %w", ErrKeepStopped, t.name, err)
			}
			return res, fmt.Errorf("checkpoint written to %s, but ending %s: %w", out, t.name, err)
		}
		res.JobEnded = true
	}
	res.Total = time.Since(start)
	return res, nil
}

// seizeStuck says whether CRIU's log at path shows it timed out seizing
// the tree (its only timeout: the alarm covers collect_pstree alone).
func seizeStuck(path string) bool {
	b, err := os.ReadFile(path)
	return err == nil && (bytes.Contains(b, []byte("Timeout reached")) || bytes.Contains(b, []byte("Unseizable non-zombie")))
}

// errNoLateFreeze is a dump with a late freeze whose pre-dump action
// never froze the tree.
var errNoLateFreeze = errors.New("criu went on without running ferry's pre-dump action (the late freeze)")

// stopState says whether a failed checkpoint must resume the tree and
// since when the tree stands still. A late freeze sets it from the
// goroutine that answers CRIU's pre-dump action.
type stopState struct {
	mu      sync.Mutex
	stopped bool
	since   time.Time
	err     error // the late freeze's failure
}

func (s *stopState) frozen(at time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stopped, s.since = true, at
}

func (s *stopState) failed(err error) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.err = err
	return err
}

func (s *stopState) set(stopped bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stopped = stopped
}

func (s *stopState) isStopped() bool { stopped, _ := s.get(); return stopped }

func (s *stopState) get() (stopped bool, since time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stopped, s.since
}

func (s *stopState) freezeErr() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
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
	total, err := seal(tmp, m, true)
	if err != nil {
		return 0, err
	}
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

// finishStream packs the checkpoint in tmp into one image stream: to
// opts.StreamTo for "-", else to a file created beside out, fsynced and
// renamed into place (see sink). It returns the stream's size.
func finishStream(tmp, out string, m *checkpoint.Manifest, opts Options) (int64, error) {
	opts.Progress.SetPhase("packing")
	if _, err := seal(tmp, m, false); err != nil {
		return 0, err
	}
	sk, err := openSink(out, opts)
	if err != nil {
		return 0, err
	}
	defer sk.abort() // no-op once committed
	if _, _, err := checkpoint.Pack(tmp, sk, m, opts.Image); err != nil {
		return 0, fmt.Errorf("writing %s: %w", outputName(out), err)
	}
	return sk.commit()
}

// finishStore adds the images in tmp to opts.Store as a snapshot of job,
// with the manifest as its meta; durable when it returns.
func finishStore(ctx context.Context, tmp, job string, m *checkpoint.Manifest, opts Options) (*store.Snapshot, error) {
	opts.Progress.SetPhase("storing")
	if _, err := seal(tmp, m, false); err != nil {
		return nil, err
	}
	meta, err := os.ReadFile(filepath.Join(tmp, checkpoint.ManifestFile))
	if err != nil {
		return nil, err
	}
	w, err := opts.Store.Begin(ctx, job)
	if err != nil {
		return nil, err
	}
	defer w.Abort() // no-op after Commit
	for name := range m.Files {
		if err := copyInto(w, filepath.Join(tmp, name), name, opts.Progress); err != nil {
			return nil, fmt.Errorf("storing %s: %w", name, err)
		}
	}
	snap, err := w.Commit(meta)
	if err != nil {
		return nil, err
	}
	return &snap, nil
}

func copyInto(w *store.Writer, path, name string, meter *progress.Meter) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	fw, err := w.Create(name)
	if err != nil {
		return err
	}
	if _, err := io.Copy(fw, meter.Reader(f)); err != nil {
		fw.Close()
		return err
	}
	return fw.Close()
}

type countingWriter struct {
	w     io.Writer
	n     int64
	meter *progress.Meter
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	c.meter.Add(int64(n))
	return n, err
}

// seal makes the images 0600 (CRIU creates them 0644; they hold process
// memory), records their sizes in m, writes the manifest beside them, and
// with sync fsyncs it all. It returns the bytes of the checkpoint.
func seal(tmp string, m *checkpoint.Manifest, sync bool) (int64, error) {
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
			err = f.Chmod(0o600)
		}
		if err == nil && sync {
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
	if _, err := mf.Write(append(data, '\n')); err == nil && sync {
		err = mf.Sync()
	}
	if cerr := mf.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return 0, fmt.Errorf("writing manifest: %w", err)
	}
	return total + int64(len(data)+1), nil
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

// countNames is countTasks for streamed images, from their names.
// pagesBytes is the memory in the pages images of a streamed checkpoint.
func pagesBytes(sizes map[string]int64) int64 {
	var n int64
	for name, size := range sizes {
		if strings.HasPrefix(name, "pages-") {
			n += size
		}
	}
	return n
}

func countNames(sizes map[string]int64) (procs, threads int) {
	for name := range sizes {
		switch {
		case strings.HasPrefix(name, "mm-"):
			procs++
		case strings.HasPrefix(name, "core-"):
			threads++
		}
	}
	return procs, threads
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

// shmDir is the tmpfs ferry uses for scratch space.
const shmDir = "/dev/shm"

// scratchDir picks where CRIU's images wait to be packed: tmpfs when it
// has room for twice the tree's resident memory, else beside the output
// (or the system's temporary directory for a pipe).
func scratchDir(rss int64, besideOutput string, toPipe bool) string {
	var st unix.Statfs_t
	if unix.Statfs(shmDir, &st) == nil && int64(st.Bavail)*int64(st.Bsize) > 2*rss+64<<20 {
		return shmDir
	}
	if toPipe {
		return os.TempDir()
	}
	return besideOutput
}
