package dump

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/checkpoint-restore/go-criu/v7/rpc"
	"github.com/checkpoint-restore/go-criu/v7/stats"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	"github.com/ferry-cr/ferry/image"
	"github.com/ferry-cr/ferry/internal/checkpoint"
	"github.com/ferry-cr/ferry/internal/criu"
	"github.com/ferry-cr/ferry/internal/scratch"
)

// run is one checkpoint in progress: what the stages share.
type run struct {
	t    *target
	opts Options
	how  method
	log  *slog.Logger

	inv     *Inventory
	plan    *Plan
	out     string // the absolute output path, or "-"
	tmp     string // scratch: CRIU's images (or only its sockets, streamed)
	workDir *os.File
	imgDir  *os.File
	logPath string // CRIU's log
	copts   *rpc.CriuOpts
	netLock string
	pipes   [2]string // the tree's stdout and stderr pipes ("pipe:[ino]"), if any
	initExe *checkpoint.Executable

	stop        *stopper
	sink        imageSink
	res         *Result
	handedOver  bool             // the gate committed: CRIU ends the tree
	handoverErr error            // the gate's handover (or commit) failed: CRIU rolled back
	streamed    map[string]int64 // the images CRIU streamed, by name and size
	lazy        *criu.Daemon     // post-copy: CRIU serving the memory

	releasePipes func()    // post-copy: the pipe size limit back as it was
	resumed      time.Time // when a --leave-running tree was given back before the seal
}

// capture is the checkpoint itself, as a sequence of stages: prepare
// (walk, plan, decide: nothing is touched yet), take the stop's lease,
// begin the sink, stop the tree, dump with CRIU, seal the sink, hand
// over (a migration), then commit and end the tree, or give it back as
// it was. Any failure gives the tree back and leaves no partial output.
func capture(ctx context.Context, t *target, opts Options) (_ *Result, retErr error) {
	start := time.Now()
	r, err := prepare(ctx, t, opts)
	if err != nil {
		return nil, err
	}
	defer r.close(&retErr)

	if r.stop, err = newStopper(ctx, t, r.how, opts.Lease, opName(opts), r.log); err != nil {
		return nil, err
	}
	defer r.stop.close()
	defer func() {
		if retErr != nil {
			if err := r.stop.giveBack(ctx, r.inv); err != nil {
				r.log.Error("giving the tree back after a failed checkpoint", "tree", t.name, "err", err)
				retErr = errors.Join(retErr, fmt.Errorf("resuming %s: %w", t.name, err))
			}
		}
	}()
	if r.how.warm {
		image.Warm(2 * runtime.GOMAXPROCS(0)) // the stream is written while the job is frozen
	}
	if err := r.sink.begin(ctx, r.manifest()); err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			r.sink.abort()
		}
	}()
	if opts.Prepared != nil && (r.how.sink == sinkStreamed || r.how.sink == sinkLazy) {
		if err := opts.Prepared(ctx); err != nil {
			return nil, err
		}
	}

	opts.Progress.SetPhase("freezing")
	if r.how.stop == stopFirst {
		if err := r.stop.freeze(ctx); err != nil {
			return nil, err
		}
	}
	opts.Progress.SetPhase("dumping")
	defer r.stopServing() // before the tree is given back or ended
	if err := r.dump(ctx); err != nil {
		var refused *refusal
		if errors.As(err, &refused) {
			return r.refused(refused.err)
		}
		return nil, err
	}
	if r.opts.LeaveRunning && r.how.sink == sinkStreamed {
		// Every image has been read out of CRIU's pipes into the
		// writer's buffers: the tree's pages are referenced by nothing
		// now, and it may run while the stream is ended and synced.
		if err := r.stop.giveBack(ctx, r.inv); err != nil {
			return nil, fmt.Errorf("resuming %s: %w", t.name, err)
		}
		r.resumed = time.Now()
	}
	if r.res == nil {
		if err := r.seal(ctx, r.streamed); err != nil {
			return nil, err
		}
	} else if st, err := stats.CriuGetDumpStats(r.workDir); err == nil {
		r.res.CriuStats = st
	}

	if opts.Handover != nil && !opts.LeaveRunning && !r.handedOver {
		opts.Progress.SetPhase("handing over")
		if err := opts.Handover(ctx); err != nil {
			return r.refused(err)
		}
	}
	if r.lazy != nil {
		if err := r.servePages(ctx); err != nil {
			return r.refused(err)
		}
	}
	if err := r.finish(ctx); err != nil {
		return r.res, err
	}
	r.res.Total = time.Since(start)
	return r.res, nil
}

