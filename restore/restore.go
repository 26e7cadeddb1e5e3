// Package restore brings a checkpoint back as an ordinary ferry job: it
// checks the checkpoint before touching anything, then has a new shim run
// CRIU so that the restored tree becomes the shim's child, in a cgroup of
// its own and in fresh PID and IPC namespaces (CRIU recreates the ones the
// tree had, ferry's init as pid 1 included), with fresh stdout and stderr.
// If CRIU fails, nothing of the tree is left and the checkpoint is
// untouched (CRIU only reads it).
package restore

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/ferry-cr/ferry/image"
	"github.com/ferry-cr/ferry/internal/cgroup"
	"github.com/ferry-cr/ferry/internal/checkpoint"
	"github.com/ferry-cr/ferry/internal/criu"
	"github.com/ferry-cr/ferry/internal/job"
	"github.com/ferry-cr/ferry/internal/progress"
	"github.com/ferry-cr/ferry/internal/scratch"
)

// restoreTimeout bounds one CRIU restore run by the shim.
const restoreTimeout = 5 * time.Minute

// Options says how to restore. Name defaults to the checkpointed job's.
type Options struct {
	Criu       *criu.Binary
	Checkpoint string    // a directory, a .ferry file, or "-" for Stdin
	Stdin      io.Reader // the stream when Checkpoint is "-"
	// ServeDir is where the directory CRIU is pointed at while a .ferry
	// stream is served to it (the manifest and CRIU's serve socket, no
	// images) is made; removed afterwards.
	ServeDir   string
	Name       string
	CgroupRoot string
	Logger     *slog.Logger
	// Progress counts the image bytes handed to CRIU; nil for none.
	Progress *progress.Meter
	// Stopped leaves the restored job frozen; thawing it starts it.
	Stopped bool
	// Migration is the note the job's record carries from its creation
	// (a migration's destination: held frozen for the source's word).
	Migration *job.MigrationNote
	// LazyPages restores a directory checkpoint with CRIU lazy pages:
	// the caller runs `criu lazy-pages` in that directory first, or
	// alongside (LazyReady).
	LazyPages bool
	// LazyReady, with LazyPages, lets the restore start before the
	// lazy-pages daemon is ready, so that both CRIUs start up (tens of
	// milliseconds each, downtime in a migration) at once. CRIU connects
	// to the daemon early in its restore, before any action script runs,
	// so it is held at its first image instead: the images are served to
	// it (--stream) and the first is answered only once LazyReady, which
	// waits for the daemon, returns; an error fails the restore before
	// CRIU touches anything.
	LazyReady func(ctx context.Context) error
	// Prepared, with Early and a stream on Stdin whose first record holds
	// the whole manifest as known before the dump (a ferry of this
	// version wrote it, and said so), has CRIU start at once, from that
	// record, before the rest of the stream has come; it is held at its
	// first image until the stream names its remaining files. Prepared is
	// called when CRIU waits there: a migration's source dumps then.
	Prepared func()
	// LazyImages, with LazyReady, is the directory the images are served
	// from when it is not Checkpoint, which may then hold only the
	// manifest: CRIU can start before the images have come, as long as
	// they are there when LazyReady returns.
	LazyImages string
	// BeforeStart, when set, runs once the checkpoint is checked and
	// complete (a stream read whole), just before CRIU starts; an error
	// stops the restore. A migration destination takes over the source's
	// addresses here.
	BeforeStart func(ctx context.Context) error
	// Snapshots has the restored job's shim take periodic snapshots
	// (Every 0: none). When it is nil, FromSnapshot carries on the policy
	// the snapshot recorded, into StoreDir.
	Snapshots *job.SnapshotPolicy
	// StoreDir is the directory of the store FromSnapshot restores from.
	StoreDir string
	// Early starts CRIU on a stream from Stdin as soon as the stream names
	// its remaining files (image.StreamArchive), which are then served as
	// they arrive: the restore overlaps the transfer of the job's memory.
	// Needs Stopped: the restored job is held until the whole stream has
	// proved good, and discarded if it does not.
	Early bool
}

