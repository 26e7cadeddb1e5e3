package store

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	pb "github.com/ferry-cr/ferry/proto"
)

// Compression says how a Store's writers compress new blobs. Readers
// handle every codec whatever this says: each blob's codec is in its
// pack's index.
type Compression string

// Compression values.
const (
	// CompressionDefault is CompressionZstd.
	CompressionDefault Compression = ""
	// CompressionZstd compresses each chunk with zstd's fastest level:
	// the best ratio (0.40 of raw on shared libraries cut in 4 KiB pages)
	// but ~185 MB/s per core on compressible pages, because zstd's
	// entropy stage costs 10-20 µs per block however small the block.
	// Incompressible pages are detected in under 1 µs and stored raw.
	CompressionZstd Compression = "zstd"
	// CompressionS2 compresses with S2 (Snappy's successor, same module
	// as zstd): ratio 0.52 on the same pages, ~850 MB/s per core. The
	// choice when ingest speed matters more than disk.
	CompressionS2 Compression = "s2"
	// CompressionNone stores chunks as they are.
	CompressionNone Compression = "none"
)

func (c Compression) codec() (codec, error) {
	switch c {
	case CompressionDefault, CompressionZstd:
		return codecZstd, nil
	case CompressionS2:
		return codecS2, nil
	case CompressionNone:
		return codecNone, nil
	}
	return 0, fmt.Errorf("unknown compression %q", string(c))
}

// Options tunes a Store; the zero value is a sane default.
type Options struct {
	Logger      *slog.Logger // default slog.Default()
	Compression Compression  // for new blobs; default zstd
	// Workers hash and compress chunks (writing) or read, decompress
	// and check them (reading). Default GOMAXPROCS.
	Workers int
	// PackSize is the size at which a writer closes a pack and starts
	// the next; default 32 MiB. Large enough that packs are few (the
	// index is rebuilt from their trailers on Open, and an object store
	// charges per request), small enough that GC rewrites little when it
	// repacks one and that a snapshot's packs reach the disk while it is
	// still being hashed.
	PackSize int64
	// NoCreate refuses a directory that is not a store yet (ErrNoStore)
	// instead of making one: what only reads a store (a restore, a
	// listing, a check) must not leave an empty one behind a mistyped
	// path.
	NoCreate bool
}

// Defaults.
const (
	// DefaultPageChunkSize cuts CRIU pages files (pages-*.img, raw
	// concatenated pages) at page boundaries, so one rewritten page costs
	// one page.
	DefaultPageChunkSize = 4096
	// DefaultChunkSize cuts every other file. CRIU's other images are
	// small protobuf files (core, mm, pagemap: kilobytes) rewritten at
	// every dump; 64 KiB keeps most of them in one chunk, makes the
	// per-chunk cost (a 32-byte ref, a 48-byte index entry) 0.12%, and
	// bounds what a change costs in the rare large one (a tmpfs tarball,
	// a ghost file) to 64 KiB around it.
	DefaultChunkSize = 64 << 10
	defaultPackSize  = 32 << 20
	maxPackSizeOpt   = 256 << 20
	// maxOpenPacks bounds the pack files a Store keeps open for reading.
	maxOpenPacks = 64
)

// Store is a content-addressed snapshot store. It is safe for concurrent
// use; several processes may use one store directory at once.
type Store struct {
	be   Backend
	lk   Locker
	opts Options
	log  *slog.Logger
	cfg  *pb.StoreConfig
	cod  *codecs

	mu    sync.RWMutex // guards index, packs, bad
	index map[digest]loc
	packs map[string]*packInfo
	bad   map[string]error // packs whose index fails its checks

	hmu     sync.Mutex // guards handles
	handles map[string]*handle

	closed atomic.Bool
}

// packInfo describes one committed pack.
type packInfo struct {
	name  string
	size  int64
	blobs int
}

