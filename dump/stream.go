package dump

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"sync"

	"github.com/checkpoint-restore/go-criu/v7/rpc"
	"golang.org/x/sys/unix"

	"github.com/ferry-cr/ferry/image"
	"github.com/ferry-cr/ferry/internal/checkpoint"
	"github.com/ferry-cr/ferry/internal/criu"
	"github.com/ferry-cr/ferry/internal/progress"
	"github.com/ferry-cr/ferry/internal/scratch"
)

// Streaming: CRIU's images go from CRIU's pipes straight into the image
// writer (compressed in parallel, checksummed) and out to the file or
// pipe, with no directory of images anywhere. CRIU streams only from its
// command line, so the RPC options are spelled as flags here.

// streamDump runs `criu dump --stream` with the options of copts and
// captures every image it sends into a file made by create. dir holds
// only CRIU's sockets.
//
// With freeze, CRIU runs it at its pre-dump action, once CRIU has started
// and probed the kernel and before it touches the tree: the caller stops
// the tree there rather than before starting CRIU, so CRIU's start-up is
// not the tree's downtime. An error from freeze fails the action and CRIU
// gives up without touching the tree. freeze has returned (and will not
// run) once streamDump returns.
//
// With held, CRIU's pages files are held back in pipes (see held.go)
// instead of going into iw; the gate sends them.
//
// With gate, CRIU waits at its post-dump action (every image written, the
// tree still seized, its connections still locked) while gate runs on the
// complete set of images: nil lets CRIU finish as copts asks (end the tree
// with its sockets silent), an error rolls it back. The gate's error is
// returned as is, so the caller can tell it from CRIU's.
func streamDump(ctx context.Context, criuPath string, wrapper []string, copts *rpc.CriuOpts, dir, workDir string, create func(name string) (io.WriteCloser, error), held *heldFiles, freeze func() error, gate func(sizes map[string]int64) error) (sizes map[string]int64, gateErr error, err error) {
	capture, err := criu.ListenCapture(dir)
	if err != nil {
		return nil, nil, err
	}
	defer capture.Close()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	args, env := cliArgs(copts, dir, workDir, true), []string(nil)
	var (
		gateMu  sync.Mutex
		actions *criu.Actions
	)
	if gate != nil || freeze != nil {
		var bridged []string
		if freeze != nil {
			bridged = append(bridged, criu.ActionPreDump)
		}
		if gate != nil {
			bridged = append(bridged, criu.ActionPostDump)
		}
		if actions, err = criu.BridgeActions(dir, bridged...); err != nil {
			return nil, nil, err
		}
		defer actions.Close()
		hookArgs, hookEnv, err := actions.HookArgs()
		if err != nil {
			return nil, nil, err
		}
		args, env = append(args, hookArgs...), hookEnv
		go actions.Serve(ctx, func(action string) error {
			if action == criu.ActionPreDump {
				return freeze()
			}
			if action != criu.ActionPostDump {
				return nil
			}
			sizes, err := capture.Settle(ctx)
			if err == nil {
				err = gate(sizes)
			}
			gateMu.Lock()
			gateErr = err
			gateMu.Unlock()
			return err
		})
	}
	criuErr := make(chan error, 1)
	go func() {
		err := criu.RunCLI(ctx, criuPath, wrapper, args, env)
		if err != nil {
			cancel() // CRIU is gone: stop waiting for it to connect
		}
		criuErr <- err
	}()
	sizes, serveErr := capture.Serve(ctx, func(name string) (io.WriteCloser, error) {
		if held != nil && isPages(name) {
			return held.create(name), nil
		}
		return create(name)
	})
	err = <-criuErr
	if actions != nil {
		_ = actions.Close() // and wait for a verdict in progress
	}
	gateMu.Lock()
	defer gateMu.Unlock()
	if gateErr != nil {
		return sizes, gateErr, nil
	}
	if err != nil {
		return nil, nil, err
	}
	if serveErr != nil {
		return nil, nil, serveErr
	}
	return sizes, nil, nil
}

// cliArgs spells the dump options of o as criu's command line.
func cliArgs(o *rpc.CriuOpts, dir, workDir string, stream bool) []string {
	a := []string{"dump", "-t", strconv.Itoa(int(o.GetPid())), "-D", dir, "-W", workDir,
		"-o", o.GetLogFile(), "-v" + strconv.Itoa(int(o.GetLogLevel())), "--manage-cgroups=ignore"}
	if stream {
		a = append(a, "--stream")
	}
	flag := func(on bool, name string) {
		if on {
			a = append(a, name)
		}
	}
	flag(o.GetLeaveRunning(), "--leave-running")
	flag(o.GetLeaveStopped(), "--leave-stopped")
	flag(o.GetTcpEstablished(), "--tcp-established")
	flag(o.GetFileLocks(), "--file-locks")
	flag(o.GetExtUnixSk(), "--ext-unix-sk")
	flag(o.GetShellJob(), "--shell-job")
	flag(o.GetLinkRemap(), "--link-remap")
	if p := o.GetFreezeCgroup(); p != "" {
		a = append(a, "--freeze-cgroup="+p)
	}
	if o.GhostLimit != nil {
		a = append(a, "--ghost-limit", strconv.FormatUint(uint64(o.GetGhostLimit()), 10))
	}
	switch o.GetNetworkLock() {
	case rpc.CriuNetworkLockMethod_NFTABLES:
		if o.NetworkLock != nil {
			a = append(a, "--network-lock", "nftables")
		}
	case rpc.CriuNetworkLockMethod_SKIP:
		a = append(a, "--network-lock", "skip")
	}
	for _, e := range o.GetExternal() {
		a = append(a, "--external", e)
	}
	if o.Timeout != nil {
		a = append(a, "--timeout", strconv.FormatUint(uint64(o.GetTimeout()), 10))
	}
	return a
}

