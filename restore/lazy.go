package restore

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/ferry-cr/ferry/image"
	"github.com/ferry-cr/ferry/internal/checkpoint"
	"github.com/ferry-cr/ferry/internal/criu"
	"github.com/ferry-cr/ferry/internal/job"
)

// Post-copy (CRIU lazy pages) on the restoring side. A lazy checkpoint
// holds every image but the tree's private memory, so it is small; CRIU's
// lazy-pages daemon and the restore both read it from one directory (the
// daemon once per task, the restore once: a --stream cannot serve a file
// twice), and the daemon fetches the memory from the source's CRIU over
// the network while the restored tree faults it in.

// Unpack reads a whole image stream from r, checks it (see
// image.ReadArchive), and writes its files into dir, which must exist and
// be empty. It returns the manifest.
func Unpack(r io.Reader, dir string) (*checkpoint.Manifest, error) {
	a, err := image.ReadArchive(r)
	if err != nil {
		return nil, err
	}
	defer a.Close()
	return unpackArchive(a, dir)
}

// LazyPages is a running `criu lazy-pages` daemon.
type LazyPages = criu.Daemon

// StartLazyPages starts CRIU's lazy-pages daemon on the unpacked lazy
// checkpoint in images, fetching memory from the page server at pages (a
// TCP address: ferry's end of the link to the source), and returns once
// it listens for the restore, in work (the restore's CRIU must work
// there too). It exits once every page has been copied into the restored
// tree (status 0) or when it fails. Before it listens it reads two
// images, inventory.img and pstree.img; mm-PID.img and pagemap-PID.img
// it reads once the restore has connected.
func StartLazyPages(ctx context.Context, b *criu.Binary, images, work string, pages *net.TCPAddr) (*LazyPages, error) {
	return criu.Command{Path: b.Path, Args: []string{"lazy-pages", "--images-dir", images, "--work-dir", work,
		"--log-file", "lazy-pages.log", "-v2", "--page-server", "--address", pages.IP.String(),
		"--port", strconv.Itoa(pages.Port)}}.StartReady(ctx)
}

// lazyServed restores the lazy checkpoint in dir while the lazy-pages
// daemon may still be starting (Options.LazyReady). The restoring CRIU
// connects to the daemon's socket in prepare_lazy_pages_socket, early in
// cr_restore_tasks and before its pre-restore action, so neither an
// action script nor the order of two exec calls can hold it; what can is
// its first image. The shim's CRIU therefore reads dir's images through
// the serve socket (see criu.Server; the shim's restore sees the socket
// and adds --stream, and CRIU's work directory, where the daemon listens,
// stays dir), and the first request waits for LazyReady. Every request
// after that is served at once from dir. A daemon that failed (or a
// ferry that died, which closes the socket) makes the first image
// missing: CRIU exits before it has done anything, and the restore fails
// as any other.
func lazyServed(ctx context.Context, s *job.Registry, m *checkpoint.Manifest, dir string, opts Options) (*job.Record, error) {
	if len(dir)+len("/"+criu.ServeSocket) >= maxSocketPath {
		// No room for the serve socket's path: one after the other.
		if err := opts.LazyReady(ctx); err != nil {
			return nil, err
		}
		return start(ctx, s, m, dir, opts)
	}
	srv, err := criu.ListenServe(dir)
	if err != nil {
		return nil, err
	}
	gctx, cancel := context.WithCancel(ctx)
	defer cancel()
	log := cmp.Or(opts.Logger, slog.Default())
	t0 := time.Now()
	// What must happen before CRIU restores anything happens at its first
	// image too: the caller's hook (BeforeStart), after LazyReady.
	beforeStart := opts.BeforeStart
	opts.BeforeStart = nil
	ready := sync.OnceValue(func() error {
		t1 := time.Now()
		err := opts.LazyReady(gctx)
		log.Debug("restore held at its first image for the lazy-pages daemon", "asked after", t1.Sub(t0), "held", time.Since(t1), "err", err)
		if err == nil && beforeStart != nil {
			err = beforeStart(gctx)
		}
		return err
	})
	var refused error // LazyReady's error, once CRIU was refused for it
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, heldImages(cmp.Or(opts.LazyImages, dir), ready, &refused)) }()
	rec, err := start(ctx, s, m, dir, opts)
	// CRIU has exited (the shim reports after it): nothing more to serve.
	// A gate still waiting (the restore failed before CRIU asked) gives up.
	cancel()
	srv.Close()
	serr := <-served
	if err != nil {
		// refused is set before Serve returns (it answers on one goroutine).
		if refused != nil && !errors.Is(refused, context.Canceled) {
			return nil, fmt.Errorf("%w (the restore waited for it and was aborted before it began)", refused)
		}
		if serr != nil {
			return nil, fmt.Errorf("%w (serving the images: %w)", err, serr)
		}
		return nil, err
	}
	return rec, nil
}

// heldImages answers CRIU's image requests (criu.Server.Serve) with the
// files of dir, holding the first request until ready returns: an error
// answers it, and every later request, "no such image" (CRIU then exits
// before it has done anything), and is kept in *refused. Serve asks on
// one goroutine, and ready runs once.
func heldImages(dir string, ready func() error, refused *error) func(name string) (func(io.Writer) error, bool) {
	return func(name string) (func(io.Writer) error, bool) {
		if err := ready(); err != nil {
			*refused = err
			return nil, false
		}
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
}
