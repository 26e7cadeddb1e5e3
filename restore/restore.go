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

// tempServeDir makes a new directory named prefix* in base, or in
// shortServeDir when base is too deep for a socket name of sock bytes in
// it: a unix socket's path is limited (108 bytes with the NUL).
func tempServeDir(base, prefix string, sock int) (string, error) {
	if len(base)+len("/"+prefix+"1234567890/")+sock >= maxSocketPath {
		base = shortServeDir
	}
	if err := os.MkdirAll(base, 0o700); err != nil {
		return "", err
	}
	return os.MkdirTemp(base, prefix)
}

// Job restores the checkpoint opts.Checkpoint as a job of store s and
// returns its record once the restored tree runs.
func Job(ctx context.Context, s *job.Store, opts Options) (*job.Record, error) {
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

func start(ctx context.Context, s *job.Store, m *checkpoint.Manifest, dir string, opts Options) (*job.Record, error) {
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
func fromStream(ctx context.Context, s *job.Store, opts Options) (*job.Record, error) {
	if opts.Early && !opts.Stopped {
		return nil, errors.New("an early restore must hold the job stopped until the stream has proved whole")
	}
	t0 := time.Now()
	a, from, closeSrc, err := openArchive(opts)
	if err != nil {
		return nil, err
	}
	defer closeSrc()
	log := cmp.Or(opts.Logger, slog.Default())
	log.Debug("checkpoint indexed", "from", from, "bytes", a.Trailer().GetStoredBytes(), "took", time.Since(t0))
	raw, err := a.ReadFile(checkpoint.ManifestFile, maxManifest)
	if err != nil {
		return nil, fmt.Errorf("reading checkpoint from %s: %w", from, err)
	}
	dir, err := tempServeDir(opts.ServeDir, "restore-", len(criu.ServeSocket))
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	if err := os.WriteFile(filepath.Join(dir, checkpoint.ManifestFile), raw, 0o600); err != nil {
		return nil, err
	}
	m, err := checkpoint.LoadManifest(dir)
	if err != nil {
		return nil, fmt.Errorf("reading checkpoint from %s: %w", from, err)
	}
	// Files still to come are checked once the stream is whole.
	later := map[string]bool{}
	for _, name := range a.Remaining() {
		later[name] = true
	}
	checkSizes := func(later map[string]bool) error {
		for name, size := range m.Files {
			if got, ok := a.Size(name); !later[name] && (!ok || got != uint64(size)) {
				return fmt.Errorf("%s: %s is missing or has the wrong size in the stream: %w", from, name, checkpoint.ErrIncomplete)
			}
		}
		return nil
	}
	if err := checkSizes(later); err != nil {
		return nil, err
	}
	if err := check(m, from, opts); err != nil {
		return nil, err
	}
	// The stream's raw bytes: the trailer's figure, or (a stream still
	// arriving) the same sum, from the manifest's sizes and the manifest.
	total := int64(a.Trailer().GetRawBytes())
	if a.Trailer() == nil {
		total = int64(len(raw))
		for _, size := range m.Files {
			total += size
		}
	}
	opts.Progress.SetTotal(total)
	srv, err := criu.ListenServe(dir)
	if err != nil {
		return nil, err
	}
	served := make(chan error, 1)
	go func() {
		served <- srv.Serve(ctx, func(name string) (func(io.Writer) error, bool) {
			if !a.Has(name) || name == checkpoint.ManifestFile {
				return nil, false
			}
			return func(w io.Writer) error {
				if pipe, ok := w.(*os.File); ok {
					_, err := a.SpliceTo(name, pipe, opts.Progress.Add)
					return err
				}
				_, err := a.WriteTo(name, opts.Progress.Writer(w))
				return err
			}, true
		})
	}()
	t1 := time.Now()
	rec, err := start(ctx, s, m, dir, opts)
	log.Debug("restore ended", "err", err, "took", time.Since(t1))
	srv.Close()
	serr := <-served
	if err == nil && len(later) > 0 {
		// CRIU restored from a stream still arriving: the job stays held
		// until the stream has proved whole, and goes if it does not.
		if serr = a.Wait(); serr == nil {
			serr = checkSizes(nil)
		}
		log.Debug("checkpoint complete", "bytes", a.Trailer().GetStoredBytes(), "err", serr, "since start", time.Since(t0))
		if serr != nil {
			dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 15*time.Second)
			defer cancel()
			if derr := s.Discard(dctx, rec.Name, log); derr != nil {
				return nil, fmt.Errorf("reading checkpoint from %s: %w; and discarding the restored copy: %w", from, serr, derr)
			}
			_ = s.Remove(rec.Name)
			err = serr
		}
	}
	if serr != nil && err != nil {
		// The stream's fault is the one to report: CRIU failed because
		// an image was cut short.
		return nil, fmt.Errorf("reading checkpoint from %s: %w (the restore was aborted and nothing of it is left)", from, serr)
	}
	return rec, err
}

// openArchive indexes a .ferry file, or reads a whole stream from stdin.
func openArchive(opts Options) (*image.Archive, string, func(), error) {
	if opts.Checkpoint == "-" {
		read := image.ReadArchive
		if opts.Early {
			read = image.StreamArchive
		}
		a, err := read(opts.Progress.Reader(opts.Stdin))
		if err != nil {
			return nil, "", nil, fmt.Errorf("reading checkpoint from standard input: %w", err)
		}
		return a, "standard input", a.Close, nil
	}
	f, err := os.Open(opts.Checkpoint)
	if err != nil {
		return nil, "", nil, fmt.Errorf("%q: %w: %w", opts.Checkpoint, checkpoint.ErrNotCheckpoint, err)
	}
	a, err := image.OpenArchive(f)
	if err != nil {
		f.Close()
		return nil, "", nil, fmt.Errorf("reading checkpoint from %s: %w", opts.Checkpoint, err)
	}
	return a, opts.Checkpoint, func() { f.Close() }, nil
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