// opName is what `ferry list` says the job is doing.
func opName(opts Options) string {
	switch {
	case opts.Handover != nil:
		return "migrate"
	case opts.Store != nil:
		return "snapshot"
	}
	return "checkpoint"
}

// prepare walks and plans the tree and decides the method, while the
// tree runs on untouched: a tree that cannot be checkpointed as asked is
// refused here.
func prepare(ctx context.Context, t *target, opts Options) (_ *run, retErr error) {
	r := &run{t: t, opts: opts, log: cmp.Or(opts.Logger, slog.Default())}
	if opts.Store != nil {
		r.opts.Output, r.opts.Stream = "-", true // scratch space, packed into the store
	}
	r.out = r.opts.Output
	if r.out != "-" {
		var err error
		if r.out, err = filepath.Abs(r.out); err != nil {
			return nil, err
		}
		if err := checkOutput(r.out, opts.Force); err != nil {
			return nil, err
		}
	}
	inv, err := Walk(t.root)
	if err != nil {
		return nil, fmt.Errorf("walking %s: %w", t.name, err)
	}
	r.inv = inv
	r.plan = MakePlan(inv, Allowed{TCPEstablished: opts.TCPEstablished, ExtUnixSk: opts.ExtUnixSk, FileLocks: opts.FileLocks})
	if err := Refusal(r.plan); err != nil {
		return nil, fmt.Errorf("%s: %w", t.name, err)
	}
	r.how, err = decide(request{
		toPipe: r.out == "-", stream: r.opts.Stream, store: opts.Store != nil,
		leaveRunning: opts.LeaveRunning, postCopy: opts.PostCopy != nil,
		handover: opts.Handover != nil, pagesLast: opts.PagesLast, tcpEstablished: r.plan.TcpEstablished,
		cgroup:      t.freezeCg != nil,
		wrapped:     t.wrapper != nil,
		criuStreams: func() bool { return opts.Criu.HasStream(ctx) },
		tmpfsRoom:   scratchDir(inv.GetMemory().GetRss(), "", false) == shmDir,
	})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", t.name, err)
	}
	for i, fd := range []int{1, 2} {
		if l, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%d", t.root, fd)); strings.HasPrefix(l, "pipe:[") {
			r.pipes[i] = l
		}
	}
	// The init binary's identity (a SHA-256 of ferry's binary, tens of
	// milliseconds) is taken while the job still runs.
	if !t.foreign {
		if exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", t.root)); err == nil {
			if r.initExe, err = checkpoint.Identify(exe); err != nil {
				return nil, fmt.Errorf("identifying the job's init binary: %w", err)
			}
		}
	}
	if err := r.scratch(); err != nil {
		r.close(&err)
		return nil, err
	}
	r.copts = r.criuOptions(ctx)
	r.sink = newSink(r.how, r.tmp, r.out, t.name, r.opts)
	r.log.Debug("checkpoint method", "tree", t.name, "sink", r.how.sink, "stop", r.how.stop, "gated", r.how.gated, "pagesLast", r.how.holdPages)
	return r, nil
}

// scratch makes the directory CRIU writes into: beside the output for a
// directory checkpoint (renamed into place), else in tmpfs when it has
// room, since the images only pass through on their way.
func (r *run) scratch() error {
	base := filepath.Dir(r.out)
	if r.how.sink != sinkDir {
		base = scratchDir(r.inv.GetMemory().GetRss(), base, r.out == "-")
	}
	// Named after this process: should it be killed, the next ferry
	// command removes what it left (scratch.Sweep).
	prefix := filepath.Base(r.out)
	if r.out == "-" {
		prefix = "checkpoint"
	}
	tmp, err := scratch.Dir(base, prefix)
	if err == nil && r.how.sink.streamed() && len(tmp)+1+len(criu.CaptureSocket) > maxSocketPath {
		// A streamed dump's directory holds only CRIU's sockets, whose
		// paths must fit in a socket address: a deep temporary directory
		// will not do.
		os.Remove(tmp)
		if err = os.MkdirAll(shortScratch, 0o700); err == nil {
			tmp, err = scratch.Dir(shortScratch, prefix)
		}
	}
	if err != nil {
		return fmt.Errorf("creating checkpoint directory: %w", err)
	}
	r.tmp = tmp
	if r.imgDir, err = os.Open(tmp); err != nil {
		return err
	}
	if r.workDir, err = os.Open(r.t.workDir); err != nil {
		return err
	}
	r.logPath = filepath.Join(r.t.workDir, "dump.log")
	return nil
}

