package store

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	pb "github.com/ferry-cr/ferry/proto"
)

// Writer pipeline: each file cuts what it is given into batches of
// batchSize bytes; a batch goes to one of Options.Workers goroutines,
// which hash its chunks, look each up in the index, compress the new ones
// and append them to its own current pack. A file collects its batches'
// refs in order into ref lists. Full packs are sealed (index, fsync,
// rename) in the background while the next one fills.
//
// Each worker has its own pack because write(2) into the page cache
// took as much CPU as hashing and compressing together in profiles of new
// random pages (about 1.9 ms per MiB, ext4 on this project's VMs): with
// one shared pack, that work is serialised behind the pack's mutex; with
// one pack each, both cores do it.
//
// Memory is bounded: at most inflightPerWorker*Workers batches are queued
// or being worked on, each file holds one partial batch, and a pack is
// streamed to its object as it grows.
const (
	batchSize         = 1 << 20 // a multiple of every chunk size (powers of two up to 1 MiB)
	inflightPerWorker = 2
	maxQueuedPerFile  = 64 // batches done but not yet collected by their file
	packBufSize       = 1 << 20
	// maxSealing is how many packs per worker may wait for their fsync
	// while the workers go on. Each costs a few hundred KiB (its index);
	// the data is in the page cache already. Chosen by experiment: with
	// 2 per worker, ingest of new random pages stalled on ext4 journal
	// commits at 200-400 MB/s; with 8, 510-630 MB/s on the same VM.
	maxSealing = 8
)

// Writer adds one snapshot to a store; get one from Store.Begin. Files
// may be created and written from several goroutines at once. A Writer
// must end with Commit or Abort.
type Writer struct {
	s      *Store
	ctx    context.Context
	job    string
	start  time.Time // the snapshot's time: when the dump began
	unlock func() error
	check  func() error // is the lock still held (see Store.lock)

	jobs     chan *batch
	inflight chan struct{}
	workers  sync.WaitGroup
	bufs     sync.Pool

	submitMu  sync.RWMutex // guards jobs against a send after close
	jobsShut  bool
	closeJobs sync.Once

	mu      sync.Mutex // guards the fields below
	pending map[digest]struct{}
	files   []*fileWriter
	names   map[string]bool
	err     error
	state   writerState

	slots   []*packSlot // one per worker; ref lists go to slot 0
	sealing chan struct{}
	seals   sync.WaitGroup

	chunks, newChunks   atomic.Int64
	zeroBytes, newBytes atomic.Int64
	storedBytes         atomic.Int64
}

type writerState int

const (
	writerOpen writerState = iota
	writerEnding
	writerDone
)

var errAborted = errors.New("snapshot aborted")

// Begin starts a snapshot of job, dated now. It takes the store's lock shared
// (waiting, bounded by ctx, while a GC holds it) and keeps it until
// Commit or Abort, so that no GC can remove a chunk this snapshot
// decided not to store again because the store already had it. ctx also
// bounds the whole snapshot: once it ends, writes fail and Commit aborts.
func (s *Store) Begin(ctx context.Context, job string) (*Writer, error) {
	if err := s.checkOpen(); err != nil {
		return nil, err
	}
	if err := CheckJobName(job); err != nil {
		return nil, err
	}
	check, unlock, err := s.lock(ctx, false)
	if err != nil {
		return nil, err
	}
	if err := s.refresh(ctx); err != nil {
		return nil, errors.Join(err, unlock())
	}
	n := s.opts.Workers
	w := &Writer{
		s: s, ctx: ctx, job: job, unlock: unlock, check: check, start: time.Now(),
		jobs:     make(chan *batch, inflightPerWorker*n),
		inflight: make(chan struct{}, inflightPerWorker*n),
		pending:  make(map[digest]struct{}),
		names:    make(map[string]bool),
		sealing:  make(chan struct{}, maxSealing*n),
	}
	w.bufs.New = func() any { b := make([]byte, 0, batchSize); return &b }
	w.slots = make([]*packSlot, n)
	for i := range n {
		w.slots[i] = &packSlot{}
	}
	w.workers.Add(n)
	for i := range n {
		go w.work(i)
	}
	return w, nil
}