// loc is where the index finds a blob.
type loc struct {
	pack   *packInfo
	off    uint32
	stored uint32
	raw    uint32
	codec  codec
}

func (l loc) entry(d digest) packEntry {
	return packEntry{d: d, off: l.off, stored: l.stored, raw: l.raw, codec: l.codec}
}

// Open opens the store in dir, creating dir and the store's layout when
// dir is missing or empty. A directory that holds anything else is
// refused with ErrNotStore. The in-memory index is built from the packs'
// trailers.
//
// dir may also be an S3 URL, s3://BUCKET[/PREFIX]: the store is then kept
// in that bucket (see openS3 for how the client is configured, doc.go
// for the protocol that lets several hosts share it). The bucket must
// exist; the store's config is created in it when the prefix is empty.
func Open(ctx context.Context, dir string, opts Options) (*Store, error) {
	if IsS3URL(dir) {
		return openS3(ctx, dir, opts)
	}
	if opts.NoCreate {
		if _, err := os.Stat(filepath.Join(dir, "config")); err != nil {
			return nil, ErrNoStore // the caller names dir
		}
	}
	be, _, err := newDirBackend(dir)
	if err != nil {
		return nil, err
	}
	return OpenBackend(ctx, be, opts)
}

// OpenBackend opens a store kept by be, which must also implement Locker.
// An empty backend gets a fresh config; a backend holding objects but no
// config is refused with ErrNotStore.
func OpenBackend(ctx context.Context, be Backend, opts Options) (*Store, error) {
	lk, ok := be.(Locker)
	if !ok {
		return nil, errors.New("store backend offers no locking")
	}
	use, err := opts.Compression.codec()
	if err != nil {
		return nil, err
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Workers <= 0 {
		opts.Workers = runtime.GOMAXPROCS(0)
	}
	if opts.PackSize <= 0 {
		opts.PackSize = defaultPackSize
	}
	opts.PackSize = min(max(opts.PackSize, 1<<20), maxPackSizeOpt)
	s := &Store{
		be: be, lk: lk, opts: opts, log: opts.Logger,
		index:   make(map[digest]loc),
		packs:   make(map[string]*packInfo),
		bad:     make(map[string]error),
		handles: make(map[string]*handle),
	}
	if err := s.loadConfig(ctx); err != nil {
		return nil, err
	}
	if s.cod, err = newCodecs(use, opts.Workers); err != nil {
		return nil, err
	}
	if err := s.refresh(ctx); err != nil {
		s.cod.close()
		return nil, err
	}
	return s, nil
}

// loadConfig reads the config, or writes the default one into an empty
// backend. Two processes creating one store race on a Commit that never
// replaces: the loser reads the winner's config.
func (s *Store) loadConfig(ctx context.Context) error {
	for range 2 {
		var cfg pb.StoreConfig
		err := readMeta(ctx, s.be, "config", kindConfig, maxConfigLen, &cfg)
		if err == nil {
			return s.setConfig(&cfg)
		}
		if !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("reading store config: %w", err)
		}
		objs, err := s.be.List(ctx, "")
		if err != nil {
			return err
		}
		if len(objs) > 0 {
			return fmt.Errorf("objects but no config: %w", ErrNotStore)
		}
		cfg = pb.StoreConfig{
			Format: formatVersion, Hash: hashName,
			PageChunkSize: DefaultPageChunkSize, ChunkSize: DefaultChunkSize,
			CreatedUnixNano: time.Now().UnixNano(),
		}
		b, err := encodeMeta(kindConfig, &cfg, maxConfigLen)
		if err != nil {
			return err
		}
		// Shared lock: a GC elsewhere would take our temporary object
		// for a leftover.
		unlock, err := s.lk.Lock(ctx, false)
		if err != nil {
			return err
		}
		err = errors.Join(putObject(ctx, s.be, "config", b), unlock())
		if err == nil {
			return s.setConfig(&cfg)
		}
		if !errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("writing store config: %w", err)
		}
	}
	return errors.New("store config appeared and vanished")
}

