package store

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"slices"
	"sync"

	pb "github.com/ferry-cr/ferry/proto"
)

// Reading pipeline, per open file: one goroutine walks the file's ref
// lists and cuts them into tasks of up to batchSize raw bytes; Workers
// goroutines fill tasks (one ReadAt for each run of blobs that lie next
// to each other in a pack, which is how a first snapshot is laid out,
// then decompress and hash each blob); Read hands out the tasks in order.
// At most readAhead tasks are in flight.
const (
	readAheadPerWorker = 2
	maxReadRun         = 1 << 20 // bytes fetched by one ReadAt
)

// Reader reads one snapshot. It holds the store's lock shared until
// Close, so GC cannot remove the chunks under it.
type Reader struct {
	s      *Store
	ctx    context.Context
	snap   Snapshot
	rec    *pb.StoreSnapshot
	files  map[string]*pb.StoreFile
	names  []string
	unlock func() error

	mu     sync.Mutex
	closed bool
	open   map[*fileReader]struct{}
}

// OpenSnapshot opens snap for reading. It waits (bounded by ctx) while a
// GC holds the lock; ctx also bounds every read.
func (s *Store) OpenSnapshot(ctx context.Context, snap Snapshot) (*Reader, error) {
	if err := s.checkOpen(); err != nil {
		return nil, err
	}
	if err := CheckJobName(snap.Job); err != nil {
		return nil, err
	}
	if checkComponent(snap.ID) != nil {
		return nil, fmt.Errorf("snapshot %q of job %q: %w", snap.ID, snap.Job, ErrNoSnapshot)
	}
	unlock, err := s.lk.Lock(ctx, false)
	if err != nil {
		return nil, err
	}
	r, err := s.openSnapshot(ctx, snap, unlock)
	if err != nil {
		return nil, errors.Join(err, unlock())
	}
	return r, nil
}

func (s *Store) openSnapshot(ctx context.Context, snap Snapshot, unlock func() error) (*Reader, error) {
	name := recordName(snap.Job, snap.ID)
	rec, err := s.readRecord(ctx, name)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("snapshot %q of job %q: %w", snap.ID, snap.Job, ErrNoSnapshot)
		}
		return nil, err
	}
	// After the record: its packs were committed before it, so this
	// sees them even if another process wrote the snapshot just now.
	if err := s.refresh(ctx); err != nil {
		return nil, err
	}
	r := &Reader{
		s: s, ctx: ctx, snap: snapshotOf(rec), rec: rec, unlock: unlock,
		files: make(map[string]*pb.StoreFile, len(rec.Files)),
		open:  make(map[*fileReader]struct{}),
	}
	for _, f := range rec.Files {
		if err := checkFileRecord(f); err != nil {
			return nil, corrupt(name, -1, zeroRef, err.Error(), nil)
		}
		if _, dup := r.files[f.Name]; dup {
			return nil, corrupt(name, -1, zeroRef, fmt.Sprintf("file %q twice", f.Name), nil)
		}
		r.files[f.Name] = f
		r.names = append(r.names, f.Name)
	}
	return r, nil
}

// checkFileRecord checks what a reader relies on before it allocates.
func checkFileRecord(f *pb.StoreFile) error {
	if checkComponent(f.Name) != nil {
		return fmt.Errorf("bad file name %q", f.Name)
	}
	if err := checkChunkSize(int(f.ChunkSize)); err != nil {
		return fmt.Errorf("file %q: %w", f.Name, err)
	}
	if f.Size > 1<<62 {
		return fmt.Errorf("file %q of %d bytes", f.Name, f.Size)
	}
	chunks := (f.Size + uint64(f.ChunkSize) - 1) / uint64(f.ChunkSize)
	if uint64(len(f.RefLists)) > chunks || (chunks > 0 && len(f.RefLists) == 0) {
		return fmt.Errorf("file %q: %d ref lists for %d chunks", f.Name, len(f.RefLists), chunks)
	}
	for _, l := range f.RefLists {
		if len(l) != digestSize {
			return fmt.Errorf("file %q: ref list digest of %d bytes", f.Name, len(l))
		}
	}
	return nil
}

// Snapshot describes the snapshot being read.
func (r *Reader) Snapshot() Snapshot { return r.snap }

// Meta returns the opaque bytes given to Commit.
// String names the snapshot, JOB@ID.
func (r *Reader) String() string { return r.snap.Job + "@" + r.snap.ID }

func (r *Reader) Meta() []byte { return r.rec.Meta }

// Names lists the snapshot's files in the order they were created.
func (r *Reader) Names() []string { return append([]string(nil), r.names...) }

// Size returns the size of file name, or -1 if the snapshot has no such
// file.
func (r *Reader) Size(name string) int64 {
	if f, ok := r.files[name]; ok {
		return int64(f.Size)
	}
	return -1
}