// maxSocketPath is the room for a unix socket's path (sun_path less the
// NUL); shortScratch is where a streamed dump's sockets go when the
// temporary directory is too deep for them (restore's serve sockets go
// there too; the next ferry command sweeps what a killed one left).
const (
	maxSocketPath = 107
	shortScratch  = "/run/ferry-serve"
)

// close releases the run's files, and its scratch after a failure.
func (r *run) close(err *error) {
	if r.imgDir != nil {
		r.imgDir.Close()
	}
	if r.workDir != nil {
		r.workDir.Close()
	}
	if *err != nil && r.tmp != "" {
		os.RemoveAll(r.tmp)
	}
	if r.releasePipes != nil {
		r.releasePipes()
	}
}

// criuOptions are CRIU's options for this checkpoint.
func (r *run) criuOptions(ctx context.Context) *rpc.CriuOpts {
	t, plan := r.t, r.plan
	o := &rpc.CriuOpts{
		Pid:               proto.Int32(int32(t.criuPid)),
		LogLevel:          proto.Int32(int32(cmp.Or(r.opts.CriuLogLevel, 2))),
		LogFile:           proto.String("dump.log"),
		ManageCgroupsMode: rpc.CriuCgMode_IGNORE.Enum(),
		TcpEstablished:    proto.Bool(plan.TcpEstablished),
		FileLocks:         proto.Bool(plan.FileLocks),
		ExtUnixSk:         proto.Bool(plan.ExtUnixSk),
		ShellJob:          proto.Bool(plan.ShellJob),
		LinkRemap:         proto.Bool(plan.LinkRemap),
	}
	if plan.GhostLimit > 0 {
		o.GhostLimit = proto.Uint32(plan.GhostLimit)
	}
	if t.byPath {
		// CRIU inside the job's namespaces cannot reopen our fds through
		// /proc; it writes its log and statistics beside the images.
		o.ImagesDirFd, o.ImagesDir = proto.Int32(-1), proto.String(r.tmp)
	} else {
		o.ImagesDirFd = proto.Int32(int32(r.imgDir.Fd()))
		o.WorkDirFd = proto.Int32(int32(r.workDir.Fd()))
	}
	if t.freezeCg != nil {
		o.FreezeCgroup = proto.String(t.freezeCg.Path)
	}
	switch r.how.leaves {
	case leavesAsFound, leavesRunning:
		o.LeaveRunning = proto.Bool(true)
	case leavesStopped:
		o.LeaveStopped = proto.Bool(true)
	case leavesDead:
		// Left to itself CRIU ends the tree; a refused post-dump rolls
		// back and leaves the cgroup frozen, as ferry froze it (late).
	}
	if t.pidNS != 0 {
		o.External = append(o.External, fmt.Sprintf("pid[%d]:%s", t.pidNS, checkpoint.PidNSKey))
	}
	if plan.TcpEstablished {
		m := networkLock(ctx, r.opts.Criu)
		o.NetworkLock = m.Enum()
		r.netLock = strings.ToLower(m.String())
	}
	if deadline, ok := ctx.Deadline(); ok {
		o.Timeout = proto.Uint32(uint32(max(1, time.Until(deadline).Seconds())))
	}
	return o
}

