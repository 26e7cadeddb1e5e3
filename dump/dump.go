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
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/checkpoint-restore/go-criu/v7/rpc"
	"github.com/checkpoint-restore/go-criu/v7/stats"
	"golang.org/x/sys/unix"

	"github.com/ferry-cr/ferry/image"
	"github.com/ferry-cr/ferry/internal/cgroup"
	"github.com/ferry-cr/ferry/internal/checkpoint"
	"github.com/ferry-cr/ferry/internal/criu"
	"github.com/ferry-cr/ferry/internal/job"
	"github.com/ferry-cr/ferry/internal/lease"
	"github.com/ferry-cr/ferry/internal/proc"
	"github.com/ferry-cr/ferry/internal/progress"
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
	Store SnapshotStore
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
	// Committed, when set, is called once the lease's End is committed:
	// the point of no return, from which the tree never runs again
	// (this process ends it, or the job's guard does should this
	// process die), though ending it (CRIU's kill, the tree's exit,
	// freeing its memory: 85 ms for a 1 GiB job here) is still to come.
	// A stop-copy migration lets the destination run its copy from here.
	Committed func()
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
	// Lease, when set, is the job's lease, taken already by the caller
	// (a migration takes it before it talks to the destination, so that a
	// busy job is refused at once); the caller closes it. Otherwise the
	// checkpoint takes the lease itself.
	Lease *lease.Lease
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
	Snapshot  any                   `json:"snapshot,omitempty"`  // the store's record of the snapshot added (Options.Store)
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
	// takeLease takes the job's lease from its guard (see stop.go); nil
	// for a tree with no guard. A nil lease and no error: no guard either.
	takeLease func(ctx context.Context, op string) (*lease.Lease, error)
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
		takeLease: func(ctx context.Context, op string) (*lease.Lease, error) {
			return s.TakeLease(ctx, name, op)
		},
	}
	if p := rec.Snapshots; p != nil && p.Every > 0 {
		t.periodic = &checkpoint.Periodic{EveryNs: int64(p.Every), Keep: int32(p.Keep)}
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
		end: killTree,
	}
	t.command, _ = readCmdline(pid)
	t.dir, _ = os.Readlink(fmt.Sprintf("/proc/%d/cwd", pid))
	if cg := exactCgroup(pid, opts.CgroupRoot); cg != nil {
		// The tree is exactly its cgroup: freeze that, as for a job.
		t.freezeCg = cg
		t.end = func(ctx context.Context, inv *Inventory) error {
			// Frozen v1 tasks take SIGKILL only once thawed.
			return errors.Join(killTree(ctx, inv), cg.Thaw(ctx))
		}
	}
	t.takeLease = func(_ context.Context, op string) (*lease.Lease, error) {
		return guardianLease(pid, t.freezeCg, op)
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

// killTree ends a foreign tree that CRIU left stopped.
func killTree(_ context.Context, inv *Inventory) error {
	return signalTree(inv, unix.SIGKILL, nil)
}

// signalTree signals every task of the tree rooted at inv.Root as it is
// now (CRIU left it stopped, so it cannot change under us; the walk may be
// older than the tree's newest tasks), but those skip names. The root
// must still be the task that was walked, so that a reused pid is never
// hit.
func signalTree(inv *Inventory, sig unix.Signal, skip func(pid int) bool) error {
	var rootStart uint64
	for _, task := range inv.Tasks {
		if task.Pid == inv.Root {
			rootStart = task.StartTime
		}
	}
	if !proc.Alive(int(inv.Root), rootStart) {
		return nil // gone already
	}
	pids, err := tree(int(inv.Root))
	if err != nil {
		return err
	}
	var errs []error
	for _, pid := range pids {
		if skip != nil && skip(pid) {
			continue
		}
		if err := unix.Kill(pid, sig); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("signalling %d: %w", pid, err))
		}
	}
	return errors.Join(errs...)
}

// seizeStuck says whether CRIU's log at path shows it timed out seizing
// the tree (its only timeout: the alarm covers collect_pstree alone).
func seizeStuck(path string) bool {
	b, err := os.ReadFile(path)
	return err == nil && (bytes.Contains(b, []byte("Timeout reached")) || bytes.Contains(b, []byte("Unseizable non-zombie")))
}

// parasiteCollided says whether CRIU's log at path shows its parasite
// failed to make its directory because another dump's had (EEXIST).
func parasiteCollided(path string) bool {
	b, err := os.ReadFile(path)
	return err == nil && bytes.Contains(b, []byte("Can't create a directory (-17)"))
}

// errNoLateFreeze is a dump with a late freeze whose pre-dump action
// never froze the tree.
var errNoLateFreeze = errors.New("criu went on without running ferry's pre-dump action (the late freeze)")

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
	data, err := checkpoint.Encode(m)
	if err != nil {
		return 0, err
	}
	mf, err := os.OpenFile(filepath.Join(tmp, checkpoint.ManifestFile), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return 0, err
	}
	if _, err := mf.Write(data); err == nil && sync {
		err = mf.Sync()
	}
	if cerr := mf.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return 0, fmt.Errorf("writing manifest: %w", err)
	}
	return total + int64(len(data)), nil
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

// shmDir is the tmpfs ferry uses for scratch space (FERRY_SCRATCH_TMPFS
// names another, for tests).
var shmDir = cmp.Or(os.Getenv("FERRY_SCRATCH_TMPFS"), "/dev/shm")

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