// FileOptions describes a file of a snapshot.
type FileOptions struct {
	// Mode is the file's permission bits, recorded for restore; default
	// 0o600.
	Mode fs.FileMode
	// ChunkSize overrides the store's chunk size for this file (a power
	// of two from 1 KiB to 1 MiB). By default CRIU pages files
	// (pages-*.img) are cut at the store's page chunk size (4 KiB) and
	// other files at its chunk size (64 KiB).
	ChunkSize int
}

// Create starts the file name with default options; see CreateFile.
func (w *Writer) Create(name string) (io.WriteCloser, error) {
	return w.CreateFile(name, FileOptions{})
}

// isPagesFile reports whether CRIU wrote name as raw pages.
func isPagesFile(name string) bool {
	return strings.HasPrefix(name, "pages-") && strings.HasSuffix(name, ".img")
}

// CreateFile starts the file name; write its bytes and Close it before
// Commit. name is a plain file name, unique in the snapshot.
func (w *Writer) CreateFile(name string, opts FileOptions) (io.WriteCloser, error) {
	if err := checkComponent(name); err != nil {
		return nil, &NameError{Kind: "file", Name: name, Err: err}
	}
	cs := opts.ChunkSize
	if cs == 0 {
		cs = int(w.s.cfg.ChunkSize)
		if isPagesFile(name) {
			cs = int(w.s.cfg.PageChunkSize)
		}
	}
	if err := checkChunkSize(cs); err != nil {
		return nil, fmt.Errorf("file %q: %w", name, err)
	}
	mode := opts.Mode.Perm()
	if opts.Mode == 0 {
		mode = 0o600
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.state != writerOpen {
		return nil, fmt.Errorf("creating %q: %w", name, ErrClosed)
	}
	if w.err != nil {
		return nil, w.err
	}
	if w.names[name] {
		return nil, &NameError{Kind: "file", Name: name, Err: ErrExists}
	}
	if len(w.files) >= maxFiles {
		return nil, fmt.Errorf("more than %d files: %w", maxFiles, ErrTooLarge)
	}
	fw := &fileWriter{w: w, name: name, mode: mode, chunkSize: cs}
	w.names[name] = true
	w.files = append(w.files, fw)
	return fw, nil
}

// fail records the writer's first error; every later write returns it.
func (w *Writer) fail(err error) {
	w.mu.Lock()
	if w.err == nil {
		w.err = err
	}
	w.mu.Unlock()
}

func (w *Writer) failed() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.err
}

// batch is up to batchSize bytes of one file on their way through a worker.
type batch struct {
	fw   *fileWriter
	buf  *[]byte
	refs []digest
	err  error
	done chan struct{}
}

// submit hands a full (or a file's last) batch to the workers.
func (w *Writer) submit(b *batch) error {
	select {
	case w.inflight <- struct{}{}:
	case <-w.ctx.Done():
		return fmt.Errorf("snapshot of job %q: %w", w.job, w.ctx.Err())
	}
	w.submitMu.RLock()
	defer w.submitMu.RUnlock()
	if w.jobsShut {
		<-w.inflight
		return fmt.Errorf("snapshot of job %q: %w", w.job, ErrClosed)
	}
	w.jobs <- b // never blocks: jobs has a slot for every inflight token
	return nil
}

func (w *Writer) shutJobs() {
	w.closeJobs.Do(func() {
		w.submitMu.Lock()
		w.jobsShut = true
		close(w.jobs)
		w.submitMu.Unlock()
	})
}