// manifest is what is known of the checkpoint before CRIU runs: all a
// restore needs to start (a stream's first record carries it).
func (r *run) manifest() *checkpoint.Manifest {
	t, plan := r.t, r.plan
	m := &checkpoint.Manifest{
		Format:          checkpoint.FormatVersion,
		FerryVersion:    r.opts.FerryVersion,
		CriuVersion:     r.opts.Criu.Version.String(),
		Kernel:          kernelRelease(),
		CreatedUnixNano: time.Now().UnixNano(),
		Job:             t.name,
		Command:         t.command,
		Dir:             t.dir,
		Foreign:         t.foreign,
		ExternalPidNs:   t.pidNS != 0,
		ShellJob:        plan.ShellJob,
		OutputPipe:      r.pipes[0],
		ErrorPipe:       r.pipes[1],
		TcpEstablished:  plan.TcpEstablished,
		NetworkLock:     r.netLock,
		FileLocks:       plan.FileLocks,
		ExtUnixSk:       plan.ExtUnixSk,
		Periodic:        t.periodic,
		Init:            r.initExe,
		Inventory:       r.inv,
		Plan:            plan,
	}
	m.Host, _ = os.Hostname()
	m.CpuModel, m.CpuFlags = checkpoint.CPUInfo()
	return m
}

// dump runs CRIU the way the sink takes its images: streamed into the
// sink's writer, as a lazy dump that goes on serving the memory, or into
// the scratch directory over RPC.
func (r *run) dump(ctx context.Context) error {
	if err := r.stop.lost(); err != nil {
		return err // stopped or hung since the freeze: the job runs again
	}
	var err error
	r.stop.criuStarted()
	switch {
	case r.how.sink.streamed():
		err = r.dumpStreamed(ctx)
	case r.how.sink == sinkLazy:
		err = r.dumpLazy(ctx)
	default:
		err = r.dumpDir(ctx)
	}
	if r.t.byPath {
		for _, f := range []string{"dump.log", "stats-dump"} {
			_ = os.Rename(filepath.Join(r.tmp, f), filepath.Join(r.t.workDir, f))
		}
	}
	r.stop.criuReturned(err)
	var refused *refusal
	switch {
	case errors.As(err, &refused):
		return err
	case err != nil:
		if ferr := r.stop.freezeErr(); ferr != nil {
			return ferr // CRIU failed because the late freeze did
		}
		if lerr := r.stop.lost(); lerr != nil {
			// The guard gave the job back while CRIU worked (this
			// process was stopped): that, not CRIU's timeout on a tree
			// that ran on, is why the checkpoint failed.
			r.log.Debug("criu failed after the lease ran out", "tree", r.t.name, "err", criu.Explain(err, r.logPath))
			return lerr
		}
		return fmt.Errorf("checkpointing %s: %w", r.t.name, criu.Explain(err, r.logPath))
	case ctx.Err() != nil && !r.handedOver:
		return ctx.Err()
	}
	return nil
}

// refusal is a Handover's (or page serving's) verdict against ending
// the tree, which capture returns as it is.
type refusal struct{ err error }

func (e *refusal) Error() string { return e.err.Error() }

// refused turns a Handover or Serve error into capture's: the tree is
// kept frozen for the operator on ErrKeepStopped; otherwise it is given
// back (capture's deferred giveBack).
func (r *run) refused(err error) (*Result, error) {
	if errors.Is(err, ErrKeepStopped) {
		if kerr := r.stop.keep(err.Error()); kerr != nil {
			r.log.Error("recording the kept tree with its guard", "tree", r.t.name, "err", kerr)
		}
		return r.res, err
	}
	return nil, err
}

// retrySeize says whether CRIU's failure err is worth one more try, and
// readies the tree for it. CRIU gives up seizing a task that sits in an
// uninterruptible wait past its timeout (10 s): seen about once in 25
// checkpoints of a shell that forks a child every 20 ms, when the freeze
// caught a vfork parent waiting for a child frozen before it exec'd (the
// parent stays in D). CRIU fails before it writes anything and leaves
// the tree as it found it; a moment of running lets the child exec, and
// the second try seizes a fresh state.
//
// Two CRIUs that dump two jobs at the same moment can also collide in
// their parasites (a task of each with the same pid in its own PID
// namespace, and the mount namespace they share: "Can't create a
// directory (-17)", seen with snapshots of two jobs taken together).
// That too fails before anything is written; a second try, a random
// moment later, goes through.
func (r *run) retrySeize(ctx context.Context, err error) bool {
	if ctx.Err() != nil {
		return false
	}
	// Said at Debug: a retry that goes through is no news on stderr,
	// where a failure must stay one line (a second try that fails says
	// why itself); --debug shows it.
	switch {
	case seizeStuck(r.logPath):
		r.log.Debug("criu could not seize a task of the tree in time; letting the tree run a moment and trying once more",
			"tree", r.t.name, "err", criu.Explain(err, r.logPath))
	case parasiteCollided(r.logPath):
		r.log.Debug("criu's parasite collided with another dump's; trying once more", "tree", r.t.name, "err", criu.Explain(err, r.logPath))
		time.Sleep(time.Duration(50+rand.IntN(200)) * time.Millisecond)
	default:
		return false
	}
	return r.stop.retry(ctx)
}