// maxManifest bounds ferry.json read from a stream.
const maxManifest = 64 << 20

// maxSocketPath is the room for a unix socket's path (sun_path less the
// NUL), and shortServeDir the served directory's home when ServeDir is
// too deep for it.
const (
	maxSocketPath = 107
	shortServeDir = "/run/ferry-serve"
)

// tempServeDir makes a new scratch directory (package scratch, so that
// what a killed ferry leaves is swept by the next) named after prefix in
// base, or in shortServeDir when base is too deep for a socket name of
// sock bytes in it: a unix socket's path is limited (108 bytes with the
// NUL).
func tempServeDir(base, prefix string, sock int) (string, error) {
	prefix = strings.TrimSuffix(prefix, "-")
	if err := os.MkdirAll(base, 0o700); err != nil {
		return "", err
	}
	dir, err := scratch.Dir(base, prefix)
	if err != nil || len(dir)+len("/")+sock < maxSocketPath {
		return dir, err
	}
	_ = os.Remove(dir)
	if err := os.MkdirAll(shortServeDir, 0o700); err != nil {
		return "", err
	}
	return scratch.Dir(shortServeDir, prefix)
}

// Job restores the checkpoint opts.Checkpoint as a job of store s and
// returns its record once the restored tree runs.
func Job(ctx context.Context, s *job.Registry, opts Options) (*job.Record, error) {
	if checkpoint.IsStream(opts.Checkpoint) {
		if opts.Early && !opts.Stopped {
			return nil, errors.New("an early restore must hold the job stopped until the stream has proved whole")
		}
		if opts.Early && opts.Prepared != nil && opts.Checkpoint == "-" {
			src, err := newEarlySource(opts)
			if err != nil {
				return nil, err
			}
			return restoreFrom(ctx, s, src, opts)
		}
		src, err := newStreamSource(ctx, opts)
		if err != nil {
			return nil, err
		}
		return restoreFrom(ctx, s, src, opts)
	}
	dir, err := filepath.Abs(opts.Checkpoint)
	if err != nil {
		return nil, err
	}
	load := checkpoint.Load
	if opts.LazyPages && opts.LazyReady != nil && opts.LazyImages != "" {
		load = checkpoint.LoadManifest // the images come later, elsewhere
	}
	m, err := load(dir)
	if err != nil {
		return nil, err
	}
	d := dirSource{path: dir, m: m}
	if opts.LazyPages && opts.LazyReady != nil {
		if len(dir)+len("/"+criu.ServeSocket) >= maxSocketPath {
			// No room for the serve socket's path: the daemon, then the
			// restore, one after the other.
			if err := check(m, dir, opts); err != nil {
				return nil, err
			}
			if err := opts.LazyReady(ctx); err != nil {
				return nil, err
			}
			return start(ctx, s, m, dir, opts)
		}
		return restoreFrom(ctx, s, &lazySource{dirSource: d, images: cmp.Or(opts.LazyImages, dir), ready_: opts.LazyReady}, opts)
	}
	return restoreFrom(ctx, s, &d, opts)
}

// check says whether this host can restore m at all.
func check(m *checkpoint.Manifest, from string, opts Options) error {
	if v, err := criu.ParseVersion("Version: " + m.CriuVersion); err == nil && !opts.Criu.Version.AtLeast(v) {
		return fmt.Errorf("%s was taken with CRIU %s, this CRIU is %s: restore with CRIU >= %s: %w",
			from, m.CriuVersion, opts.Criu.Version, m.CriuVersion, checkpoint.ErrUnsupportedVersion)
	}
	if m.Init != nil {
		if err := checkpoint.CheckExecutable(m.Init); err != nil {
			return err
		}
	}
	return nil
}