// work is one worker: hash, dedup, compress, append.
func (w *Writer) work(slot int) {
	defer w.workers.Done()
	var scratch []byte
	for b := range w.jobs {
		if err := w.failed(); err != nil {
			b.err = err
		} else if err := w.ctx.Err(); err != nil {
			b.err = fmt.Errorf("snapshot of job %q: %w", w.job, err)
		} else {
			b.err = w.process(slot, b, &scratch)
		}
		buf := b.buf
		b.buf = nil
		*buf = (*buf)[:0]
		w.bufs.Put(buf)
		<-w.inflight
		close(b.done)
	}
}

func (w *Writer) process(slot int, b *batch, scratch *[]byte) error {
	data := *b.buf
	cs := b.fw.chunkSize
	b.refs = make([]digest, 0, (len(data)+cs-1)/cs)
	for off := 0; off < len(data); off += cs {
		chunk := data[off:min(off+cs, len(data))]
		w.chunks.Add(1)
		if isZero(chunk) {
			w.zeroBytes.Add(int64(len(chunk)))
			b.refs = append(b.refs, zeroRef)
			continue
		}
		d, isNew, err := w.put(slot, chunk, scratch)
		if err != nil {
			return err
		}
		if isNew {
			w.newChunks.Add(1)
			w.newBytes.Add(int64(len(chunk)))
		}
		b.refs = append(b.refs, d)
	}
	return nil
}

// put stores raw as a blob unless the store or this writer has it
// already, and returns its digest.
func (w *Writer) put(slot int, raw []byte, scratch *[]byte) (digest, bool, error) {
	d := digest(sumSHA256(raw))
	if _, ok := w.s.lookup(d); ok {
		return d, false, nil
	}
	w.mu.Lock()
	if _, ok := w.pending[d]; ok {
		w.mu.Unlock()
		return d, false, nil
	}
	w.pending[d] = struct{}{}
	w.mu.Unlock()
	stored, c := w.s.cod.compress(raw, scratch)
	if err := w.appendBlob(slot, d, stored, len(raw), c); err != nil {
		w.fail(err)
		return d, false, err
	}
	return d, true, nil
}

// packBuilder streams one pack to its object.
type packBuilder struct {
	name    string
	ow      ObjectWriter
	bw      *bufio.Writer
	off     uint32
	entries []packEntry
}

func newPackName() (string, error) {
	var id [16]byte
	if _, err := rand.Read(id[:]); err != nil {
		return "", fmt.Errorf("making pack id: %w", err)
	}
	h := hex.EncodeToString(id[:])
	return "packs/" + h[:2] + "/" + h, nil
}

func (s *Store) newPackBuilder(ctx context.Context) (*packBuilder, error) {
	name, err := newPackName()
	if err != nil {
		return nil, err
	}
	ow, err := s.be.Create(ctx, name)
	if err != nil {
		return nil, err
	}
	p := &packBuilder{name: name, ow: ow, bw: bufio.NewWriterSize(ow, packBufSize), off: packHeaderSize}
	if _, err := p.bw.Write(packHeader()); err != nil {
		return nil, errors.Join(err, ow.Abort())
	}
	return p, nil
}

func (p *packBuilder) add(d digest, stored []byte, raw int, c codec) error {
	if _, err := p.bw.Write(stored); err != nil {
		return err
	}
	p.entries = append(p.entries, packEntry{d: d, off: p.off, stored: uint32(len(stored)), raw: uint32(raw), codec: c})
	p.off += uint32(len(stored))
	return nil
}

// seal writes the pack's index and footer and commits it: durable and
// visible when seal returns.
func (p *packBuilder) seal() (*packInfo, error) {
	t := packTrailer(p.entries, p.off)
	if _, err := p.bw.Write(t); err != nil {
		return nil, errors.Join(err, p.ow.Abort())
	}
	if err := p.bw.Flush(); err != nil {
		return nil, errors.Join(err, p.ow.Abort())
	}
	if err := p.ow.Commit(); err != nil {
		return nil, err
	}
	return &packInfo{name: p.name, size: int64(p.off) + int64(len(t)), blobs: len(p.entries)}, nil
}

// packSlot is where one worker appends.
type packSlot struct {
	mu   sync.Mutex
	pack *packBuilder
}