func (s *Store) setConfig(cfg *pb.StoreConfig) error {
	if cfg.Format != formatVersion {
		return fmt.Errorf("store format %d: %w", cfg.Format, ErrUnsupportedVersion)
	}
	if cfg.Hash != hashName {
		return fmt.Errorf("store hash %q: %w", cfg.Hash, ErrUnsupportedVersion)
	}
	for _, cs := range []uint32{cfg.PageChunkSize, cfg.ChunkSize} {
		if err := checkChunkSize(int(cs)); err != nil {
			return corrupt("config", -1, zeroRef, err.Error(), nil)
		}
	}
	s.cfg = cfg
	return nil
}

// checkChunkSize accepts powers of two from minChunkSize to maxChunkSize,
// so that every chunk size divides the writers' batch size.
func checkChunkSize(cs int) error {
	if cs < minChunkSize || cs > maxChunkSize || cs&(cs-1) != 0 {
		return fmt.Errorf("chunk size %d is not a power of two in [%d, %d]", cs, minChunkSize, maxChunkSize)
	}
	return nil
}

// lock takes the store-wide lock. check reports, before an irrevocable
// step (a record written, a pack deleted), whether a lease-based lock is
// still held without a gap; it always passes for a flock.
func (s *Store) lock(ctx context.Context, exclusive bool) (check, unlock func() error, err error) {
	if ll, ok := s.lk.(LeaseLocker); ok {
		return ll.LockLease(ctx, exclusive)
	}
	unlock, err = s.lk.Lock(ctx, exclusive)
	return func() error { return nil }, unlock, err
}

// putObject writes a small object in one go.
func putObject(ctx context.Context, be Backend, name string, b []byte) error {
	ow, err := be.Create(ctx, name)
	if err != nil {
		return err
	}
	if _, err := ow.Write(b); err != nil {
		return errors.Join(err, ow.Abort())
	}
	return ow.Commit()
}

// Close releases the Store's open packs and codec goroutines. Writers and
// Readers must be closed first.
func (s *Store) Close() error {
	if s.closed.Swap(true) {
		return nil
	}
	s.hmu.Lock()
	var errs []error
	for name, h := range s.handles {
		errs = append(errs, h.obj.Close())
		delete(s.handles, name)
	}
	s.hmu.Unlock()
	s.cod.close()
	return errors.Join(errs...)
}