func start(ctx context.Context, s *job.Registry, m *checkpoint.Manifest, dir string, opts Options) (*job.Record, error) {
	name := opts.Name
	if name == "" {
		name = m.Job
	}
	if opts.LazyPages && m.Foreign {
		return nil, fmt.Errorf("%s: a tree ferry did not start cannot be restored with lazy pages", dir)
	}
	if opts.BeforeStart != nil {
		if err := opts.BeforeStart(ctx); err != nil {
			return nil, err
		}
	}
	return job.StartRestored(ctx, s, job.RestoreSpec{
		Name:       name,
		Checkpoint: dir,
		Criu:       opts.Criu.Path,
		Command:    m.Command,
		Dir:        m.Dir,
		Foreign:    m.Foreign,
		Stopped:    opts.Stopped,
		LazyPages:  opts.LazyPages,
		CgroupRoot: opts.CgroupRoot,
		Logger:     opts.Logger,
		Snapshots:  opts.Snapshots,
		Migration:  opts.Migration,
	})
}

// streamed is a stream being served to a restore: its archive and its
// manifest, and the files still to come when CRIU starts (an early
// restore's: the job's memory).
type streamed struct {
	a        *image.Archive
	m        *checkpoint.Manifest
	from     string
	later    map[string]bool
	progress *progress.Meter
	log      *slog.Logger
	t0       time.Time
}

// begin notes the files still to come, checks the others against the
// manifest (of manifestBytes) and sets the progress total.
func (st *streamed) begin(manifestBytes int64) error {
	st.later = map[string]bool{}
	for _, name := range st.a.Remaining() {
		st.later[name] = true
	}
	if err := st.checkSizes(); err != nil {
		return err
	}
	// The stream's raw bytes: the trailer's figure, or (a stream still
	// arriving) the same sum, from the manifest's sizes and the manifest.
	total := int64(st.a.Trailer().GetRawBytes())
	if st.a.Trailer() == nil {
		total = manifestBytes
		for _, size := range st.m.Files {
			total += size
		}
	}
	st.progress.SetTotal(total)
	return nil
}

// checkSizes checks every file of the manifest but those still to come.
func (st *streamed) checkSizes() error {
	for name, size := range st.m.Files {
		if got, ok := st.a.Size(name); !st.later[name] && (!ok || got != uint64(size)) {
			return fmt.Errorf("%s: %s is missing or has the wrong size in the stream: %w", st.from, name, checkpoint.ErrIncomplete)
		}
	}
	return nil
}

// image answers CRIU's request for the image name from the archive.
func (st *streamed) image(name string) (func(io.Writer) error, bool) {
	if !st.a.Has(name) || name == checkpoint.ManifestFile {
		return nil, false
	}
	return func(w io.Writer) error {
		if pipe, ok := w.(*os.File); ok {
			_, err := st.a.SpliceTo(name, pipe, st.progress.Add)
			return err
		}
		_, err := st.a.WriteTo(name, st.progress.Writer(w))
		return err
	}, true
}

// settle ends a restore from the stream, which returned rec and err, its
// serving serr. A restore that started before the stream's last files
// had come holds the job until the stream has proved whole, and discards
// it if it does not.
func (st *streamed) settle(ctx context.Context, s *job.Registry, rec *job.Record, err, serr error) (*job.Record, error) {
	if err == nil && len(st.later) > 0 {
		if serr = st.a.Wait(); serr == nil {
			st.later = nil
			serr = st.checkSizes()
		}
		st.log.Debug("checkpoint complete", "bytes", st.a.Trailer().GetStoredBytes(), "err", serr, "since start", time.Since(st.t0))
		if serr != nil {
			dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 15*time.Second)
			defer cancel()
			if derr := s.Discard(dctx, rec.Name, st.log); derr != nil {
				return nil, fmt.Errorf("reading checkpoint from %s: %w; and discarding the restored copy: %w", st.from, serr, derr)
			}
			_ = s.Remove(rec.Name)
			err = serr
		}
	}
	if serr != nil && err != nil {
		// The stream's fault is the one to report: CRIU failed because
		// an image was cut short.
		return nil, fmt.Errorf("reading checkpoint from %s: %w (the restore was aborted and nothing of it is left)", st.from, serr)
	}
	return rec, err
}