// gate runs at CRIU's post-dump action of a gated dump: every image is
// written, the tree still seized and its TCP connections locked. It seals
// the checkpoint, hands it over (a migration) and commits the lease: nil
// lets CRIU end the tree with its connections in repair mode (peers see
// no FIN or RST, and nothing they send is acknowledged by a copy that will
// not run on); an error rolls CRIU back.
func (r *run) gate(ctx context.Context, sizes map[string]int64) error {
	if !r.stop.isStopped() {
		return errNoLateFreeze // CRIU rolls back
	}
	if err := r.seal(ctx, sizes); err != nil {
		return err
	}
	if r.opts.Handover != nil {
		r.opts.Progress.SetPhase("handing over")
		if r.handoverErr = r.opts.Handover(ctx); r.handoverErr != nil {
			return r.handoverErr
		}
	}
	// The point of no return: from here CRIU ends the tree.
	if err := r.commit(); err != nil {
		r.handoverErr = err
		return err
	}
	r.handedOver = true
	return nil
}

// commit commits the lease's End (see stopper.commit) and tells the
// caller (Options.Committed) once it has landed.
func (r *run) commit() error {
	first, err := r.stop.commit(cmp.Or(r.opts.EndReason, "checkpointed"))
	if err != nil {
		return err
	}
	if f := r.opts.Committed; f != nil && first {
		f()
	}
	return nil
}

// gated settles what CRIU's return means after a gated dump.
func (r *run) gated(err error) error {
	switch {
	case r.handedOver:
		// The checkpoint is committed: whatever CRIU says now, this copy
		// must go (ended below if CRIU did not).
		if err != nil {
			r.log.Warn("criu failed after the commit; ferry ends the tree itself", "tree", r.t.name, "err", err)
		}
		return nil
	case r.handoverErr != nil:
		r.stop.mu.Lock()
		r.stop.stopped = true // CRIU rolled back; the cgroup stays frozen
		r.stop.mu.Unlock()
		return &refusal{err: r.handoverErr}
	}
	return err
}

// dumpDir runs CRIU over RPC into the scratch directory. A gated dump
// (TCP connections kept) seals and commits at CRIU's post-dump
// notification.
func (r *run) dumpDir(ctx context.Context) error {
	call := criu.Call{Type: rpc.CriuReqType_DUMP, Opts: r.copts, Wrapper: r.t.wrapper}
	if r.how.gated {
		_ = os.Remove(filepath.Join(r.t.workDir, "stats-dump")) // CRIU writes it after the verdict
		r.copts.NotifyScripts = proto.Bool(true)
		call.Notify = func(script string, _ int32) error {
			if script == "post-dump" {
				return r.gate(ctx, nil)
			}
			return nil
		}
	}
	_, err := criu.Do(ctx, r.opts.Criu.Path, call)
	if err != nil && !r.how.gated && r.retrySeize(ctx, err) {
		_, err = criu.Do(ctx, r.opts.Criu.Path, call)
	}
	if r.how.gated {
		return r.gated(err)
	}
	return err
}

// dumpStreamed runs `criu dump --stream` into the stream sink; a gated
// dump goes through the gate at CRIU's post-dump action.
func (r *run) dumpStreamed(ctx context.Context) error {
	ss := r.sink.(streamedSink)
	var gate func(map[string]int64) error
	if r.how.gated {
		_ = os.Remove(filepath.Join(r.t.workDir, "stats-dump")) // CRIU writes it after the verdict
		gate = func(sizes map[string]int64) error { return r.gate(ctx, sizes) }
	}
	var freeze func() error
	if r.how.stop == stopLate {
		freeze = r.stop.freezeLate(ctx)
	}
	do := func() (map[string]int64, error, error) {
		return streamDump(ctx, r.opts.Criu.Path, r.t.wrapper, r.copts, r.tmp, r.t.workDir, ss.create, ss.heldPages(), freeze, gate)
	}
	sizes, gateErr, err := do()
	if err != nil && r.how.stop != stopLate && !r.how.gated && r.retrySeize(ctx, err) {
		// Nothing of the tree was written: CRIU fails before that.
		sizes, gateErr, err = do()
	}
	r.streamed = sizes
	if r.handedOver || r.handoverErr != nil {
		return r.gated(err)
	}
	if gateErr != nil {
		return gateErr
	}
	return err
}