// refresh brings the index up to date with the packs in the backend:
// another process may have added packs, or its GC removed some. Added
// packs are read in; a removed one makes the index rebuilt from scratch,
// because a blob the index placed in it may live on in another pack.
func (s *Store) refresh(ctx context.Context) error {
	objs, err := s.be.List(ctx, "packs/")
	if err != nil {
		return err
	}
	listed := make(map[string]ObjectInfo, len(objs))
	for _, o := range objs {
		listed[o.Name] = o
	}
	s.mu.RLock()
	gone := false
	for name := range s.packs {
		if _, ok := listed[name]; !ok {
			gone = true
			break
		}
	}
	var add []ObjectInfo
	for _, o := range objs {
		if _, ok := s.packs[o.Name]; !ok || gone {
			add = append(add, o)
		}
	}
	s.mu.RUnlock()

	type loaded struct {
		info    *packInfo
		entries []packEntry
		err     error
	}
	res := make([]loaded, len(add))
	for i, o := range add {
		if err := ctx.Err(); err != nil {
			return err
		}
		entries, err := s.loadPackIndex(ctx, o.Name)
		res[i] = loaded{info: &packInfo{name: o.Name, size: o.Size, blobs: len(entries)}, entries: entries, err: err}
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	if gone {
		s.index = make(map[digest]loc, len(s.index))
		s.packs = make(map[string]*packInfo, len(objs))
		s.bad = make(map[string]error)
		s.log.Debug("store: packs removed elsewhere, index rebuilt")
	}
	for name := range s.bad {
		if _, ok := listed[name]; !ok {
			delete(s.bad, name)
		}
	}
	for _, r := range res {
		if r.err != nil {
			if errors.Is(r.err, fs.ErrNotExist) {
				continue // deleted between List and Open
			}
			if _, known := s.bad[r.info.name]; !known {
				s.log.Warn("store: pack index unreadable; its chunks are unavailable (run verify)", "pack", r.info.name, "err", r.err)
			}
			s.bad[r.info.name] = r.err
			continue
		}
		delete(s.bad, r.info.name)
		s.addPackLocked(r.info, r.entries, false)
	}
	if gone {
		s.dropStaleHandles(listed)
	}
	return nil
}

func (s *Store) loadPackIndex(ctx context.Context, name string) ([]packEntry, error) {
	obj, err := s.be.Open(ctx, name)
	if err != nil {
		return nil, err
	}
	defer obj.Close()
	return readPackIndex(obj, name)
}

// addPackLocked adds a pack's blobs to the index. A blob already indexed
// elsewhere keeps its place unless override (GC moving live blobs out of
// a pack it is about to delete).
func (s *Store) addPackLocked(p *packInfo, entries []packEntry, override bool) {
	if _, ok := s.packs[p.name]; ok && !override {
		return
	}
	s.packs[p.name] = p
	for _, e := range entries {
		if _, ok := s.index[e.d]; ok && !override {
			continue
		}
		s.index[e.d] = loc{pack: p, off: e.off, stored: e.stored, raw: e.raw, codec: e.codec}
	}
}

// addPack is addPackLocked for callers that do not hold s.mu.
func (s *Store) addPack(p *packInfo, entries []packEntry, override bool) {
	s.mu.Lock()
	s.addPackLocked(p, entries, override)
	s.mu.Unlock()
}

// lookup finds a blob in the index.
func (s *Store) lookup(d digest) (loc, bool) {
	s.mu.RLock()
	l, ok := s.index[d]
	s.mu.RUnlock()
	return l, ok
}

// handle is an open pack shared by readers.
type handle struct {
	name  string
	obj   Object
	refs  int
	stale bool
	used  int64
}

var handleClock atomic.Int64

// acquire returns an open handle on a pack; release it when done.
func (s *Store) acquire(ctx context.Context, name string) (*handle, error) {
	s.hmu.Lock()
	if h, ok := s.handles[name]; ok && !h.stale {
		h.refs++
		h.used = handleClock.Add(1)
		s.hmu.Unlock()
		return h, nil
	}
	s.hmu.Unlock()
	obj, err := s.be.Open(ctx, name)
	if err != nil {
		return nil, err
	}
	s.hmu.Lock()
	defer s.hmu.Unlock()
	if h, ok := s.handles[name]; ok && !h.stale {
		obj.Close() // another goroutine opened it meanwhile
		h.refs++
		h.used = handleClock.Add(1)
		return h, nil
	}
	h := &handle{name: name, obj: obj, refs: 1, used: handleClock.Add(1)}
	if old, ok := s.handles[name]; ok {
		old.stale = true // closed on its last release
	}
	s.handles[name] = h
	s.evictLocked()
	return h, nil
}

func (s *Store) release(h *handle) {
	s.hmu.Lock()
	defer s.hmu.Unlock()
	h.refs--
	if h.refs == 0 && (h.stale || s.handles[h.name] != h) {
		h.obj.Close()
		return
	}
	s.evictLocked()
}

// evictLocked closes the least recently used idle handles beyond
// maxOpenPacks.
func (s *Store) evictLocked() {
	for len(s.handles) > maxOpenPacks {
		var victim *handle
		for _, h := range s.handles {
			if h.refs == 0 && (victim == nil || h.used < victim.used) {
				victim = h
			}
		}
		if victim == nil {
			return // all in use
		}
		delete(s.handles, victim.name)
		victim.obj.Close()
	}
}

// dropHandle forgets the handle of a deleted pack.
func (s *Store) dropHandle(name string) {
	s.hmu.Lock()
	defer s.hmu.Unlock()
	if h, ok := s.handles[name]; ok {
		delete(s.handles, name)
		if h.refs == 0 {
			h.obj.Close()
		} else {
			h.stale = true
		}
	}
}

func (s *Store) dropStaleHandles(listed map[string]ObjectInfo) {
	s.hmu.Lock()
	var gone []string
	for name := range s.handles {
		if _, ok := listed[name]; !ok {
			gone = append(gone, name)
		}
	}
	s.hmu.Unlock()
	for _, name := range gone {
		s.dropHandle(name)
	}
}

// readBlob returns a blob's raw bytes, checked against its digest.
func (s *Store) readBlob(ctx context.Context, d digest) ([]byte, error) {
	l, ok := s.lookup(d)
	if !ok {
		return nil, corrupt("", -1, d, "chunk not in the store", nil)
	}
	h, err := s.acquire(ctx, l.pack.name)
	if err != nil {
		return nil, fmt.Errorf("reading chunk %s: %w", d, err)
	}
	defer s.release(h)
	stored := make([]byte, l.stored)
	if _, err := h.obj.ReadAt(stored, int64(l.off)); err != nil {
		return nil, fmt.Errorf("reading chunk %s from %q: %w", d, l.pack.name, err)
	}
	return s.checkBlob(l.pack.name, l.entry(d), stored, nil)
}

// checkBlob decompresses a stored blob (into dst when it has room) and
// checks it against its digest.
func (s *Store) checkBlob(pack string, e packEntry, stored, dst []byte) ([]byte, error) {
	raw, err := s.cod.decompress(e, stored, dst)
	if err != nil {
		return nil, corrupt(pack, int64(e.off), e.d, "chunk does not decompress", err)
	}
	if digest(sumSHA256(raw)) != e.d {
		return nil, corrupt(pack, int64(e.off), e.d, "chunk content does not match its digest", nil)
	}
	return raw, nil
}

// Snapshot describes one snapshot, as listed.
type Snapshot struct {
	Job  string
	ID   string // sortable by time: 20261123T101500.123Z-3fa9c1
	Time time.Time
	// Files is the number of files in the snapshot.
	Files int
	// RawBytes is the sum of the files' sizes.
	RawBytes int64
	// ZeroBytes is how much of RawBytes was all-zero chunks (stored as
	// nothing).
	ZeroBytes int64
	// NewBytes is the raw size of the chunks this snapshot stored first;
	// the rest were already in the store.
	NewBytes int64
	// StoredBytes is what this snapshot added to the store's packs
	// (compressed chunks, ref lists, pack headers and indexes); its
	// record is not counted.
	StoredBytes int64
	// MetaBytes is the size of the opaque meta given to Commit.
	MetaBytes int
}

func recordName(job, id string) string { return "snapshots/" + job + "/" + id }

func snapshotOf(rec *pb.StoreSnapshot) Snapshot {
	st := rec.GetStats()
	return Snapshot{
		Job: rec.Job, ID: rec.Id, Time: time.Unix(0, rec.TimeUnixNano).UTC(),
		Files:       len(rec.Files),
		RawBytes:    int64(st.GetRawBytes()),
		ZeroBytes:   int64(st.GetZeroBytes()),
		NewBytes:    int64(st.GetNewBytes()),
		StoredBytes: int64(st.GetStoredBytes()),
		MetaBytes:   len(rec.Meta),
	}
}

// newID returns a snapshot id: the time in UTC to the millisecond, so
// that ids sort by time, and a random suffix against two snapshots of one
// job in the same millisecond.
func newID(t time.Time) (string, error) {
	var rnd [3]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		return "", fmt.Errorf("making snapshot id: %w", err)
	}
	return t.UTC().Format("20060102T150405.000Z") + "-" + hex.EncodeToString(rnd[:]), nil
}

