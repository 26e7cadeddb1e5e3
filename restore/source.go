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
	"sync"
	"time"

	"github.com/ferry-cr/ferry/image"
	"github.com/ferry-cr/ferry/internal/checkpoint"
	"github.com/ferry-cr/ferry/internal/criu"
	"github.com/ferry-cr/ferry/internal/job"
)

// A restore reads as its stages, as a checkpoint does (package dump): a
// source says where the images come from and gives the manifest (all a
// restore's command line needs); the job's shim starts CRIU from it; CRIU
// is served the images as it asks, its first request held until the
// source is ready (and the caller's BeforeStart hook has run); at the end
// the source settles whether its images proved whole. restoreFrom is
// that sequence, once, for every kind of source.

// source is where a restore's images come from.
type source interface {
	// from names the checkpoint in errors.
	from() string
	// manifest is what the restore starts from.
	manifest() *checkpoint.Manifest
	// dir is the directory CRIU is pointed at: the images themselves,
	// or (serves) the manifest beside the serve socket.
	dir() string
	serves() bool
	// ready runs at CRIU's first image request, which waits for it:
	// what must hold before CRIU restores anything (the stream's files
	// have come and checked out, a lazy-pages daemon listens). An error
	// refuses CRIU its first image, and it exits before it has done
	// anything.
	ready(ctx context.Context) error
	// image answers CRIU's request for the image name.
	image(name string) (func(io.Writer) error, bool)
	// failed is closed when the source fails before CRIU has asked for
	// anything: the restore's start-up is cancelled wherever it is (nil:
	// never).
	failed() <-chan struct{}
	// settle decides the outcome from the restore's err, the serving's
	// serr, and refused, ready's error if it refused CRIU.
	settle(ctx context.Context, s *job.Registry, rec *job.Record, err, serr, refused error) (*job.Record, error)
	close()
}

// restoreFrom restores src as a job of s.
func restoreFrom(ctx context.Context, s *job.Registry, src source, opts Options) (*job.Record, error) {
	defer src.close()
	m := src.manifest()
	if err := check(m, src.from(), opts); err != nil {
		return nil, err
	}
	if !src.serves() {
		return start(ctx, s, m, src.dir(), opts)
	}
	log := logger(opts)
	srv, err := criu.ListenServe(src.dir())
	if err != nil {
		return nil, err
	}
	// The start-up ends at once if the source fails before CRIU asks.
	sctx, scancel := context.WithCancel(ctx)
	defer scancel()
	if f := src.failed(); f != nil {
		go func() {
			select {
			case <-f:
				scancel()
			case <-sctx.Done():
			}
		}()
	}
	gctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// What must happen before CRIU restores anything happens at its
	// first image: the source's readiness, then the caller's hook.
	beforeStart := opts.BeforeStart
	opts.BeforeStart = nil
	t0 := time.Now()
	ready := sync.OnceValue(func() error {
		t1 := time.Now()
		err := src.ready(gctx)
		log.Debug("restore held at its first image", "asked after", t1.Sub(t0), "held", time.Since(t1), "err", err)
		if err == nil && beforeStart != nil {
			err = beforeStart(gctx)
		}
		return err
	})
	var refused error // ready's error, once CRIU was refused for it
	served := make(chan error, 1)
	go func() {
		served <- srv.Serve(ctx, func(name string) (func(io.Writer) error, bool) {
			if err := ready(); err != nil {
				refused = err
				return nil, false
			}
			return src.image(name)
		})
	}()
	rec, err := start(sctx, s, m, src.dir(), opts)
	log.Debug("restore ended", "err", err, "took", time.Since(t0))
	// CRIU has exited (the shim reports after it): nothing more to
	// serve. A first request still waiting gives up.
	cancel()
	srv.Close()
	serr := <-served
	// refused is set before Serve returns (it answers on one goroutine).
	if errors.Is(refused, context.Canceled) {
		refused = nil
	}
	return src.settle(ctx, s, rec, err, serr, refused)
}

// heldFailure is the error of a restore whose CRIU was refused its first
// image (refused), or that failed with serving's serr.
func heldFailure(err, serr, refused error) error {
	switch {
	case refused != nil:
		return fmt.Errorf("%w (the restore waited for it and was aborted before it began)", refused)
	case serr != nil:
		return fmt.Errorf("%w (serving the images: %w)", err, serr)
	}
	return err
}

// dirSource is a directory of CRIU's images, restored as it is.
type dirSource struct {
	path string
	m    *checkpoint.Manifest
}

func (d *dirSource) from() string                   { return d.path }
func (d *dirSource) manifest() *checkpoint.Manifest { return d.m }
func (d *dirSource) dir() string                    { return d.path }
func (d *dirSource) serves() bool                   { return false }
func (d *dirSource) ready(context.Context) error    { return nil }
func (d *dirSource) failed() <-chan struct{}        { return nil }
func (d *dirSource) close()                         {}
func (d *dirSource) image(string) (func(io.Writer) error, bool) {
	return nil, false
}
func (d *dirSource) settle(_ context.Context, _ *job.Registry, rec *job.Record, err, _, _ error) (*job.Record, error) {
	return rec, err
}

