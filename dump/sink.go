package dump

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/ferry-cr/ferry/image"
	"github.com/ferry-cr/ferry/internal/checkpoint"
	"github.com/ferry-cr/ferry/internal/proc"
	"github.com/ferry-cr/ferry/internal/progress"
)

// imageSink is the stage where a checkpoint goes. Its lifecycle is
// small: begin, once the manifest as known before CRIU runs is ready (a
// stream's first record); CRIU's images reach it, either in the scratch
// directory or through the stream it exposes; seal, once CRIU is done,
// makes the checkpoint whole and durable where it was sent and returns
// its size; abort leaves nothing of an unsealed checkpoint behind.
type imageSink interface {
	begin(ctx context.Context, m *checkpoint.Manifest) error
	seal(ctx context.Context, m *checkpoint.Manifest, streamed map[string]int64) (int64, error)
	abort()
}

// streamedSink is a sink CRIU streams its images into: create makes
// each image's file; heldPages, if not nil, holds the pages files back
// (held.go).
type streamedSink interface {
	imageSink
	create(name string) (io.WriteCloser, error)
	heldPages() *heldFiles
}

// newSink makes the sink the method names. tmp is the scratch directory
// CRIU writes into (for every sink but sinkStreamed, which only holds
// CRIU's sockets there).
func newSink(how method, tmp, out, job string, opts Options) imageSink {
	switch how.sink {
	case sinkStreamed:
		return &streamSink{out: out, opts: opts, holdPages: how.holdPages}
	case sinkLazy:
		return &lazySink{tmp: tmp, opts: opts}
	case sinkPacked:
		return &packSink{tmp: tmp, out: out, opts: opts}
	case sinkStore:
		return &storeSink{tmp: tmp, job: job, opts: opts}
	case sinkStoreStreamed:
		return &storeStreamSink{job: job, opts: opts}
	default:
		return &dirSink{tmp: tmp, out: out, force: opts.Force}
	}
}

// dirSink: CRIU's directory, fsynced and renamed into place.
type dirSink struct {
	tmp, out string
	force    bool
}

func (s *dirSink) begin(context.Context, *checkpoint.Manifest) error { return nil }
func (s *dirSink) seal(_ context.Context, m *checkpoint.Manifest, _ map[string]int64) (int64, error) {
	return finish(s.tmp, s.out, m, s.force)
}
func (s *dirSink) abort() {}

// packSink: CRIU's directory packed into one stream afterwards.
type packSink struct {
	tmp, out string
	opts     Options
}

func (s *packSink) begin(context.Context, *checkpoint.Manifest) error { return nil }
func (s *packSink) seal(_ context.Context, m *checkpoint.Manifest, _ map[string]int64) (int64, error) {
	defer os.RemoveAll(s.tmp)
	return finishStream(s.tmp, s.out, m, s.opts)
}
func (s *packSink) abort() {}

// SnapshotStore keeps checkpoints as snapshots, taking their images
// one by one: the snapshot store (package store), which dump does not
// know, through its user's adapter.
type SnapshotStore interface {
	Begin(ctx context.Context, job string) (SnapshotWriter, error)
}

// SnapshotWriter adds one snapshot: its images, then its record, written
// last, so that a snapshot exists only once whole.
type SnapshotWriter interface {
	Create(name string) (io.WriteCloser, error)
	// Commit writes the record with meta (the checkpoint's manifest). It
	// returns the store's description of the snapshot (Result.Snapshot)
	// and the bytes it stored.
	Commit(meta []byte) (snapshot any, stored int64, err error)
	// Abort drops an uncommitted snapshot; a no-op after Commit.
	Abort() error
}

// storeSink: CRIU's directory taken into the snapshot store.
type storeSink struct {
	tmp, job string
	opts     Options
	snapshot any
}

func (s *storeSink) begin(context.Context, *checkpoint.Manifest) error { return nil }

func (s *storeSink) seal(ctx context.Context, m *checkpoint.Manifest, _ map[string]int64) (int64, error) {
	defer os.RemoveAll(s.tmp)
	s.opts.Progress.SetPhase("storing")
	if _, err := seal(s.tmp, m, false); err != nil {
		return 0, err
	}
	meta, err := os.ReadFile(filepath.Join(s.tmp, checkpoint.ManifestFile))
	if err != nil {
		return 0, err
	}
	w, err := s.opts.Store.Begin(ctx, s.job)
	if err != nil {
		return 0, err
	}
	defer func() { _ = w.Abort() }() // no-op after Commit
	for name := range m.Files {
		if err := s.add(w, name); err != nil {
			return 0, fmt.Errorf("storing %s: %w", name, err)
		}
	}
	snap, stored, err := w.Commit(meta)
	if err != nil {
		return 0, err
	}
	s.snapshot = snap
	return stored, nil
}

func (s *storeSink) add(w SnapshotWriter, name string) error {
	f, err := os.Open(filepath.Join(s.tmp, name))
	if err != nil {
		return err
	}
	defer f.Close()
	fw, err := w.Create(name)
	if err != nil {
		return err
	}
	if _, err := io.Copy(fw, s.opts.Progress.Reader(f)); err != nil {
		fw.Close()
		return err
	}
	return fw.Close()
}