// CheckJobName reports whether job may name a job in the store: a plain
// file name component (no '/', not starting with '.', no control
// characters, valid UTF-8, at most 255 bytes).
func CheckJobName(job string) error {
	if err := checkComponent(job); err != nil {
		return &NameError{Kind: "job", Name: job, Err: err}
	}
	return nil
}

// readRecord reads and checks a snapshot record.
func (s *Store) readRecord(ctx context.Context, name string) (*pb.StoreSnapshot, error) {
	var rec pb.StoreSnapshot
	if err := readMeta(ctx, s.be, name, kindSnapshot, maxRecordLen, &rec); err != nil {
		return nil, err
	}
	if recordName(rec.Job, rec.Id) != name {
		return nil, corrupt(name, -1, zeroRef, fmt.Sprintf("record names snapshot %q of job %q", rec.Id, rec.Job), nil)
	}
	return &rec, nil
}

// Snapshots lists the snapshots of job, or of every job when job is "",
// oldest first. A record that cannot be read is left out with a warning
// (Verify reports it).
func (s *Store) Snapshots(ctx context.Context, job string) ([]Snapshot, error) {
	prefix := "snapshots/"
	if job != "" {
		if err := CheckJobName(job); err != nil {
			return nil, err
		}
		prefix += job + "/"
	}
	objs, err := s.be.List(ctx, prefix)
	if err != nil {
		return nil, err
	}
	out := make([]Snapshot, 0, len(objs))
	for _, o := range objs {
		if strings.Count(o.Name, "/") != 2 {
			continue
		}
		rec, err := s.readRecord(ctx, o.Name)
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				continue // pruned while listing
			}
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			s.log.Warn("store: snapshot record unreadable (run verify)", "record", o.Name, "err", err)
			continue
		}
		out = append(out, snapshotOf(rec))
	}
	slices.SortFunc(out, func(a, b Snapshot) int {
		if c := a.Time.Compare(b.Time); c != 0 {
			return c
		}
		return strings.Compare(a.Job+"/"+a.ID, b.Job+"/"+b.ID)
	})
	return out, nil
}