// sink is where a stream goes: a temporary file beside the output, moved
// into place once complete and durable, or a pipe (standard output, a
// migration's connection). The job is ended only once commit returned:
// a write that failed (the reader quit, the disk is full) fails the whole
// checkpoint with an OutputError, the job runs on, and a temporary file
// is removed.
type sink struct {
	w     io.Writer
	f     *os.File
	n     int64
	out   string
	force bool
	meter *progress.Meter
	err   error // the first write error: every later write fails alike
	// A standard output redirected to a regular file is cut back to
	// trunc (its size when the stream began at its end; -1: never) if
	// the stream does not commit: a partial stream is of no use, and on
	// a full disk it holds the space.
	trunc     int64
	committed bool
	flush     *flusher // f's writeback, started as it is written
}

func openSink(out string, opts Options) (*sink, error) {
	if out == "-" {
		return &sink{w: opts.StreamTo, out: out, meter: opts.Progress, trunc: appendingAt(opts.StreamTo)}, nil
	}
	f, err := scratch.File(filepath.Dir(out), filepath.Base(out))
	if err != nil {
		return nil, err
	}
	if err := f.Chmod(0o600); err != nil {
		f.Close()
		os.Remove(f.Name())
		return nil, err
	}
	return &sink{w: f, f: f, out: out, force: opts.Force, meter: opts.Progress, trunc: -1, flush: newFlusher(f)}, nil
}

// appendingAt is the size of w when w is a regular file whose offset is
// at its end (> or >> redirection), else -1.
func appendingAt(w io.Writer) int64 {
	f, ok := w.(*os.File)
	if !ok {
		return -1
	}
	fi, err := f.Stat()
	if err != nil || !fi.Mode().IsRegular() {
		return -1
	}
	if fl, err := unix.FcntlInt(f.Fd(), unix.F_GETFL, 0); err == nil && fl&unix.O_APPEND != 0 {
		return fi.Size() // >>: every write goes to the end
	}
	off, err := f.Seek(0, io.SeekCurrent)
	if err != nil || off != fi.Size() {
		return -1
	}
	return off
}

func (s *sink) Write(p []byte) (int, error) {
	if s.err != nil {
		return 0, s.err
	}
	n, err := s.w.Write(p)
	s.n += int64(n)
	s.meter.Add(int64(n))
	if err == nil && n < len(p) {
		err = io.ErrShortWrite
	}
	if err != nil {
		s.err = s.lost(err)
		return n, s.err
	}
	if s.flush != nil {
		s.flush.wrote(s.n)
	}
	return n, nil
}

// lost is the error of a failed write to the output: an OutputError for
// a file or standard output; a migration's link (any other writer) keeps
// its own error, which the migration reports as its own failure.
func (s *sink) lost(err error) error {
	if _, ok := s.w.(*os.File); !ok {
		return err
	}
	return &OutputError{Output: outputName(s.out), Err: err}
}

// commit makes the stream durable and puts it in place. For "-" every
// byte has been written (a write that returned is in the reader's pipe);
// standard output redirected to a regular file is fsynced.
func (s *sink) commit() (int64, error) {
	if s.err != nil {
		return 0, s.err
	}
	if s.f == nil {
		if err := syncIfFile(s.w); err != nil {
			return 0, &OutputError{Output: outputName(s.out), Err: fmt.Errorf("syncing: %w", err)}
		}
		s.committed = true
		return s.n, nil
	}
	s.flush.stop()
	if err := s.f.Sync(); err != nil {
		return 0, &OutputError{Output: s.out, Err: fmt.Errorf("syncing: %w", err)}
	}
	if err := s.f.Close(); err != nil {
		return 0, &OutputError{Output: s.out, Err: err}
	}
	if s.force {
		if err := os.RemoveAll(s.out); err != nil {
			return 0, fmt.Errorf("replacing %q: %w", s.out, err)
		}
	}
	if err := os.Rename(s.f.Name(), s.out); err != nil {
		return 0, fmt.Errorf("moving checkpoint into place: %w", err)
	}
	s.f = nil
	if err := syncDir(filepath.Dir(s.out)); err != nil {
		return 0, &OutputError{Output: s.out, Err: err}
	}
	return s.n, nil
}

// abort removes an unfinished stream file, or cuts a partial stream off
// the regular file standard output was redirected to.
func (s *sink) abort() {
	if s.f == nil && !s.committed && s.trunc >= 0 && s.n > 0 {
		if f, ok := s.w.(*os.File); ok {
			_ = f.Truncate(s.trunc)
			_, _ = f.Seek(s.trunc, io.SeekStart)
		}
		s.trunc = -1
	}
	if s.f != nil {
		s.flush.stop()
		s.f.Close()
		os.Remove(s.f.Name())
		s.f = nil
	}
}

// finishStreamed adds the manifest to the stream as ferry.json (with the
// sizes of the files CRIU streamed) and in the trailer, then commits. Held
// pages files, if any, go after the manifest, behind a REMAINING record.
func finishStreamed(iw *image.Writer, sk *sink, m *checkpoint.Manifest, sizes map[string]int64, held *heldFiles) (int64, error) {
	m.Files = sizes
	data, err := checkpoint.Encode(m)
	if err != nil {
		return 0, err
	}
	fw, err := iw.Create(checkpoint.ManifestFile)
	if err != nil {
		return 0, err
	}
	if _, err := fw.Write(data); err != nil {
		return 0, err
	}
	if err := fw.Close(); err != nil {
		return 0, err
	}
	if held != nil {
		if err := held.send(iw); err != nil {
			return 0, err
		}
	}
	if err := iw.CloseWith(m); err != nil {
		return 0, err
	}
	return sk.commit()
}