func (w *Writer) appendBlob(slot int, d digest, stored []byte, raw int, c codec) error {
	ps := w.slots[slot]
	ps.mu.Lock()
	defer ps.mu.Unlock()
	if ps.pack == nil {
		p, err := w.s.newPackBuilder(w.ctx)
		if err != nil {
			return err
		}
		ps.pack = p
	}
	if err := ps.pack.add(d, stored, raw, c); err != nil {
		return err
	}
	if int64(ps.pack.off) >= w.s.opts.PackSize {
		p := ps.pack
		ps.pack = nil
		// Backpressure: with maxSealing fsyncs in flight, appends wait.
		w.sealing <- struct{}{}
		w.seals.Add(1)
		go func() {
			defer w.seals.Done()
			defer func() { <-w.sealing }()
			if err := w.seal(p); err != nil {
				w.fail(err)
			}
		}()
	}
	return nil
}

// takePacks removes the packs being filled from their slots.
func (w *Writer) takePacks() []*packBuilder {
	var ps []*packBuilder
	for _, sl := range w.slots {
		sl.mu.Lock()
		if sl.pack != nil {
			ps = append(ps, sl.pack)
			sl.pack = nil
		}
		sl.mu.Unlock()
	}
	return ps
}

// seal commits a full pack and moves its blobs from the writer's pending
// set to the store's index: first into the index, so there is no moment
// at which neither knows a blob (that would only cost a duplicate).
func (w *Writer) seal(p *packBuilder) error {
	info, err := p.seal()
	if err != nil {
		return fmt.Errorf("writing pack %q: %w", p.name, err)
	}
	w.s.addPack(info, p.entries, false)
	w.mu.Lock()
	for _, e := range p.entries {
		delete(w.pending, e.d)
	}
	w.mu.Unlock()
	w.storedBytes.Add(info.size)
	return nil
}

// fileWriter is one file of a snapshot; it is an io.WriteCloser.
type fileWriter struct {
	w         *Writer
	name      string
	mode      fs.FileMode
	chunkSize int

	mu      sync.Mutex
	buf     *[]byte
	size    uint64
	queue   []*batch
	refs    refBuilder
	lists   [][]byte
	scratch []byte
	closed  bool
	err     error
}

// Write implements io.Writer.
func (fw *fileWriter) Write(p []byte) (int, error) {
	fw.mu.Lock()
	defer fw.mu.Unlock()
	if fw.closed {
		return 0, fmt.Errorf("writing %q: %w", fw.name, ErrClosed)
	}
	if fw.err != nil {
		return 0, fw.err
	}
	if err := fw.w.failed(); err != nil {
		return 0, err
	}
	n := len(p)
	for len(p) > 0 {
		if fw.buf == nil {
			fw.buf = fw.w.bufs.Get().(*[]byte)
		}
		b := *fw.buf
		take := min(batchSize-len(b), len(p))
		*fw.buf = append(b, p[:take]...)
		p = p[take:]
		if len(*fw.buf) == batchSize {
			if err := fw.flush(); err != nil {
				fw.err = err
				return n - len(p), err
			}
		}
	}
	return n, nil
}

// ReadFrom implements io.ReaderFrom, so that io.Copy reads straight into
// batch buffers rather than through a 32 KiB buffer and a copy.
func (fw *fileWriter) ReadFrom(r io.Reader) (int64, error) {
	fw.mu.Lock()
	defer fw.mu.Unlock()
	if fw.closed {
		return 0, fmt.Errorf("writing %q: %w", fw.name, ErrClosed)
	}
	if fw.err != nil {
		return 0, fw.err
	}
	var total int64
	for {
		if err := fw.w.failed(); err != nil {
			return total, err
		}
		if fw.buf == nil {
			fw.buf = fw.w.bufs.Get().(*[]byte)
		}
		b := *fw.buf
		n, rerr := r.Read(b[len(b):batchSize])
		*fw.buf = b[:len(b)+n]
		total += int64(n)
		if len(*fw.buf) == batchSize {
			if err := fw.flush(); err != nil {
				fw.err = err
				return total, err
			}
		}
		if errors.Is(rerr, io.EOF) {
			return total, nil
		}
		if rerr != nil {
			return total, rerr
		}
	}
}