// dumpLazy runs CRIU's lazy dump (post-copy): it returns once CRIU has
// written every image but the private memory, which it then serves to
// the destination over opts.PostCopy.Pages.
func (r *run) dumpLazy(ctx context.Context) error {
	_ = os.Remove(filepath.Join(r.t.workDir, "stats-dump")) // CRIU writes it once the pages have gone
	release, err := criu.RaisePipeMax(criu.LazyPipeSize)
	if err != nil {
		return err
	}
	r.releasePipes = release
	args := append(cliArgs(r.copts, r.tmp, r.t.workDir, false), "--lazy-pages", "--ps-socket", strconv.Itoa(int(criu.ExtraFD(0))))
	var hook *criu.Actions
	if r.how.stop == stopLate {
		// CRIU's pre-dump action comes before it is ready, so the hook
		// serves before CRIU starts. Its files get a directory of their
		// own: tmp's files are the checkpoint.
		hookDir := filepath.Join(r.tmp, "hook")
		if err := os.Mkdir(hookDir, 0o700); err != nil {
			return err
		}
		if hook, err = criu.BridgeActions(hookDir, criu.ActionPreDump); err != nil {
			return err
		}
		defer hook.Close()
		hookArgs, _, err := hook.HookArgs()
		if err != nil {
			return err
		}
		args = append(args, hookArgs...)
		freeze := r.stop.freezeLate(ctx)
		go hook.Serve(ctx, func(string) error { return freeze() })
	}
	lazy, err := criu.Command{Path: r.opts.Criu.Path, ExtraFiles: []*os.File{r.opts.PostCopy.Pages}, Args: args}.StartReady(ctx)
	if hook != nil {
		_ = hook.Close() // CRIU runs no action once ready; a freeze in progress ends first
		if err == nil && !r.stop.isStopped() {
			err = errNoLateFreeze
		}
	}
	r.log.Debug("lazy dump ready", "job", r.t.name, "err", err, "since freeze", time.Since(r.stop.frozenSince()))
	r.lazy = lazy
	return err
}

// stopServing stops CRIU's page server (a closed link fails it, and with
// it the destination's daemon) before the tree is ended or resumed.
func (r *run) stopServing() {
	if r.lazy == nil {
		return
	}
	select {
	case <-r.lazy.Done():
	default:
		_ = unix.Shutdown(int(r.opts.PostCopy.Pages.Fd()), unix.SHUT_RDWR)
		_ = r.lazy.Wait()
	}
}

// servePages lets the destination run its copy and follows the transfer
// of the memory until CRIU has served all of it. From the moment the
// destination may run its copy, this one must never run again: the
// lease's verdict is Keep until the pages are all served.
func (r *run) servePages(ctx context.Context) error {
	r.opts.Progress.SetPhase("serving pages")
	t := time.Now()
	if err := r.stop.hold("post-copy migration: the destination runs the job and reads its memory from here; this frozen copy must never run again"); err != nil {
		return err // the lease ran out: the job runs here again, so the destination must drop its copy
	}
	r.log.Debug("the lease holds Keep", "tree", r.t.name, "took", time.Since(t))
	served := make(chan error, 1)
	go func() {
		if err := r.lazy.Wait(); err != nil {
			served <- criu.Explain(err, r.logPath)
			return
		}
		served <- nil
	}()
	if err := r.opts.PostCopy.Serve(ctx, served); err != nil {
		return err
	}
	if st, err := stats.CriuGetDumpStats(r.workDir); err == nil {
		r.res.CriuStats = st
	}
	return nil
}