// lazySource is a lazy checkpoint (post-copy) in a directory, restored
// while the lazy-pages daemon may still be starting. The restoring CRIU
// connects to the daemon's socket in prepare_lazy_pages_socket, early in
// cr_restore_tasks and before its pre-restore action, so neither an
// action script nor the order of two exec calls can hold it; what can is
// its first image. CRIU therefore reads the images through the serve
// socket (the shim's restore sees the socket and adds --stream; CRIU's
// work directory, where the daemon listens, stays the checkpoint's), and
// the first request waits for Options.LazyReady. A daemon that failed (or
// a ferry that died, which closes the socket) makes the first image
// missing: CRIU exits before it has done anything.
type lazySource struct {
	dirSource
	images string // where the images are served from (Options.LazyImages)
	ready_ func(ctx context.Context) error
}

func (l *lazySource) serves() bool                    { return true }
func (l *lazySource) ready(ctx context.Context) error { return l.ready_(ctx) }
func (l *lazySource) image(name string) (func(io.Writer) error, bool) {
	return fileImage(l.images, name)
}
func (l *lazySource) settle(_ context.Context, _ *job.Registry, rec *job.Record, err, serr, refused error) (*job.Record, error) {
	if err != nil {
		return nil, heldFailure(err, serr, refused)
	}
	return rec, nil
}

// streamSource is a .ferry stream served to CRIU without unpacking: CRIU
// is pointed at a directory that holds only the manifest and the serve
// socket, and each image is handed over as CRIU asks, checked and
// decompressed on the fly (CRIU's --stream). A file is indexed by its
// record headers; a pipe is read whole and checked first (see
// image.Archive), or, for an early restore (Options.Early), served from
// its REMAINING record on while the rest arrives. A chunk that fails its
// check cuts CRIU's pipe, which fails the restore, and the shim leaves
// nothing behind.
type streamSource struct {
	streamed
	served     string // the served directory
	closeInput func()
}

func (st *streamSource) from() string                   { return st.streamed.from }
func (st *streamSource) manifest() *checkpoint.Manifest { return st.m }
func (st *streamSource) dir() string                    { return st.served }
func (st *streamSource) serves() bool                   { return true }
func (st *streamSource) ready(context.Context) error    { return nil }
func (st *streamSource) failed() <-chan struct{}        { return nil }
func (st *streamSource) close() {
	os.RemoveAll(st.served)
	st.closeInput()
}
func (st *streamSource) image(name string) (func(io.Writer) error, bool) {
	return st.streamed.image(name)
}
func (st *streamSource) settle(ctx context.Context, s *job.Registry, rec *job.Record, err, serr, refused error) (*job.Record, error) {
	if refused != nil {
		return nil, heldFailure(err, serr, refused)
	}
	return st.streamed.settle(ctx, s, rec, err, serr)
}

// newStreamSource opens the stream opts names and lays out the served
// directory.
func newStreamSource(ctx context.Context, opts Options) (_ *streamSource, retErr error) {
	t0 := time.Now()
	a, from, closeInput, err := openArchive(ctx, opts)
	if err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			closeInput()
		}
	}()
	logger(opts).Debug("checkpoint indexed", "from", from, "bytes", a.Trailer().GetStoredBytes(), "took", time.Since(t0))
	raw, err := a.ReadFile(checkpoint.ManifestFile, maxManifest)
	if err != nil {
		return nil, fmt.Errorf("reading checkpoint from %s: %w", from, err)
	}
	dir, err := tempServeDir(opts.ServeDir, "restore-", len(criu.ServeSocket))
	if err != nil {
		return nil, err
	}
	m, err := writeManifest(dir, raw, from)
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	st := &streamSource{streamed: streamed{a: a, m: m, from: from, progress: opts.Progress, log: logger(opts), t0: t0}, served: dir, closeInput: closeInput}
	if err := st.begin(int64(len(raw))); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	return st, nil
}

// earlySource is a stream from standard input whose first record holds
// the whole manifest as known before the dump (Options.Prepared): CRIU
// starts from that record at once, before the rest of the stream has
// come, and waits at its first image until the stream names its
// remaining files (image.StreamArchiveFrom) and what came before them
// checks out. A migration destination so takes the restore's start-up (a
// ferry shim, CRIU's exec and kernel probing: 100-300 ms here) out of the
// downtime, since its source dumps only once Prepared says CRIU waits.
type earlySource struct {
	streamed
	head     *checkpoint.Manifest
	served   string
	prepared func()

	indexed chan struct{} // closed once the stream's archive is read up to REMAINING
	a       *image.Archive
	aerr    error
	bad     chan struct{} // closed if the archive failed
}