// Mode returns the permission bits recorded for file name.
func (r *Reader) Mode(name string) fs.FileMode {
	if f, ok := r.files[name]; ok {
		return fs.FileMode(f.Mode).Perm()
	}
	return 0
}

// Open streams file name. Every chunk is checked against its digest
// before its bytes are returned; a bad or missing chunk fails the read
// with an error matching ErrCorrupt.
func (r *Reader) Open(name string) (io.ReadCloser, error) {
	f, ok := r.files[name]
	if !ok {
		return nil, fmt.Errorf("snapshot %q of job %q has no file %q: %w", r.snap.ID, r.snap.Job, name, fs.ErrNotExist)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil, fmt.Errorf("reading %q: %w", name, ErrClosed)
	}
	fr := newFileReader(r, f)
	r.open[fr] = struct{}{}
	return fr, nil
}

// Close stops every open file's reads and releases the lock.
func (r *Reader) Close() error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil
	}
	r.closed = true
	open := make([]*fileReader, 0, len(r.open))
	for fr := range r.open {
		open = append(open, fr)
	}
	r.mu.Unlock()
	for _, fr := range open {
		fr.stop() // its next Read fails: the context is cancelled
	}
	return r.unlock()
}

// readTask is up to batchSize raw bytes of a file.
type readTask struct {
	refs  []digest
	last  int // raw length of the last chunk (the file's tail may be short)
	cs    int
	out   []byte
	err   error
	done  chan struct{}
	first uint64 // index of the first chunk in the file, for errors
}

type fileReader struct {
	r      *Reader
	f      *pb.StoreFile
	ctx    context.Context
	cancel context.CancelFunc
	order  chan *readTask
	work   chan *readTask
	wg     sync.WaitGroup
	cur    *readTask
	pos    int
	err    error
	bufs   sync.Pool
	once   sync.Once
}

func newFileReader(r *Reader, f *pb.StoreFile) *fileReader {
	ctx, cancel := context.WithCancel(r.ctx)
	n := r.s.opts.Workers
	fr := &fileReader{
		r: r, f: f, ctx: ctx, cancel: cancel,
		order: make(chan *readTask, readAheadPerWorker*n),
		work:  make(chan *readTask, readAheadPerWorker*n),
	}
	fr.bufs.New = func() any { b := make([]byte, 0, batchSize); return &b }
	fr.wg.Add(1 + n)
	go fr.produce()
	for range n {
		go fr.fill()
	}
	return fr
}

// produce walks the ref lists and queues tasks in file order.
func (fr *fileReader) produce() {
	defer fr.wg.Done()
	defer close(fr.work)
	defer close(fr.order)
	cs := int(fr.f.ChunkSize)
	perTask := batchSize / cs
	total := (fr.f.Size + uint64(cs) - 1) / uint64(cs)
	var idx uint64
	emit := func(t *readTask) bool {
		select {
		case fr.order <- t:
		case <-fr.ctx.Done():
			return false
		}
		if t.err != nil {
			close(t.done)
			return false
		}
		select {
		case fr.work <- t:
			return true
		case <-fr.ctx.Done():
			t.err = fr.ctx.Err() // queued for Read but never filled
			close(t.done)
			return false
		}
	}
	fail := func(err error) { emit(&readTask{err: err, done: make(chan struct{})}) }
	for _, l := range fr.f.RefLists {
		d := digest(l)
		raw, err := fr.r.s.readBlob(fr.ctx, d)
		if err != nil {
			fail(fmt.Errorf("reading ref list of %q: %w", fr.f.Name, err))
			return
		}
		refs, err := decodeRefList(raw)
		if err != nil {
			fail(corrupt("", -1, d, fmt.Sprintf("ref list of %q", fr.f.Name), err))
			return
		}
		if uint64(len(refs)) > total-idx {
			fail(corrupt("", -1, d, fmt.Sprintf("ref lists of %q hold more than its %d chunks", fr.f.Name, total), nil))
			return
		}
		for len(refs) > 0 {
			k := min(perTask, len(refs))
			t := &readTask{refs: refs[:k], cs: cs, last: cs, first: idx, done: make(chan struct{})}
			idx += uint64(k)
			refs = refs[k:]
			if idx == total {
				t.last = int(fr.f.Size - (total-1)*uint64(cs))
			}
			if !emit(t) {
				return
			}
		}
	}
	if idx != total {
		fail(corrupt("", -1, zeroRef, fmt.Sprintf("ref lists of %q hold %d of its %d chunks", fr.f.Name, idx, total), nil))
	}
}

// fill is one worker.
func (fr *fileReader) fill() {
	defer fr.wg.Done()
	var rbuf []byte
	for t := range fr.work {
		if fr.ctx.Err() == nil {
			t.out = (*fr.bufs.Get().(*[]byte))[:0]
			t.err = fr.fillTask(t, &rbuf)
		} else {
			t.err = fr.ctx.Err()
		}
		close(t.done)
	}
}