// flush submits the buffered bytes as one batch and collects whatever
// batches are done.
func (fw *fileWriter) flush() error {
	if fw.buf == nil || len(*fw.buf) == 0 {
		return nil
	}
	b := &batch{fw: fw, buf: fw.buf, done: make(chan struct{})}
	fw.size += uint64(len(*fw.buf))
	fw.buf = nil
	if err := fw.w.submit(b); err != nil {
		return err
	}
	fw.queue = append(fw.queue, b)
	return fw.collect(false)
}

// collect appends done batches' refs, in order, to the file's ref lists;
// with wait, it waits for every batch.
func (fw *fileWriter) collect(wait bool) error {
	for len(fw.queue) > 0 {
		b := fw.queue[0]
		if wait || len(fw.queue) > maxQueuedPerFile {
			<-b.done
		} else {
			select {
			case <-b.done:
			default:
				return nil
			}
		}
		fw.queue[0] = nil
		fw.queue = fw.queue[1:]
		if b.err != nil {
			return b.err
		}
		for _, d := range b.refs {
			fw.refs.add(d)
			if fw.refs.n == refsPerList {
				if err := fw.flushRefs(); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// flushRefs stores the current ref list as a blob like any other, so
// identical lists (an unchanged file, a second job with the same memory)
// are stored once.
func (fw *fileWriter) flushRefs() error {
	if fw.refs.n == 0 {
		return nil
	}
	raw, err := fw.refs.encode()
	if err != nil {
		return err
	}
	d, _, err := fw.w.put(0, raw, &fw.scratch)
	if err != nil {
		return err
	}
	fw.lists = append(fw.lists, d[:])
	fw.refs.reset()
	return nil
}

// Close implements io.Closer: it waits until every byte of the file is
// hashed and, if new, in a pack (not yet durable: Commit does that).
func (fw *fileWriter) Close() error {
	fw.mu.Lock()
	defer fw.mu.Unlock()
	if fw.closed {
		return nil
	}
	if fw.err == nil {
		fw.err = fw.flush()
	}
	if err := fw.collect(true); err != nil && fw.err == nil {
		fw.err = err
	}
	if fw.err == nil {
		fw.err = fw.flushRefs()
	}
	if fw.buf != nil {
		fw.w.bufs.Put(fw.buf)
		fw.buf = nil
	}
	fw.closed = true
	if fw.err != nil {
		fw.w.fail(fw.err)
	}
	return fw.err
}

// Commit closes the snapshot: it waits for every chunk, seals the last
// pack, then writes the snapshot record, last and atomically. The snapshot
// is durable and listed when Commit returns nil; on error it does not
// exist (what it stored is left for GC). Commit releases the lock either
// way. meta is kept opaque with the snapshot (Reader.Meta).
func (w *Writer) Commit(meta []byte) (Snapshot, error) {
	w.mu.Lock()
	if w.state != writerOpen {
		w.mu.Unlock()
		return Snapshot{}, fmt.Errorf("committing snapshot of job %q: %w", w.job, ErrClosed)
	}
	for _, fw := range w.files {
		fw.mu.Lock()
		closed := fw.closed
		fw.mu.Unlock()
		if !closed {
			w.mu.Unlock()
			err := fmt.Errorf("committing snapshot of job %q: file %q was not closed", w.job, fw.name)
			return Snapshot{}, errors.Join(err, w.Abort())
		}
	}
	w.state = writerEnding
	w.mu.Unlock()

	snap, err := w.commit(meta)
	if err != nil {
		err = errors.Join(err, w.end(true))
		return Snapshot{}, err
	}
	return snap, w.end(false)
}

func (w *Writer) commit(meta []byte) (Snapshot, error) {
	if len(meta) > maxMetaLen {
		return Snapshot{}, fmt.Errorf("snapshot meta of %d bytes: %w", len(meta), ErrTooLarge)
	}
	w.shutJobs()
	w.workers.Wait()
	packs := w.takePacks()
	if err := w.failed(); err != nil {
		for _, p := range packs {
			err = errors.Join(err, p.ow.Abort())
		}
		w.seals.Wait()
		return Snapshot{}, err
	}
	for _, p := range packs {
		w.sealing <- struct{}{}
		w.seals.Go(func() {
			defer func() { <-w.sealing }()
			if err := w.seal(p); err != nil {
				w.fail(err)
			}
		})
	}
	w.seals.Wait()
	if err := w.failed(); err != nil {
		return Snapshot{}, err
	}
	if err := w.ctx.Err(); err != nil {
		return Snapshot{}, fmt.Errorf("snapshot of job %q: %w", w.job, err)
	}
	rec := &pb.StoreSnapshot{
		Job: w.job, Meta: meta,
		Stats: &pb.StoreStats{
			ZeroBytes:   uint64(w.zeroBytes.Load()),
			NewBytes:    uint64(w.newBytes.Load()),
			StoredBytes: uint64(w.storedBytes.Load()),
			Chunks:      uint64(w.chunks.Load()),
			NewChunks:   uint64(w.newChunks.Load()),
		},
	}
	for _, fw := range w.files {
		rec.Files = append(rec.Files, &pb.StoreFile{
			Name: fw.name, Size: fw.size, Mode: uint32(fw.mode),
			ChunkSize: uint32(fw.chunkSize), RefLists: fw.lists,
		})
		rec.Stats.RawBytes += fw.size
	}
	// The snapshot is dated from Begin, the moment of the state it
	// holds, so that of two overlapping snapshots of a job the later
	// state sorts last. An id collision (same job, same millisecond,
	// same 24 random bits) fails the no-replace commit; another suffix
	// is drawn.
	rec.TimeUnixNano = w.start.UnixNano()
	// A lease that lapsed (this host cut off from an object store for
	// longer than the lease) may have let a GC elsewhere delete a chunk
	// this snapshot relied on: no record then.
	if err := w.check(); err != nil {
		return Snapshot{}, fmt.Errorf("snapshot of job %q: %w", w.job, err)
	}
	var err error
	for range 3 {
		if rec.Id, err = newID(w.start); err != nil {
			return Snapshot{}, err
		}
		var b []byte
		if b, err = encodeMeta(kindSnapshot, rec, maxRecordLen); err != nil {
			return Snapshot{}, err
		}
		if err = putObject(w.ctx, w.s.be, recordName(w.job, rec.Id), b); !errors.Is(err, fs.ErrExist) {
			break
		}
	}
	if err != nil {
		return Snapshot{}, fmt.Errorf("writing snapshot record of job %q: %w", w.job, err)
	}
	return snapshotOf(rec), nil
}

// Abort abandons the snapshot: writes stop, the pack being written is
// removed, and the lock is released. Packs this writer already sealed stay
// until the next GC: another writer may already rely on their chunks, and
// only GC, under the exclusive lock, can tell.
func (w *Writer) Abort() error {
	w.mu.Lock()
	if w.state == writerDone {
		w.mu.Unlock()
		return nil
	}
	w.state = writerEnding
	w.mu.Unlock()
	return w.end(true)
}

// end stops the workers, drops an unsealed pack and releases the lock.
func (w *Writer) end(abort bool) error {
	if abort {
		w.fail(errAborted)
	}
	w.shutJobs()
	w.workers.Wait()
	w.seals.Wait()
	var errs []error
	for _, p := range w.takePacks() {
		errs = append(errs, p.ow.Abort())
	}
	w.mu.Lock()
	already := w.state == writerDone
	w.state = writerDone
	w.mu.Unlock()
	if !already {
		errs = append(errs, w.unlock())
	}
	return errors.Join(errs...)
}