// Latest returns the newest snapshot of job (of any job when job is "").
func (s *Store) Latest(ctx context.Context, job string) (Snapshot, error) {
	snaps, err := s.Snapshots(ctx, job)
	if err != nil {
		return Snapshot{}, err
	}
	if len(snaps) == 0 {
		return Snapshot{}, fmt.Errorf("latest snapshot of job %q: %w", job, ErrNoSnapshot)
	}
	return snaps[len(snaps)-1], nil
}

// Find returns the snapshot of job (any job when job is "") whose id is
// id or, failing that, the only one whose id begins with id.
func (s *Store) Find(ctx context.Context, job, id string) (Snapshot, error) {
	if id == "" || strings.ContainsRune(id, '/') {
		return Snapshot{}, fmt.Errorf("snapshot %q: %w", id, ErrNoSnapshot)
	}
	snaps, err := s.Snapshots(ctx, job)
	if err != nil {
		return Snapshot{}, err
	}
	var exact, prefix []Snapshot
	for _, sn := range snaps {
		switch {
		case sn.ID == id:
			exact = append(exact, sn)
		case strings.HasPrefix(sn.ID, id):
			prefix = append(prefix, sn)
		}
	}
	if len(exact) == 0 {
		exact = prefix
	}
	switch len(exact) {
	case 0:
		return Snapshot{}, fmt.Errorf("snapshot %q of job %q: %w", id, job, ErrNoSnapshot)
	case 1:
		return exact[0], nil
	}
	return Snapshot{}, fmt.Errorf("snapshot %q of job %q matches %d snapshots: %w", id, job, len(exact), ErrAmbiguous)
}

func (s *Store) checkOpen() error {
	if s.closed.Load() {
		return fmt.Errorf("store: %w", ErrClosed)
	}
	return nil
}
