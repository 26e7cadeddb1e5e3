// Package restore brings a checkpoint back as an ordinary ferry job: it
// checks the checkpoint before touching anything, then has a new shim run
// CRIU so that the restored tree becomes the shim's child, in a cgroup of
// its own and in fresh PID and IPC namespaces (CRIU recreates the ones the
// tree had, ferry's init as pid 1 included), with fresh stdout and stderr.
// If CRIU fails, nothing of the tree is left and the checkpoint is
// untouched (CRIU only reads it).
package restore

import (
	"bytes"
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
	"sync"
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
		return fromStream(ctx, s, opts)
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
	if err := check(m, dir, opts); err != nil {
		return nil, err
	}
	if opts.LazyPages && opts.LazyReady != nil {
		return lazyServed(ctx, s, m, dir, opts)
	}
	return start(ctx, s, m, dir, opts)
}

// check says whether this host can restore m at all.
func check(m *checkpoint.Manifest, from string, opts Options) error {
	if v, err := criu.ParseVersion("Version: " + m.CriuVersion); err == nil && !opts.Criu.Version.AtLeast(v) {
		return fmt.Errorf("%s was taken with CRIU %s, this CRIU is %s: restore with CRIU >= %s: %w",
			from, m.CriuVersion, opts.Criu.Version, m.CriuVersion, checkpoint.ErrUnsupportedVersion)
	}
	if m.Init != nil {
		if err := m.Init.Check(); err != nil {
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
	})
}

// fromStream restores a .ferry stream without unpacking it: CRIU is
// pointed at a directory that holds only the manifest and the serve
// socket, and this process hands CRIU each image as it asks, checked and
// decompressed on the fly (CRIU's --stream). A file is indexed by its
// record headers; a pipe is read whole and checked first (see
// image.Archive). A chunk that fails its check cuts CRIU's pipe, which
// fails the restore, and the shim leaves nothing behind.
func fromStream(ctx context.Context, s *job.Registry, opts Options) (*job.Record, error) {
	if opts.Early && !opts.Stopped {
		return nil, errors.New("an early restore must hold the job stopped until the stream has proved whole")
	}
	if opts.Early && opts.Prepared != nil && opts.Checkpoint == "-" {
		return fromStreamEarly(ctx, s, opts)
	}
	t0 := time.Now()
	a, from, closeSrc, err := openArchive(ctx, opts)
	if err != nil {
		return nil, err
	}
	defer closeSrc()
	log := cmp.Or(opts.Logger, slog.Default())
	log.Debug("checkpoint indexed", "from", from, "bytes", a.Trailer().GetStoredBytes(), "took", time.Since(t0))
	dir, err := tempServeDir(opts.ServeDir, "restore-", len(criu.ServeSocket))
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	raw, err := a.ReadFile(checkpoint.ManifestFile, maxManifest)
	if err != nil {
		return nil, fmt.Errorf("reading checkpoint from %s: %w", from, err)
	}
	if err := os.WriteFile(filepath.Join(dir, checkpoint.ManifestFile), raw, 0o600); err != nil {
		return nil, err
	}
	m, err := checkpoint.LoadManifest(dir)
	if err != nil {
		return nil, fmt.Errorf("reading checkpoint from %s: %w", from, err)
	}
	st := &streamed{a: a, m: m, from: from}
	if err := st.begin(opts, int64(len(raw))); err != nil {
		return nil, err
	}
	if err := check(m, from, opts); err != nil {
		return nil, err
	}
	srv, err := criu.ListenServe(dir)
	if err != nil {
		return nil, err
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, st.serve(opts)) }()
	t1 := time.Now()
	rec, err := start(ctx, s, m, dir, opts)
	log.Debug("restore ended", "err", err, "took", time.Since(t1))
	srv.Close()
	return st.settle(ctx, s, rec, err, <-served, log, t0)
}