// seal builds the result and the manifest from what CRIU wrote and seals
// the sink: once it returns, the checkpoint is whole where it was sent.
func (r *run) seal(ctx context.Context, sizes map[string]int64) error {
	t, inv := r.t, r.inv
	res := &Result{Job: t.name, Output: r.out, Inventory: inv, Plan: r.plan, StoppedBy: "criu"}
	if t.freezeCg != nil {
		res.StoppedBy = "cgroup freezer"
	}
	switch {
	case r.how.sink == sinkLazy:
		// CRIU's statistics come when the pages have gone; till then the
		// walk's figure for resident memory stands in.
		res.Memory = inv.GetMemory().GetRss()
		res.LazyPages = lazyPages(r.tmp)
	default:
		if sizes == nil && !r.how.sink.streamed() {
			sizes = dirSizes(r.tmp)
		}
		st, err := stats.CriuGetDumpStats(r.workDir)
		if err != nil && r.imgDir != nil {
			// CRIU run by path inside a foreign job's namespaces writes
			// its statistics beside the images.
			st, err = stats.CriuGetDumpStats(r.imgDir)
		}
		if err == nil {
			res.CriuStats = st
			res.Memory = int64(st.GetPagesWritten()) * int64(os.Getpagesize())
		} else {
			// Sealed inside CRIU's post-dump action: its statistics come
			// later; the pages files say as much.
			res.Memory = pagesBytes(sizes)
		}
	}
	if r.how.sink.streamed() {
		res.Processes, res.Threads = countNames(sizes)
	} else {
		res.Processes, res.Threads = countTasks(r.tmp)
	}
	m := r.manifest()
	m.Processes, m.Threads, m.MemoryBytes = int32(res.Processes), int32(res.Threads), res.Memory
	checkpoint.SetCriuStats(m, res.CriuStats)
	if r.how.sink.streamed() {
		os.RemoveAll(r.tmp) // only CRIU's sockets
	}
	size, err := r.sink.seal(ctx, m, sizes)
	if err != nil {
		return err
	}
	res.Size = size
	if s, ok := r.sink.(interface{ snapshotAdded() any }); ok {
		res.Snapshot = s.snapshotAdded()
	}
	res.FrozenAt = r.stop.frozenSince()
	res.Frozen = time.Since(res.FrozenAt)
	if !r.resumed.IsZero() {
		res.Frozen = r.resumed.Sub(res.FrozenAt)
	}
	if r.opts.LeaveRunning && !r.how.sink.streamed() && res.CriuStats != nil {
		// CRIU stopped and resumed the tree itself: its figure is the truth.
		res.Frozen = time.Duration(res.CriuStats.GetFrozenTime()) * time.Microsecond
	}
	r.res = res
	return nil
}

// finish ends the checkpoint the way it was asked: with --leave-running
// the tree is given back as it was; otherwise, the checkpoint being
// whole where it was sent, the stop's lease is committed (the point of
// no return) and the tree ended.
func (r *run) finish(ctx context.Context) error {
	r.stopServing()
	if r.opts.LeaveRunning {
		return r.stop.giveBack(ctx, r.inv)
	}
	if err := r.commit(); err != nil {
		// The lease ran out first: the guard gave the job back and it
		// runs on, so the checkpoint must not stand beside it.
		r.retract()
		return err
	}
	ectx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 15*time.Second)
	defer cancel()
	if err := r.t.end(ectx, r.inv); err != nil {
		if r.opts.Handover != nil {
			// Another copy holds the job now: this one must not run
			// again, whatever is left of it.
			_ = r.stop.keep(fmt.Sprintf("handed over, but ending it here failed: %v", err))
			return fmt.Errorf("%w: %s was handed over, but ending it here failed: %w", ErrKeepStopped, r.t.name, err)
		}
		return fmt.Errorf("checkpoint written to %s, but ending %s: %w", r.out, r.t.name, err)
	}
	r.res.JobEnded = true
	return nil
}

// retract removes a checkpoint written to a path whose job runs on after
// all (its lease ran out before the commit).
func (r *run) retract() {
	if r.out != "-" && r.how.sink != sinkStore {
		os.RemoveAll(r.out)
	}
}

// dirSizes is the size of each file in dir.
func dirSizes(dir string) map[string]int64 {
	entries, _ := os.ReadDir(dir)
	sizes := make(map[string]int64, len(entries))
	for _, e := range entries {
		if info, err := e.Info(); err == nil && info.Mode().IsRegular() {
			sizes[e.Name()] = info.Size()
		}
	}
	return sizes
}