func (s *storeSink) abort()             {}
func (s *storeSink) snapshotAdded() any { return s.snapshot }

// storeStreamSink: CRIU's images streamed straight into the snapshot
// store (its writer hashes and compresses them on every core as they
// come).
type storeStreamSink struct {
	job      string
	opts     Options
	w        SnapshotWriter
	snapshot any
}

func (s *storeStreamSink) begin(context.Context, *checkpoint.Manifest) error {
	var err error
	s.w, err = s.opts.Store.Begin(context.Background(), s.job)
	return err
}

func (s *storeStreamSink) create(name string) (io.WriteCloser, error) {
	fw, err := s.w.Create(name)
	if err != nil {
		return nil, err
	}
	return &meteredFile{WriteCloser: fw, meter: s.opts.Progress}, nil
}

func (s *storeStreamSink) heldPages() *heldFiles { return nil }

func (s *storeStreamSink) seal(_ context.Context, m *checkpoint.Manifest, streamed map[string]int64) (int64, error) {
	s.opts.Progress.SetPhase("storing")
	m.Files = streamed
	meta, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return 0, err
	}
	snap, stored, err := s.w.Commit(append(meta, '\n'))
	if err != nil {
		return 0, err
	}
	s.snapshot = snap
	return stored, nil
}

func (s *storeStreamSink) abort() {
	if s.w != nil {
		_ = s.w.Abort() // a no-op after Commit
	}
}

func (s *storeStreamSink) snapshotAdded() any { return s.snapshot }

// meteredFile counts what is written to an image's file in the progress
// meter.
type meteredFile struct {
	io.WriteCloser
	meter *progress.Meter
}

func (f *meteredFile) Write(p []byte) (int, error) {
	n, err := f.WriteCloser.Write(p)
	f.meter.Add(int64(n))
	return n, err
}

// streamSink: CRIU streams its images into an image writer whose output
// is a file (renamed into place once durable) or a pipe. With holdPages
// the pages files wait in pipes and go last (held.go).
type streamSink struct {
	out       string
	opts      Options
	holdPages bool
	file      *sink
	w         *image.Writer
	held      *heldFiles
}

func (s *streamSink) begin(_ context.Context, m *checkpoint.Manifest) error {
	var err error
	if s.file, err = openSink(s.out, s.opts); err != nil {
		return err
	}
	iopts := s.opts.Image
	if s.opts.LeaveRunning && s.opts.Handover == nil {
		// The job runs again once CRIU is done: what the output has not
		// taken by then waits in memory, not the job.
		iopts.Backlog = backlogChunks(cmp.Or(iopts.ChunkSize, image.DefaultChunkSize))
	}
	if s.w, err = image.NewWriter(s.file, m, iopts); err != nil {
		return err
	}
	if s.holdPages {
		s.held = &heldFiles{}
	}
	return nil
}

func (s *streamSink) create(name string) (io.WriteCloser, error) { return s.w.Create(name) }
func (s *streamSink) heldPages() *heldFiles                      { return s.held }

func (s *streamSink) seal(_ context.Context, m *checkpoint.Manifest, streamed map[string]int64) (int64, error) {
	return finishStreamed(s.w, s.file, m, streamed, s.held)
}

func (s *streamSink) abort() {
	if s.w != nil {
		s.w.Abort() // no trailer: a reader knows the stream is incomplete
	}
	if s.held != nil {
		s.held.close()
	}
	if s.file != nil {
		s.file.abort()
	}
}

// lazySink: a post-copy migration's stream. It starts before CRIU, with
// what a restore needs to start (the destination starts its CRIUs while
// this side dumps); CRIU's directory of everything but the private
// memory is packed into it afterwards.
type lazySink struct {
	tmp  string
	opts Options
	out  *countingWriter
	w    *image.Writer
}

func (s *lazySink) begin(_ context.Context, m *checkpoint.Manifest) error {
	s.out = &countingWriter{w: s.opts.StreamTo, meter: s.opts.Progress}
	var err error
	s.w, err = image.NewWriter(s.out, m, s.opts.Image)
	return err
}

func (s *lazySink) seal(_ context.Context, m *checkpoint.Manifest, _ map[string]int64) (int64, error) {
	defer os.RemoveAll(s.tmp)
	s.opts.Progress.SetPhase("packing")
	if _, err := seal(s.tmp, m, false); err != nil {
		return 0, err
	}
	if err := checkpoint.PackInto(s.w, s.tmp, m, m); err != nil {
		return 0, err
	}
	return s.out.n, nil
}

func (s *lazySink) abort() {
	if s.w != nil {
		s.w.Abort() // no-op once closed
	}
}

// backlogMax bounds the memory a checkpoint holds for a slow output
// (see image.WriterOptions.Backlog): a quarter of the memory available,
// and no more than this.
const backlogMax = 1 << 30

// backlogChunks is how many chunks of chunkSize a --leave-running
// checkpoint may hold for its output: a quarter of MemAvailable, at most
// backlogMax; none where /proc/meminfo cannot say.
func backlogChunks(chunkSize int) int {
	avail := proc.MemAvailable()
	if avail <= 0 || chunkSize <= 0 {
		return 0
	}
	return int(min(avail/4, backlogMax) / int64(chunkSize))
}