// newEarlySource reads the stream's first record from opts.Stdin and
// goes on reading the rest in the background.
func newEarlySource(opts Options) (*earlySource, error) {
	const from = "standard input"
	rd, err := image.NewReader(opts.Progress.Reader(opts.Stdin))
	if err != nil {
		return nil, fmt.Errorf("reading checkpoint from %s: %w", from, err)
	}
	head, err := checkpoint.FromRecord(rd.Manifest())
	if err != nil {
		return nil, fmt.Errorf("reading checkpoint from %s: %w", from, err)
	}
	dir, err := tempServeDir(opts.ServeDir, "restore-", len(criu.ServeSocket))
	if err != nil {
		return nil, err
	}
	if err := checkpoint.WriteHead(dir, head); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	e := &earlySource{
		streamed: streamed{from: from, progress: opts.Progress, log: logger(opts), t0: time.Now()},
		head:     head, served: dir, prepared: opts.Prepared,
		indexed: make(chan struct{}), bad: make(chan struct{}),
	}
	go func() {
		defer close(e.indexed)
		e.a, e.aerr = image.StreamArchiveFrom(rd)
		if e.aerr != nil {
			close(e.bad)
		}
	}()
	return e, nil
}

func (e *earlySource) from() string                   { return e.streamed.from }
func (e *earlySource) manifest() *checkpoint.Manifest { return e.head }
func (e *earlySource) dir() string                    { return e.served }
func (e *earlySource) serves() bool                   { return true }
func (e *earlySource) failed() <-chan struct{}        { return e.bad }
func (e *earlySource) image(name string) (func(io.Writer) error, bool) {
	return e.streamed.image(name)
}

// ready says CRIU waits (Prepared: the source dumps now), then waits for
// the stream up to its REMAINING record and checks its manifest against
// the first record's.
func (e *earlySource) ready(ctx context.Context) error {
	e.log.Debug("restore waits at its first image", "after", time.Since(e.t0))
	e.prepared()
	select {
	case <-e.indexed:
	case <-ctx.Done():
		return ctx.Err()
	}
	if e.aerr != nil {
		return fmt.Errorf("reading checkpoint from %s: %w", e.streamed.from, e.aerr)
	}
	e.log.Debug("checkpoint indexed", "from", e.streamed.from, "took", time.Since(e.t0))
	raw, err := e.a.ReadFile(checkpoint.ManifestFile, maxManifest)
	if err != nil {
		return fmt.Errorf("reading checkpoint from %s: %w", e.streamed.from, err)
	}
	m, err := checkpoint.DecodeManifest(bytes.NewReader(raw), e.streamed.from)
	if err != nil {
		return err
	}
	if !checkpoint.SameRestore(e.head, m) {
		return fmt.Errorf("%s: the stream's manifest differs from its first record: %w", e.streamed.from, image.ErrCorrupt)
	}
	e.m, e.streamed.a = m, e.a
	return e.begin(int64(len(raw)))
}

// archiveErr is the stream's failure, if it has failed by now.
func (e *earlySource) archiveErr() error {
	select {
	case <-e.indexed:
		return e.aerr
	default:
		return nil
	}
}

func (e *earlySource) settle(ctx context.Context, s *job.Registry, rec *job.Record, err, serr, refused error) (*job.Record, error) {
	if err != nil && refused == nil && e.archiveErr() != nil {
		// Cut short by the stream: that is the reason to give.
		err = fmt.Errorf("reading checkpoint from %s: %w (the restore was aborted and nothing of it is left)", e.streamed.from, e.aerr)
	}
	if e.streamed.a == nil || err != nil && refused != nil {
		// CRIU never got past its first image.
		if err == nil {
			// Not reached: CRIU cannot restore without its images.
			err = fmt.Errorf("%s: restored without its images", e.streamed.from)
		}
		return nil, heldFailure(err, serr, refused)
	}
	return e.streamed.settle(ctx, s, rec, err, serr)
}

func (e *earlySource) close() {
	os.RemoveAll(e.served)
	// The stream may still be arriving (the caller ends it); its archive
	// is freed once its reader stops.
	go func() {
		<-e.indexed
		if e.a != nil {
			e.a.Close()
		}
	}()
}

func logger(opts Options) *slog.Logger { return cmp.Or(opts.Logger, slog.Default()) }

// writeManifest writes raw, a stream's manifest, into the served
// directory dir and reads it back as the restore will.
func writeManifest(dir string, raw []byte, from string) (*checkpoint.Manifest, error) {
	if err := os.WriteFile(filepath.Join(dir, checkpoint.ManifestFile), raw, 0o600); err != nil {
		return nil, err
	}
	m, err := checkpoint.LoadManifest(dir)
	if err != nil {
		return nil, fmt.Errorf("reading checkpoint from %s: %w", from, err)
	}
	return m, nil
}

// fileImage answers CRIU's request for the image name with the file of
// that name in dir.
func fileImage(dir, name string) (func(io.Writer) error, bool) {
	if name != filepath.Base(name) || name == checkpoint.ManifestFile {
		return nil, false
	}
	path := filepath.Join(dir, name)
	if st, err := os.Stat(path); err != nil || !st.Mode().IsRegular() {
		return nil, false
	}
	return func(w io.Writer) error {
		f, err := os.Open(path)
		if err != nil {
			return err
		}
		defer f.Close()
		_, err = io.Copy(w, f)
		return err
	}, true
}