// openArchive opens the checkpoint stream to restore: standard input, a
// file (indexed, not read), or a FIFO (read whole, like a pipe). Waiting
// for a FIFO's writer and reading a pipe end when ctx does (Ctrl-C,
// SIGTERM, --timeout), with ctx's error: a writer that never comes or goes
// silent cannot hold a restore, nor anything it started, forever.
func openArchive(ctx context.Context, opts Options) (*image.Archive, string, func(), error) {
	read := image.ReadArchive
	if opts.Checkpoint == "-" {
		src, closeIn := opts.Stdin, func() {}
		if f, ok := src.(*os.File); ok {
			in, err := image.NewInput(ctx, f)
			if err != nil {
				return nil, "", nil, fmt.Errorf("reading checkpoint from standard input: %w", err)
			}
			src, closeIn = in, func() { in.Close() }
		}
		if opts.Early {
			read = image.StreamArchive
		}
		a, err := read(opts.Progress.Reader(src))
		if err != nil {
			closeIn()
			return nil, "", nil, fmt.Errorf("reading checkpoint from standard input: %w", err)
		}
		return a, "standard input", func() { a.Close(); closeIn() }, nil
	}
	in, err := image.OpenInput(ctx, opts.Checkpoint)
	if err != nil {
		if ctx.Err() != nil {
			return nil, "", nil, fmt.Errorf("%q: %w", opts.Checkpoint, err)
		}
		return nil, "", nil, fmt.Errorf("%q: %w: %w", opts.Checkpoint, checkpoint.ErrNotCheckpoint, err)
	}
	if !in.Regular() {
		a, err := read(opts.Progress.Reader(in))
		if err != nil {
			in.Close()
			return nil, "", nil, fmt.Errorf("reading checkpoint from %s: %w", opts.Checkpoint, err)
		}
		return a, opts.Checkpoint, func() { a.Close(); in.Close() }, nil
	}
	a, err := image.OpenArchive(in.File())
	if err != nil {
		in.Close()
		return nil, "", nil, fmt.Errorf("reading checkpoint from %s: %w", opts.Checkpoint, err)
	}
	// CRIU asks for the memory last, after it has started and rebuilt the
	// tree, while this process waits: decode its first chunks meanwhile.
	var pages []string
	for _, name := range a.Names() {
		if strings.HasPrefix(name, "pages-") {
			pages = append(pages, name)
		}
	}
	a.ReadAhead(pages, readAheadChunks)
	return a, opts.Checkpoint, func() { in.Close() }, nil
}

// readAheadChunks bounds what a restore from a file decodes before CRIU
// asks for it: 16 chunks, 64 MiB by default.
const readAheadChunks = 16

// Restorer is the job.Restorer the shim uses for ferry's own jobs: it runs
// CRIU's restore of req.Record.RestoreFrom with CRIU inside the job's
// cgroup; CRIU recreates the job's namespaces, init included.
func Restorer(ctx context.Context, req job.RestoreRequest) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, restoreTimeout)
	defer cancel()
	r := req.Record
	pid, err := run(ctx, r.RestoreCriu, r.RestoreFrom, req.WorkDir, runFlags{stopped: r.RestoreStopped, lazy: r.RestoreLazy}, req.Output, req.Cgroup)
	if err != nil && errors.Is(context.Cause(ctx), job.ErrOwnerGone) {
		// No one will undo this start: what CRIU made of the tree
		// goes now, and then (never before: see StartLazyPages) the
		// lazy-pages daemon that the dead serve left to serve it.
		if kerr := req.Cgroup.Kill(context.Background()); kerr != nil {
			req.Log.Error("ending the tree of a restore whose serve died", "err", kerr)
		} else if r.RestoreLazy {
			if pids := EndLazyPagesIn(r.RestoreFrom); len(pids) > 0 {
				req.Log.Info("ended the lazy-pages daemon the dead serve left", "pids", pids)
			}
		}
		return 0, fmt.Errorf("%w: %w", job.ErrOwnerGone, err)
	}
	return pid, err
}

// InitRestorer is the job.InitRestorer ferry's init uses for foreign
// trees: CRIU runs inside the new job's namespaces, as the init's child.
func InitRestorer(ctx context.Context, req job.InitRestoreRequest) (int, error) {
	return run(ctx, req.Criu, req.Checkpoint, req.WorkDir, runFlags{stopped: req.Stopped}, req.Output, nil)
}