// streamed is a stream being served to a restore: its archive and its
// manifest, and the files still to come when CRIU starts (an early
// restore's: the job's memory).
type streamed struct {
	a     *image.Archive
	m     *checkpoint.Manifest
	from  string
	later map[string]bool
}

// begin notes the files still to come, checks the others against the
// manifest (of manifestBytes) and sets the progress total.
func (st *streamed) begin(opts Options, manifestBytes int64) error {
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
	opts.Progress.SetTotal(total)
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

// serve answers CRIU's image requests (criu.Server.Serve) from the
// archive.
func (st *streamed) serve(opts Options) func(name string) (func(io.Writer) error, bool) {
	return func(name string) (func(io.Writer) error, bool) {
		if !st.a.Has(name) || name == checkpoint.ManifestFile {
			return nil, false
		}
		return func(w io.Writer) error {
			if pipe, ok := w.(*os.File); ok {
				_, err := st.a.SpliceTo(name, pipe, opts.Progress.Add)
				return err
			}
			_, err := st.a.WriteTo(name, opts.Progress.Writer(w))
			return err
		}, true
	}
}

// settle ends a restore from the stream, which returned rec and err, its
// serving serr. A restore that started before the stream's last files
// had come holds the job until the stream has proved whole, and discards
// it if it does not.
func (st *streamed) settle(ctx context.Context, s *job.Registry, rec *job.Record, err, serr error, log *slog.Logger, t0 time.Time) (*job.Record, error) {
	if err == nil && len(st.later) > 0 {
		if serr = st.a.Wait(); serr == nil {
			st.later = nil
			serr = st.checkSizes()
		}
		log.Debug("checkpoint complete", "bytes", st.a.Trailer().GetStoredBytes(), "err", serr, "since start", time.Since(t0))
		if serr != nil {
			dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 15*time.Second)
			defer cancel()
			if derr := s.Discard(dctx, rec.Name, log); derr != nil {
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

// fromStreamEarly is fromStream for an early restore from Stdin whose
// first record holds the whole manifest as known before the dump
// (Options.Prepared): CRIU starts from it at once, before the rest of the
// stream has come, and waits at its first image until the stream names
// its remaining files (image.StreamArchiveFrom) and what came before them
// checks out; BeforeStart runs there too. A migration destination so
// takes the restore's start-up (a ferry shim, CRIU's exec and kernel
// probing: 100-300 ms here) out of the downtime, since its source dumps
// only once Prepared says CRIU waits.
func fromStreamEarly(ctx context.Context, s *job.Registry, opts Options) (*job.Record, error) {
	const from = "standard input"
	t0 := time.Now()
	log := cmp.Or(opts.Logger, slog.Default())
	rd, err := image.NewReader(opts.Progress.Reader(opts.Stdin))
	if err != nil {
		return nil, fmt.Errorf("reading checkpoint from %s: %w", from, err)
	}
	head := checkpoint.FromProto(rd.Manifest())
	if err := check(head, from, opts); err != nil {
		return nil, err
	}
	dir, err := tempServeDir(opts.ServeDir, "restore-", len(criu.ServeSocket))
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	if err := checkpoint.WriteHead(dir, head); err != nil {
		return nil, err
	}
	// The rest of the stream is read on from its first record.
	var (
		a    *image.Archive
		aerr error
	)
	indexed := make(chan struct{})
	go func() {
		defer close(indexed)
		a, aerr = image.StreamArchiveFrom(rd)
	}()
	// A stream that fails before CRIU has asked for anything ends the
	// restore at once, wherever its start-up is.
	sctx, scancel := context.WithCancel(ctx)
	defer scancel()
	go func() {
		select {
		case <-indexed:
			if aerr != nil {
				scancel()
			}
		case <-sctx.Done():
		}
	}()
	st := &streamed{from: from}
	beforeStart := opts.BeforeStart
	opts.BeforeStart = nil
	gctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// ready runs at CRIU's first image request: CRIU is up.
	ready := sync.OnceValue(func() error {
		log.Debug("restore waits at its first image", "after", time.Since(t0))
		opts.Prepared()
		select {
		case <-indexed:
		case <-gctx.Done():
			return gctx.Err()
		}
		if aerr != nil {
			return fmt.Errorf("reading checkpoint from %s: %w", from, aerr)
		}
		log.Debug("checkpoint indexed", "from", from, "took", time.Since(t0))
		raw, err := a.ReadFile(checkpoint.ManifestFile, maxManifest)
		if err != nil {
			return fmt.Errorf("reading checkpoint from %s: %w", from, err)
		}
		if st.m, err = checkpoint.DecodeManifest(bytes.NewReader(raw), from); err != nil {
			return err
		}
		if !checkpoint.SameRestore(head, st.m) {
			return fmt.Errorf("%s: the stream's manifest differs from its first record: %w", from, image.ErrCorrupt)
		}
		st.a = a
		if err := st.begin(opts, int64(len(raw))); err != nil {
			return err
		}
		if beforeStart != nil {
			return beforeStart(gctx)
		}
		return nil
	})
	var refused error // ready's error, once CRIU was refused for it
	srv, err := criu.ListenServe(dir)
	if err != nil {
		return nil, err
	}
	served := make(chan error, 1)
	go func() {
		served <- srv.Serve(ctx, func(name string) (func(io.Writer) error, bool) {
			if err := ready(); err != nil {
				refused = err
				return nil, false
			}
			return st.serve(opts)(name)
		})
	}()
	t1 := time.Now()
	rec, err := start(sctx, s, head, dir, opts)
	log.Debug("restore ended", "err", err, "took", time.Since(t1))
	cancel()
	srv.Close()
	serr := <-served
	if err != nil && refused == nil && aerrNow(indexed, &aerr) != nil {
		// Cut short by the stream: that is the reason to give.
		err = fmt.Errorf("reading checkpoint from %s: %w (the restore was aborted and nothing of it is left)", from, aerr)
	}
	// refused is set before Serve returns (it answers on one goroutine).
	if err != nil && refused != nil && !errors.Is(refused, context.Canceled) {
		err = fmt.Errorf("%w (the restore waited for it and was aborted before it began)", refused)
	}
	if st.a == nil || err != nil && refused != nil {
		// CRIU never got past its first image. The stream may still be
		// arriving (the caller ends it); its archive is freed once its
		// reader stops.
		go func() {
			<-indexed
			if a != nil {
				a.Close()
			}
		}()
		if err == nil {
			// Not reached: CRIU cannot restore without its images.
			err = fmt.Errorf("%s: restored without its images", from)
		} else if serr != nil {
			err = fmt.Errorf("%w (serving the images: %w)", err, serr)
		}
		return nil, err
	}
	defer a.Close()
	return st.settle(ctx, s, rec, err, serr, log, t0)
}

// aerrNow is *aerr once indexed is closed, else nil.
func aerrNow(indexed <-chan struct{}, aerr *error) error {
	select {
	case <-indexed:
		return *aerr
	default:
		return nil
	}
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
	return a, opts.Checkpoint, func() { in.Close() }, nil
}

// Restorer is the job.Restorer the shim uses for ferry's own jobs: it runs
// CRIU's restore of req.Record.RestoreFrom with CRIU inside the job's
// cgroup; CRIU recreates the job's namespaces, init included.
func Restorer(ctx context.Context, req job.RestoreRequest) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, restoreTimeout)
	defer cancel()
	r := req.Record
	return run(ctx, r.RestoreCriu, r.RestoreFrom, req.WorkDir, runFlags{stopped: r.RestoreStopped, lazy: r.RestoreLazy}, req.Output, req.Cgroup)
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
	}{{"--tcp-established", m.TCPEstablished}, {"--file-locks", m.FileLocks}, {"--ext-unix-sk", m.ExtUnixSk}, {"--shell-job", m.ShellJob}} {
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