func (fr *fileReader) fillTask(t *readTask, rbuf *[]byte) error {
	s := fr.r.s
	locs := make([]loc, len(t.refs))
	for i, d := range t.refs {
		if d == zeroRef {
			continue
		}
		l, ok := s.lookup(d)
		if !ok {
			return corrupt("", -1, d, fmt.Sprintf("chunk %d of %q not in the store", t.first+uint64(i), fr.f.Name), nil)
		}
		if int(l.raw) != t.rawLen(i) {
			return corrupt(l.pack.name, int64(l.off), d, fmt.Sprintf("chunk %d of %q is %d bytes, want %d", t.first+uint64(i), fr.f.Name, l.raw, t.rawLen(i)), nil)
		}
		locs[i] = l
	}
	for i := 0; i < len(t.refs); {
		if t.refs[i] == zeroRef {
			o, n := len(t.out), t.rawLen(i)
			t.out = slices.Grow(t.out, n)[:o+n]
			clear(t.out[o:])
			i++
			continue
		}
		// A run of blobs stored back to back in one pack: one read.
		start := locs[i]
		end := start.off + start.stored
		j := i + 1
		for j < len(t.refs) && t.refs[j] != zeroRef && locs[j].pack == start.pack &&
			locs[j].off == end && end-start.off+locs[j].stored <= maxReadRun {
			end += locs[j].stored
			j++
		}
		n := int(end - start.off)
		if cap(*rbuf) < n {
			*rbuf = make([]byte, n)
		}
		buf := (*rbuf)[:n]
		if err := fr.readRun(start.pack.name, buf, int64(start.off)); err != nil {
			return err
		}
		for k := i; k < j; k++ {
			l := locs[k]
			stored := buf[l.off-start.off : l.off-start.off+l.stored]
			o := len(t.out)
			raw, err := s.checkBlob(l.pack.name, l.entry(t.refs[k]), stored, t.out[o:])
			if err != nil {
				return fmt.Errorf("chunk %d of %q: %w", t.first+uint64(k), fr.f.Name, err)
			}
			if len(raw) > 0 && o < cap(t.out) && &raw[0] == &t.out[o : o+1][0] {
				t.out = t.out[:o+len(raw)] // decompressed in place
			} else {
				t.out = append(t.out, raw...)
			}
		}
		i = j
	}
	return nil
}

func (t *readTask) rawLen(i int) int {
	if i == len(t.refs)-1 {
		return t.last
	}
	return t.cs
}

func (fr *fileReader) readRun(pack string, buf []byte, off int64) error {
	h, err := fr.r.s.acquire(fr.ctx, pack)
	if err != nil {
		return fmt.Errorf("opening pack: %w", err)
	}
	defer fr.r.s.release(h)
	if _, err := h.obj.ReadAt(buf, off); err != nil {
		if errors.Is(err, io.EOF) {
			return corrupt(pack, off, zeroRef, "pack is shorter than its index says", err)
		}
		return fmt.Errorf("reading pack %q: %w", pack, err)
	}
	return nil
}

// Read implements io.Reader.
func (fr *fileReader) Read(p []byte) (int, error) {
	if fr.err != nil {
		return 0, fr.err
	}
	for fr.cur == nil || fr.pos == len(fr.cur.out) {
		if fr.cur != nil {
			fr.recycle(fr.cur)
			fr.cur = nil
		}
		t, ok := <-fr.order
		if !ok {
			if err := fr.ctx.Err(); err != nil {
				fr.err = fmt.Errorf("reading %q: %w", fr.f.Name, err)
				return 0, fr.err
			}
			fr.err = io.EOF
			return 0, io.EOF
		}
		<-t.done
		if t.err != nil {
			fr.err = t.err
			return 0, t.err
		}
		fr.cur, fr.pos = t, 0
	}
	n := copy(p, fr.cur.out[fr.pos:])
	fr.pos += n
	return n, nil
}

func (fr *fileReader) recycle(t *readTask) {
	if cap(t.out) == batchSize {
		b := t.out[:0]
		fr.bufs.Put(&b)
	}
	t.out = nil
}

// Close implements io.Closer: it stops the read-ahead and waits for it.
// Close must not run concurrently with Read.
func (fr *fileReader) Close() error {
	fr.stop()
	if fr.err == nil {
		fr.err = fmt.Errorf("reading %q: %w", fr.f.Name, ErrClosed)
	}
	if fr.cur != nil {
		fr.recycle(fr.cur)
		fr.cur = nil
	}
	fr.r.mu.Lock()
	delete(fr.r.open, fr)
	fr.r.mu.Unlock()
	return nil
}

// stop cancels the read-ahead and waits for its goroutines, which all
// give up once the context ends.
func (fr *fileReader) stop() {
	fr.once.Do(func() {
		fr.cancel()
		fr.wg.Wait()
	})
}