// run has CRIU restore the checkpoint in dir (a directory of images, or
// a served one whose images stream from a ferry process) as a sibling of
// itself, that is a child of the caller, and returns the root's pid.
// run restores dir with the criu command line; the tree starts in cg
// (when not nil) because CRIU does.
func run(ctx context.Context, criuPath, dir, workDir string, flags runFlags, output *os.File, cg *cgroup.Cgroup) (int, error) {
	served := isServed(dir)
	load := checkpoint.Load
	if served {
		load = checkpoint.LoadManifest
	}
	m, err := load(dir)
	if err != nil {
		return 0, err
	}
	pidfile := filepath.Join(workDir, "restore.pid")
	_ = os.Remove(pidfile)
	defer os.Remove(pidfile)
	criuWork := workDir
	if flags.lazy {
		// CRIU finds the lazy-pages daemon's socket in its work directory,
		// and the daemon was started in the checkpoint's.
		criuWork = dir
		defer func() {
			if b, err := os.ReadFile(filepath.Join(dir, "restore.log")); err == nil {
				_ = os.WriteFile(filepath.Join(workDir, "restore.log"), b, 0o600)
			}
		}()
	}
	args := []string{"restore", "--images-dir", dir, "--work-dir", criuWork, "--log-file", "restore.log", "-v2",
		"--restore-detached", "--restore-sibling", "--pidfile", pidfile, "--manage-cgroups=ignore"}
	if served {
		args = append(args, "--stream")
	}
	if flags.stopped {
		args = append(args, "--leave-stopped")
	}
	if flags.lazy {
		args = append(args, "--lazy-pages")
	}
	for _, o := range []struct {
		flag string
		on   bool
	}{{"--tcp-established", m.TcpEstablished}, {"--file-locks", m.FileLocks}, {"--ext-unix-sk", m.ExtUnixSk}, {"--shell-job", m.ShellJob}} {
		if o.on {
			args = append(args, o.flag)
		}
	}
	if m.NetworkLock != "" {
		args = append(args, "--network-lock", m.NetworkLock)
	}
	var extra []*os.File
	inherit := func(key string, f *os.File) {
		args = append(args, "--inherit-fd", fmt.Sprintf("fd[%d]:%s", criu.ExtraFD(len(extra)), key))
		extra = append(extra, f)
	}
	for _, key := range checkpoint.OutputPipes(m) {
		inherit(key, output)
	}
	if m.ExternalPidNs {
		// The tree's PID namespace is the one we run in (the new init's).
		ns, err := os.Open("/proc/self/ns/pid")
		if err != nil {
			return 0, err
		}
		defer ns.Close()
		inherit(checkpoint.PidNSKey, ns)
	}
	cmd := criu.Command{Path: criuPath, Args: args, ExtraFiles: extra}
	// Restored tasks are forked by CRIU and so start in CRIU's cgroup.
	switch {
	case cg != nil && cg.Version == 2:
		cmd.Cgroup = cg.Path
	case cg != nil:
		cmd.Started = cg.AddProc
	}
	err = cmd.Run(ctx)
	if err != nil {
		return 0, fmt.Errorf("restoring %s: %w", dir, criu.Explain(err, filepath.Join(criuWork, "restore.log")))
	}
	b, err := os.ReadFile(pidfile)
	if err != nil {
		return 0, fmt.Errorf("criu restored but wrote no pid: %w", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("criu restored but wrote pid %q", b)
	}
	return pid, nil
}

// runFlags are the ways a restore departs from the plain one.
type runFlags struct {
	stopped bool // --leave-stopped: the shim keeps the tree frozen
	lazy    bool // --lazy-pages: memory comes from a lazy-pages daemon
}

// isServed reports whether dir is a served checkpoint directory: the
// manifest beside the socket of a ferry process streaming the images.
func isServed(dir string) bool {
	st, err := os.Stat(filepath.Join(dir, criu.ServeSocket))
	return err == nil && st.Mode()&os.ModeSocket != 0
}
