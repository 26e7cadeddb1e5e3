package image

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"
	"maps"
	"os"
	"runtime"
	"runtime/debug"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/klauspost/compress/s2"
	"github.com/klauspost/compress/zstd"
	"golang.org/x/sys/unix"
	gproto "google.golang.org/protobuf/proto"

	pb "github.com/ferry-cr/ferry/proto"
)

// Archive gives random access to the files of an image stream. A restore
// needs it because CRIU asks for its images in an order of its own, not
// the order in which the dump wrote them.
//
// From a file (OpenArchive) only the record headers are read up front
// (each checked against its CRC); a chunk's payload is read and checked
// when the chunk is served. From a pipe (ReadArchive) the whole stream is
// read and checked first, its compressed payloads kept in memory: no
// temporary file, and nothing is served from a stream that turns out to be
// truncated or tampered with.
//
// From a stream that names its last files early (a REMAINING record, see
// Writer.Remaining), StreamArchive returns at that record while it goes
// on reading: the files it has are served at once, and the remaining ones
// as they arrive, so a migration's restore runs while the job's memory is
// still on its way. Their chunks then pass through a few recycled
// buffers, each served once, instead of being kept.
//
// Either way WriteTo checks every chunk it serves, decompresses with every
// core, and holds back a file's last chunk until the file's SHA-256 matches
// the trailer, so a reader never receives a whole file that is wrong.
type Archive struct {
	manifest *pb.Manifest
	src      io.ReaderAt // nil when the payloads are in memory
	// mapped is the file of an OpenArchive mapped read-only, when it is
	// one (see mapFile): chunks are checked and decoded straight from
	// the page cache, and raw ones handed to a pipe by reference.
	mapped    []byte
	noDigests bool   // FlagNoDigests: files are checked by their chunks' CRCs only
	mem       *arena // ReadArchive, StreamArchive: where the payloads are held

	// An archive read from a stream (ReadArchive, StreamArchive) is filled
	// by a goroutine: what it fills is guarded by mu, and grew announces
	// every change.
	mu        sync.Mutex
	grew      *sync.Cond
	files     map[string]*archiveFile
	trailer   *pb.Trailer
	remaining map[string]bool   // files still to come, once the stream named them
	declared  map[string]uint64 // their sizes, when the stream gave them
	readDone  bool              // the stream has been read to its end, or failed
	readErr   error             // why it failed
	closed    bool              // Close was called: the reader stops and frees the memory
	read      chan struct{}     // closed when the reader is done

	// ahead holds the chunks ReadAhead decodes before they are asked for:
	// per file, the futures of its first chunks, taken by the first
	// writeTo of the file.
	aheadMu sync.Mutex
	ahead   map[string][]chan decoded
}

type archiveFile struct {
	index  *pb.FileIndex // from the trailer
	size   uint64
	chunks []archiveChunk
	ended  bool // FILE_END was read: no more chunks
	// A file named in a REMAINING record is served once: its chunks are
	// given back as they are written (served counts them), and while it
	// is served the reader waits for the writer rather than run ahead.
	serving  bool
	served   int
	released bool
}

type archiveChunk struct {
	h      *pb.RecordHeader
	at     int64  // payload offset in src
	data   []byte // the payload, when held in memory
	pooled bool   // data is a recycled buffer, given back once served
}

// maxAhead bounds the chunks of a file being served that the reader keeps
// waiting for its writer (4 MiB each by default).
const maxAhead = 8

// Manifest is the stream's first record.
func (a *Archive) Manifest() *pb.Manifest { return a.manifest }

// Trailer is the stream's index; nil until a stream has been read whole.
func (a *Archive) Trailer() *pb.Trailer {
	a.lock()
	defer a.unlock()
	return a.trailer
}

// lock and unlock guard what a reading goroutine fills; an archive of a
// file (OpenArchive) is complete from the start and has no lock to take.
func (a *Archive) lock() {
	if a.grew != nil {
		a.mu.Lock()
	}
}

func (a *Archive) unlock() {
	if a.grew != nil {
		a.mu.Unlock()
	}
}

// Size reports the size of file name and whether the stream holds it (for
// a file still arriving, the size so far).
func (a *Archive) Size(name string) (uint64, bool) {
	a.lock()
	defer a.unlock()
	f, ok := a.files[name]
	if !ok {
		return 0, false
	}
	return f.size, true
}

// finalSize is the size file name will have: its size once it has
// ended, the size its REMAINING record declared while it is on its way,
// or, when nothing says, what has come of it so far.
func (a *Archive) finalSize(name string) uint64 {
	a.lock()
	defer a.unlock()
	f := a.files[name]
	if d, ok := a.declared[name]; ok && (f == nil || !f.ended) {
		return min(d, 1<<62) // a hostile size must not wrap the splicer's int64s
	}
	if f == nil {
		return 0
	}
	return f.size
}

// Has reports whether file name is in the stream or still to come in it.
func (a *Archive) Has(name string) bool {
	a.lock()
	defer a.unlock()
	_, ok := a.files[name]
	return ok || a.remaining[name]
}

// Remaining lists the files the stream named as still to come (empty for a
// stream that named none).
func (a *Archive) Remaining() []string {
	a.lock()
	defer a.unlock()
	return slices.Sorted(maps.Keys(a.remaining))
}

// Wait blocks until the stream has been read to its end and returns what
// was wrong with it, if anything; at once for an archive read whole.
func (a *Archive) Wait() error {
	if a.read == nil {
		return nil
	}
	<-a.read
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.readErr
}

// OpenArchive indexes the stream in f by its record headers.
func OpenArchive(f io.ReaderAt) (*Archive, error) {
	m, t, trailerAt, flags, err := readIndex(f)
	if err != nil {
		return nil, err
	}
	a := &Archive{manifest: m, trailer: t, files: map[string]*archiveFile{}, src: f, noDigests: flags&FlagNoDigests != 0, readDone: true}
	if len(t.GetFiles()) == 0 {
		return a, nil
	}
	byIndex := make([]*archiveFile, len(t.GetFiles()))
	for i, fi := range t.GetFiles() {
		if fi.GetFile() != uint32(i) {
			return nil, fmt.Errorf("trailer index out of order at %d: %w", i, ErrCorrupt)
		}
		byIndex[i] = &archiveFile{index: fi}
		a.files[fi.GetName()] = byIndex[i]
	}
	off := t.GetFiles()[0].GetFirstRecord()
	ended := 0
	for off < trailerAt {
		h, hlen, err := headerAt(f, off)
		if err != nil {
			return nil, err
		}
		next := off + hlen + uint64(h.GetPayloadLen())
		if next > trailerAt {
			return nil, fmt.Errorf("record at byte %d runs into the trailer: %w", off, ErrCorrupt)
		}
		if h.GetKind() == pb.RecordHeader_REMAINING {
			off = next // a promise for a reader of the stream; here it is all at hand
			continue
		}
		if h.GetFile() >= uint32(len(byIndex)) {
			return nil, fmt.Errorf("record at byte %d names undeclared file %d: %w", off, h.GetFile(), ErrCorrupt)
		}
		af := byIndex[h.GetFile()]
		switch h.GetKind() {
		case pb.RecordHeader_FILE:
			if off != af.index.GetFirstRecord() || h.GetName() != af.index.GetName() {
				return nil, fmt.Errorf("file record at byte %d disagrees with the index: %w", off, ErrCorrupt)
			}
		case pb.RecordHeader_CHUNK:
			if h.GetOffset() != af.size || h.GetRawLen() > maxChunkRaw {
				return nil, fmt.Errorf("chunk of %q at byte %d out of place: %w", af.index.GetName(), off, ErrCorrupt)
			}
			if !knownCompression(h.GetCompression()) {
				return nil, fmt.Errorf("chunk of %q at byte %d: %w", af.index.GetName(), off, unsupported(h.GetCompression()))
			}
			af.chunks = append(af.chunks, archiveChunk{h: h, at: int64(off + hlen)})
			af.size += uint64(h.GetRawLen())
		case pb.RecordHeader_FILE_END:
			if h.GetOffset() != af.size {
				return nil, fmt.Errorf("%q ends at %d, its chunks hold %d bytes: %w", af.index.GetName(), h.GetOffset(), af.size, ErrCorrupt)
			}
			af.ended = true
			ended++
		default:
			return nil, fmt.Errorf("record of kind %s at byte %d: %w", h.GetKind(), off, ErrCorrupt)
		}
		off = next
	}
	if ended != len(byIndex) {
		return nil, fmt.Errorf("%d of %d files end before the trailer: %w", ended, len(byIndex), ErrCorrupt)
	}
	for _, af := range byIndex {
		if af.size != af.index.GetSize() || uint32(len(af.chunks)) != af.index.GetChunks() {
			return nil, fmt.Errorf("file %q disagrees with the trailer's index: %w", af.index.GetName(), ErrCorrupt)
		}
	}
	if m := mapFile(f, trailerAt); m != nil {
		a.mapped = m
		// Pages handed to a pipe hold their own references: unmapping
		// is safe once nothing reaches the archive.
		runtime.AddCleanup(a, func(b []byte) { _ = unix.Munmap(b) }, m)
	}
	return a, nil
}

// mapFile maps the first n bytes (the records before the trailer) of f,
// when f is a regular file, read-only; nil where it cannot. Serving a
// chunk from the mapping saves two copies of it: the read into a buffer
// and, for a raw chunk, the write into CRIU's pipe (vmsplice hands the
// page cache's pages over instead), a third of a restore's CPU here.
// Bytes are still checked against their CRC-32C before they are handed
// out; a file cut short while mapped faults where it is read, which
// touching turns into an error. A file rewritten in place while it is
// served (ferry replaces files by renaming new ones over them) could
// reach CRIU unchecked.
func mapFile(f io.ReaderAt, n uint64) []byte {
	file, ok := f.(*os.File)
	if !ok || n == 0 || n > 1<<46 {
		return nil
	}
	st, err := file.Stat()
	if err != nil || !st.Mode().IsRegular() || uint64(st.Size()) < n {
		return nil
	}
	rc, err := file.SyscallConn()
	if err != nil {
		return nil
	}
	var m []byte
	_ = rc.Control(func(fd uintptr) {
		m, err = unix.Mmap(int(fd), 0, int(n), unix.PROT_READ, unix.MAP_SHARED)
	})
	if err != nil {
		return nil
	}
	return m
}

// touching runs f, which reads the mapped file: a page the file no
// longer has (cut short while mapped) faults, and the fault comes back
// as an error instead of ending the process.
func touching(f func() error) (err error) {
	old := debug.SetPanicOnFault(true)
	defer func() {
		debug.SetPanicOnFault(old)
		if r := recover(); r != nil {
			if _, fault := r.(interface{ Addr() uintptr }); !fault {
				panic(r)
			}
			err = fmt.Errorf("the checkpoint file changed while it was read (%v): %w", r, ErrTruncated)
		}
	}()
	return f()
}

// headerAt reads and checks the frame and header of the record at off and
// returns the header and the bytes both take.
func headerAt(f io.ReaderAt, off uint64) (*pb.RecordHeader, uint64, error) {
	var fr [frameSize]byte
	if _, err := f.ReadAt(fr[:], int64(off)); err != nil {
		return nil, 0, fmt.Errorf("record at byte %d: %w", off, ErrTruncated)
	}
	n := binary.LittleEndian.Uint32(fr[0:])
	if n == 0 || n > maxHeaderLen {
		return nil, 0, fmt.Errorf("record header of %d bytes at byte %d (limit %d): %w", n, off, maxHeaderLen, ErrRecordTooLarge)
	}
	hb := make([]byte, n)
	if _, err := f.ReadAt(hb, int64(off)+frameSize); err != nil {
		return nil, 0, fmt.Errorf("record at byte %d: %w", off, ErrTruncated)
	}
	if crc(hb) != binary.LittleEndian.Uint32(fr[4:]) {
		return nil, 0, fmt.Errorf("record header at byte %d fails its checksum: %w", off, ErrCorrupt)
	}
	h := &pb.RecordHeader{}
	if err := gproto.Unmarshal(hb, h); err != nil {
		return nil, 0, fmt.Errorf("record header at byte %d: %w: %w", off, ErrCorrupt, err)
	}
	if h.GetPayloadLen() > maxPayloadLen {
		return nil, 0, fmt.Errorf("payload of %d bytes at byte %d (limit %d): %w", h.GetPayloadLen(), off, maxPayloadLen, ErrRecordTooLarge)
	}
	return h, frameSize + uint64(n), nil
}

// ReadArchive reads the whole stream from r, checking every record and the
// trailer's digest, and keeps the compressed chunks in memory (outside
// Go's heap, see arena) until Close. Each file's SHA-256 is checked as it
// is served.
func ReadArchive(r io.Reader) (*Archive, error) {
	a, err := readArchive(r, false)
	if err != nil {
		return nil, err
	}
	return a, nil
}

// StreamArchive is ReadArchive that returns as soon as the stream names
// its remaining files (or at its end, for a stream that does not), while
// a goroutine reads on. Files served before Wait returns nil may still
// prove bad: a chunk that fails its check, or a stream that breaks off,
// cuts the file being served, and Wait reports it. The caller must make
// the reader stop before it forgets the archive: Close, and an end of r.
func StreamArchive(r io.Reader) (*Archive, error) { return readArchive(r, true) }

// ReadArchiveFrom is ReadArchive for a stream whose header and manifest
// rd has read (and nothing after them): for a caller that acts on the
// manifest while the rest of the stream is still coming.
func ReadArchiveFrom(rd *Reader) (*Archive, error) { return archiveFrom(rd, false) }

// StreamArchiveFrom is StreamArchive for a stream whose header and
// manifest rd has read (see ReadArchiveFrom).
func StreamArchiveFrom(rd *Reader) (*Archive, error) { return archiveFrom(rd, true) }

func readArchive(r io.Reader, early bool) (*Archive, error) {
	rd, err := NewReader(r)
	if err != nil {
		return nil, err
	}
	return archiveFrom(rd, early)
}

func archiveFrom(rd *Reader, early bool) (*Archive, error) {
	var err error
	mem := &arena{}
	a := &Archive{manifest: rd.Manifest(), files: map[string]*archiveFile{}, noDigests: !rd.Digests(), mem: mem,
		read: make(chan struct{})}
	a.grew = sync.NewCond(&a.mu)
	// Should a caller forget Close: nothing can use the arena once the
	// archive is unreachable (its chunks are only reached through it, and
	// the reader holds it until the stream ends).
	runtime.AddCleanup(a, func(m *arena) { m.release() }, mem)
	rd.keep = a
	go a.fill(rd)
	a.mu.Lock()
	for !a.readDone && !(early && a.remaining != nil) {
		a.grew.Wait()
	}
	err = a.readErr
	a.mu.Unlock()
	if err != nil {
		a.Close()
		return nil, err
	}
	if !early {
		<-a.read
	}
	return a, nil
}

// fill reads the stream to its end into the archive.
func (a *Archive) fill(rd *Reader) {
	_, err := rd.Next()
	if errors.Is(err, io.EOF) {
		err = nil
	} else if err == nil {
		err = fmt.Errorf("chunk handed out while archiving: %w", ErrCorrupt)
	}
	rd.Close()
	a.mu.Lock()
	if err == nil {
		a.trailer = rd.Trailer()
		for _, fi := range a.trailer.GetFiles() {
			a.fileLocked(fi.GetName()).index = fi
		}
	}
	a.readErr, a.readDone = err, true
	closed := a.closed
	a.grew.Broadcast()
	a.mu.Unlock()
	close(a.read)
	if closed {
		a.free()
	}
}

// fileLocked returns file name's entry, made if new; mu is held.
func (a *Archive) fileLocked(name string) *archiveFile {
	af := a.files[name]
	if af == nil {
		af = &archiveFile{}
		a.files[name] = af
	}
	return af
}

// The reader's hooks (Reader.keep): a file is declared, ends, or the
// stream names the remaining files; a chunk's payload needs memory, and
// the chunk is kept.

func (a *Archive) declare(name string) {
	a.mu.Lock()
	a.fileLocked(name)
	a.grew.Broadcast()
	a.mu.Unlock()
}

func (a *Archive) endFile(name string) {
	a.mu.Lock()
	a.fileLocked(name).ended = true
	a.grew.Broadcast()
	a.mu.Unlock()
}

func (a *Archive) setRemaining(names map[string]bool, sizes map[string]uint64) {
	a.mu.Lock()
	a.remaining = maps.Clone(names)
	a.declared = maps.Clone(sizes)
	a.grew.Broadcast()
	a.mu.Unlock()
}

// pooledLocked says whether a chunk of n payload bytes of file name goes
// into a recycled buffer: a remaining file's, when it fits one.
func (a *Archive) pooledLocked(name string, n int) bool {
	return a.remaining[name] && n <= DefaultChunkSize
}

// payloadFor returns memory for a chunk payload of n bytes of file name.
func (a *Archive) payloadFor(name string, n int) []byte {
	a.mu.Lock()
	pooled := a.pooledLocked(name, n)
	a.mu.Unlock()
	if pooled {
		return getChunkBuf(n)
	}
	return a.mem.alloc(n)
}

// unkept gives back memory payloadFor returned for a chunk that is not
// kept after all (its record was cut short or damaged).
func (a *Archive) unkept(name string, payload []byte) {
	a.mu.Lock()
	pooled := a.pooledLocked(name, len(payload))
	a.mu.Unlock()
	if pooled {
		putChunkBuf(payload)
	}
}

// errArchiveClosed stops the reader of an archive closed before its end.
var errArchiveClosed = errors.New("image archive closed while its stream was read")

// keepChunk is Reader.Next's CHUNK case for an archive: the payload, read
// into memory from payloadFor, is kept compressed instead of decoded.
func (a *Archive) keepChunk(name string, h *pb.RecordHeader, payload []byte) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed {
		if a.pooledLocked(name, len(payload)) {
			putChunkBuf(payload)
		}
		return errArchiveClosed
	}
	af := a.fileLocked(name)
	pooled := a.pooledLocked(name, len(payload))
	af.chunks = append(af.chunks, archiveChunk{h: h, data: payload, pooled: pooled})
	af.size += uint64(h.GetRawLen())
	a.grew.Broadcast()
	// A file being served holds the reader back once it is maxAhead chunks
	// behind: its chunks then cycle through a few warm buffers instead of
	// fresh memory (whose first touch costs a fault per page).
	for pooled && af.serving && len(af.chunks)-af.served > maxAhead && !a.closed {
		a.grew.Wait()
	}
	return nil
}

// Close frees the memory of an archive read from a stream; nothing read
// from it may be used afterwards. A reader still running stops at its
// next record and frees the memory then. A no-op for OpenArchive's.
func (a *Archive) Close() {
	if a.grew == nil {
		return
	}
	a.mu.Lock()
	if a.closed {
		a.mu.Unlock()
		return
	}
	a.closed = true
	done := a.readDone
	a.grew.Broadcast()
	a.mu.Unlock()
	if done {
		a.free()
	}
}

// free gives back the arena and the recycled buffers still held.
func (a *Archive) free() {
	a.mem.release()
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, af := range a.files {
		for i := range af.chunks {
			if c := &af.chunks[i]; c.pooled && c.data != nil {
				putChunkBuf(c.data)
				c.data = nil
			}
		}
	}
}

// Digests says whether the files are checked against SHA-256 digests (see
// FlagNoDigests).
func (a *Archive) Digests() bool { return !a.noDigests }

// ReadFile returns the whole of a small file (the manifest, for example).
func (a *Archive) ReadFile(name string, limit int64) ([]byte, error) {
	size, ok := a.Size(name)
	if !ok {
		return nil, fmt.Errorf("%s is not in the checkpoint", name)
	}
	if int64(size) > limit {
		return nil, fmt.Errorf("%s has %d bytes, more than %d: %w", name, size, limit, ErrRecordTooLarge)
	}
	var b bytes.Buffer
	if _, err := a.WriteTo(name, &b); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

type decoded struct {
	data   []byte
	own    bool // data is a pooled buffer (not the archive's memory): recycle it
	pooled bool // data is the chunk's own recycled buffer: copy it, then give it back
	i      int  // the chunk's index in its file
	err    error
}

// WriteTo writes file name to w. Chunks are read, checked and decompressed
// by up to GOMAXPROCS goroutines ahead of the writer; memory stays bounded
// by that window. The last chunk is written only once the file's SHA-256
// matches the trailer's.
func (a *Archive) WriteTo(name string, w io.Writer) (int64, error) {
	return a.writeTo(name, func(b []byte, _ piece) (int, error) { return w.Write(b) }, putChunkBuf)
}

// piece says whose memory a piece that writeTo writes is, and so for how
// long it stays as it is.
type piece int

const (
	heldPiece   piece = iota // the archive's: unchanged until Close
	ownPiece                 // a decoded chunk's buffer: unchanged until writeTo's recycle gets it
	pooledPiece              // a held stream's raw chunk, in a recycled buffer: the same
)

// SpliceTo is WriteTo into a pipe: raw chunks held in memory go in with
// vmsplice, by reference, not copied: the pipe takes its own references
// to their pages, and they do not change until Close. Where a process
// reads its images from a pipe (CRIU's restore), the pipe's lock is then
// held only to link pages, not to copy them, so the reader is not kept
// waiting: a write that copies holds the lock, and so keeps the reader
// out, for as long as the copy takes, and the reader's copy in turn
// keeps the writer out, so that the two copies take turns rather than
// overlap. Decoded chunks, and the raw chunks of a stream's remaining
// files (in recycled buffers), go in by reference too (see splicer), but
// for the file's last pipeful, which is copied. count, when not nil, hears
// of every byte.
func (a *Archive) SpliceTo(name string, pipe *os.File, count func(int64)) (int64, error) {
	rc, err := pipe.SyscallConn()
	if err != nil {
		return 0, err
	}
	sp := newSplicer(rc, int64(a.finalSize(name)))
	n, err := a.writeTo(name, func(b []byte, p piece) (int, error) {
		n, err := sp.write(b, p)
		if count != nil {
			count(int64(n))
		}
		return n, err
	}, sp.recycle)
	sp.finish()
	return n, err
}

// splicer writes a file into a pipe, its decoded chunks by reference
// (vmsplice) but for the last pipeful, which it copies. A buffer given
// by reference goes back to chunkBufs only once the pipe's reader has
// read past its end (FIONREAD says what is still unread in the pipe):
// until then the pipe's pages are the buffer's. The copied tail of the
// file pushes every earlier byte out of the pipe, so that at the file's
// end every buffer is free as a rule; one the reader has not read then
// (it stopped reading, or grew the pipe) is waited for a while, and
// never reused if it is still unread.
type splicer struct {
	rc       syscall.RawConn
	size     int64 // the file's
	pipeSize int64 // what the pipe holds at most
	tail     int64 // from this offset on, pieces are copied
	written  int64 // into the pipe so far
	pending  []spliced
}

// spliced is a buffer in the pipe by reference.
type spliced struct {
	b    []byte
	end  int64 // written after its last byte
	done bool  // writeTo is done with it (recycle)
}

func newSplicer(rc syscall.RawConn, size int64) *splicer {
	sp := &splicer{rc: rc, size: size}
	pipeSize := int64(1 << 20)
	_ = rc.Control(func(fd uintptr) {
		if n, err := unix.FcntlInt(fd, unix.F_GETPIPE_SZ, 0); err == nil && n > 0 {
			pipeSize = int64(n)
		}
	})
	sp.pipeSize, sp.tail = pipeSize, size-pipeSize
	return sp
}

func (sp *splicer) write(b []byte, p piece) (n int, err error) {
	switch {
	case p == heldPiece:
		n, err = vmsplice(sp.rc, b)
	case (p == ownPiece || p == pooledPiece) && sp.written+int64(len(b)) <= sp.tail:
		sp.pending = append(sp.pending, spliced{b: b, end: sp.written + int64(len(b))})
		n, err = vmsplice(sp.rc, b)
	default:
		n, err = writeRaw(sp.rc, b)
	}
	sp.written += int64(n)
	sp.reclaim(false)
	return n, err
}

// recycle is writeTo's: b, an own or pooled piece, may go back once the
// pipe is done with it.
func (sp *splicer) recycle(b []byte) {
	for i := range sp.pending {
		if p := &sp.pending[i]; unsafe.SliceData(p.b) == unsafe.SliceData(b) && !p.done {
			p.done = true
			sp.reclaim(false)
			return
		}
	}
	putChunkBuf(b) // copied: free now
}

// unread is what the pipe holds that its reader has not read.
func (sp *splicer) unread() (int64, bool) {
	var n int
	var err error
	// FIONREAD, which x/sys/unix names TIOCINQ (the same request).
	if cerr := sp.rc.Control(func(fd uintptr) { n, err = unix.IoctlGetInt(int(fd), unix.TIOCINQ) }); cerr != nil || err != nil {
		return 0, false
	}
	return int64(n), true
}

// readerThere says whether the pipe still has a reader.
func (sp *splicer) readerThere() bool {
	there := false
	_ = sp.rc.Control(func(fd uintptr) {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
		if n, err := unix.Poll(fds, 0); err == nil {
			there = n == 0 || fds[0].Revents&unix.POLLERR == 0
		}
	})
	return there
}

// reclaim gives back the buffers the reader has read past, in order.
// The pipe holds at most pipeSize bytes, so the reader has read all but
// the last pipeSize written: that bound costs nothing, and is all that
// a write uses. Asking the pipe (FIONREAD, precise) takes the pipe's
// lock, which the reader holds while it copies a pipeful out (CRIU reads
// up to 16 MiB at a time): asked after every write, the wait for it
// took 6% of a migration's destination (perf). Only finish asks. The
// bound holds while nobody resizes the pipe: CRIU makes its image pipes
// with pipe() and never resizes them (img-streamer.c), and every buffer
// in a pipe holds a page at most, so a pipe of pipeSize holds no more.
func (sp *splicer) reclaim(precise bool) {
	if len(sp.pending) == 0 {
		return
	}
	read := sp.written - sp.pipeSize
	if precise {
		unread, ok := sp.unread()
		if !ok {
			return
		}
		read = sp.written - unread
	}
	k := 0
	for k < len(sp.pending) && sp.pending[k].done && sp.pending[k].end <= read {
		putChunkBuf(sp.pending[k].b)
		k++
	}
	sp.pending = sp.pending[k:]
}

// finish settles the buffers still in the pipe when the file has been
// written (or its writing failed): it waits, a second at most, for the
// reader to read them; buffers still unread then are kept from reuse for
// good (strays), since the pipe may still hand out their pages. A pipe
// whose reader has gone is not waited for.
func (sp *splicer) finish() {
	for i := range sp.pending {
		sp.pending[i].done = true // writeTo has returned: nothing of it is in use
	}
	deadline := time.Now().Add(time.Second)
	for sp.reclaim(true); len(sp.pending) > 0 && time.Now().Before(deadline) && sp.readerThere(); sp.reclaim(true) {
		time.Sleep(200 * time.Microsecond)
	}
	if len(sp.pending) > 0 {
		strays.mu.Lock()
		for _, p := range sp.pending {
			strays.bufs = append(strays.bufs, p.b)
		}
		strays.mu.Unlock()
		sp.pending = nil
	}
}

// strays holds the buffers a pipe may still read from after their file
// was served (see splicer.finish): never reused, never collected.
var strays struct {
	mu   sync.Mutex
	bufs [][]byte
}

// writeRaw writes b to the pipe behind rc (copied).
func writeRaw(rc syscall.RawConn, b []byte) (int, error) {
	n, err := toPipe(rc, b, "write", unix.Write)
	copiedToPipes.Add(int64(n))
	return n, err
}

// copiedToPipes counts the bytes SpliceTo copied into pipes rather than
// handed them by reference: what the tests hold it to.
var copiedToPipes atomic.Int64

// vmsplice hands b to the pipe behind rc without copying it.
func vmsplice(rc syscall.RawConn, b []byte) (int, error) {
	return toPipe(rc, b, "vmsplice", func(fd int, p []byte) (int, error) {
		iov := unix.Iovec{Base: &p[0]}
		iov.SetLen(len(p))
		return unix.Vmsplice(fd, []unix.Iovec{iov}, 0)
	})
}

// toPipe puts all of b into the pipe behind rc with put (op names it in
// errors), waiting while a non-blocking pipe is full.
func toPipe(rc syscall.RawConn, b []byte, op string, put func(fd int, p []byte) (int, error)) (int, error) {
	n := 0
	var serr error
	err := rc.Write(func(fd uintptr) bool {
		for n < len(b) {
			k, err := put(int(fd), b[n:])
			switch {
			case err == unix.EINTR:
				continue
			case err == unix.EAGAIN:
				return false // a non-blocking pipe is full: wait
			case err != nil:
				serr = err
				return true
			}
			n += k
		}
		return true
	})
	if err == nil {
		err = serr
	}
	if err != nil {
		return n, &os.PathError{Op: op, Path: "pipe", Err: err}
	}
	return n, nil
}

// chunkAt returns chunk i of af, waiting for it while the stream may still
// bring it; ok is false once af ended before it (or stop closed).
func (a *Archive) chunkAt(name string, af *archiveFile, i int, stop <-chan struct{}) (c archiveChunk, ok bool, err error) {
	a.lock()
	defer a.unlock()
	for {
		select {
		case <-stop:
			return c, false, nil
		default:
		}
		switch {
		case i < len(af.chunks):
			c = af.chunks[i]
			if c.pooled && c.data == nil {
				return c, false, fmt.Errorf("%s was served once already and was not kept", name)
			}
			return c, true, nil
		case af.ended:
			return c, false, nil
		case a.readDone || a.closed:
			if a.readErr != nil {
				return c, false, fmt.Errorf("%s: %w", name, a.readErr)
			}
			return c, false, fmt.Errorf("%s was cut short: %w", name, ErrTruncated)
		}
		a.grew.Wait() // only a stream's archive can be short of chunks
	}
}

// lastAt reports whether chunk i is af's last, waiting until that is known.
func (a *Archive) lastAt(af *archiveFile, i int) bool {
	a.lock()
	defer a.unlock()
	for i+1 >= len(af.chunks) && !af.ended && !a.readDone && !a.closed {
		a.grew.Wait()
	}
	return i+1 >= len(af.chunks)
}

// digestOf waits for the trailer and returns af's SHA-256 from it.
func (a *Archive) digestOf(name string, af *archiveFile) ([]byte, error) {
	if err := a.Wait(); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	a.lock()
	defer a.unlock()
	if af.index == nil {
		return nil, fmt.Errorf("%s is not in the trailer's index: %w", name, ErrCorrupt)
	}
	return af.index.GetSha256(), nil
}

// served records that chunk i of af has been written, and lets the
// reader run on. The chunk's recycled buffer, if it has one, passes to
// the caller (taken), and the archive forgets it: a raw chunk's goes back
// through writeTo's recycle once its pipe is done with it (a splicer
// hands it to the pipe by reference), a decoded chunk's payload at once.
func (a *Archive) served(af *archiveFile, i int) (taken []byte) {
	if a.grew == nil {
		return nil // a file's archive: nothing to give back, nobody to wake
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if c := &af.chunks[i]; c.pooled && c.data != nil {
		taken, c.data = c.data, nil
		af.released = true
	}
	af.served = i + 1
	a.grew.Broadcast()
	return taken
}

// piece says whose memory d's data is (see piece).
func (d decoded) piece() piece {
	switch {
	case d.own:
		return ownPiece
	case d.pooled:
		return pooledPiece
	}
	return heldPiece
}

// errDigest is the error of file name whose bytes do not match the
// trailer's SHA-256.
func errDigest(name string) error {
	return fmt.Errorf("%s does not match its SHA-256 in the trailer: %w", name, ErrCorrupt)
}

// doneServing records that af is no longer being served, and wakes the
// stream's reader (and writeTo's producer).
func (a *Archive) doneServing(af *archiveFile) {
	a.lock()
	af.serving = false
	if a.grew != nil {
		a.grew.Broadcast()
	}
	a.unlock()
}

// giveBack is writeTo's end of a written chunk: d's buffer goes to
// recycle, and the payload the archive held for it (taken, from served)
// back to the pool, unless the two are one buffer (a raw chunk).
func giveBack(d decoded, taken []byte, recycle func([]byte)) {
	switch {
	case d.own:
		recycle(d.data)
		if taken != nil {
			putChunkBuf(taken) // compressed: read by the decoder only
		}
	case d.pooled && taken != nil:
		recycle(d.data)
	}
}

// writeTo is WriteTo and SpliceTo: write gets each piece in order, with
// held set for memory that stays unchanged until Close.
func (a *Archive) writeTo(name string, write func(b []byte, p piece) (int, error), recycle func([]byte)) (int64, error) {
	a.lock()
	af, ok := a.files[name]
	if !ok && a.remaining[name] {
		for af == nil && !a.readDone && !a.closed {
			a.grew.Wait()
			af = a.files[name]
		}
		ok = af != nil
	}
	if ok {
		if af.released {
			a.unlock()
			return 0, fmt.Errorf("%s was served once already and was not kept", name)
		}
		af.serving = true
	}
	a.unlock()
	if !ok {
		return 0, fmt.Errorf("%s is not in the checkpoint", name)
	}
	ahead := a.takeAhead(name)
	if len(ahead) == 0 && a.single(af) {
		return a.writeSingle(name, af, write, recycle)
	}
	workers := runtime.GOMAXPROCS(0)
	futures := make(chan chan decoded, workers)
	done := make(chan struct{})
	defer func() {
		close(done)
		a.doneServing(af) // wakes the producer below, and the reader
		// Chunks decoded for a file that failed midway, never written:
		// their buffers go back (a raw chunk's stays the archive's).
		go func() {
			for fut := range futures {
				if d := <-fut; d.own {
					putChunkBuf(d.data)
				}
			}
		}()
	}()
	go func() {
		defer close(futures)
		defer func() {
			// Chunks decoded ahead that will not be written now.
			for _, f := range ahead {
				go func() {
					if d := <-f; d.own {
						putChunkBuf(d.data)
					}
				}()
			}
		}()
		sem := make(chan struct{}, workers)
		for i := 0; ; i++ {
			c, more, err := a.chunkAt(name, af, i, done)
			if !more && err == nil {
				return
			}
			if len(ahead) > 0 && err == nil {
				// Decoded by ReadAhead already (or on its way).
				f := ahead[0]
				ahead = ahead[1:]
				fut := make(chan decoded, 1)
				select {
				case futures <- fut:
				case <-done:
					ahead = append(ahead, f)
					return
				}
				go func() {
					d := <-f
					d.i = i
					fut <- d
				}()
				continue
			}
			fut := make(chan decoded, 1)
			select {
			case futures <- fut:
			case <-done:
				return
			}
			if err != nil {
				fut <- decoded{err: err}
				return
			}
			select {
			case sem <- struct{}{}:
			case <-done:
				fut <- decoded{} // queued: whoever drains futures reads it
				return
			}
			go func() {
				data, own, err := a.decodeChunk(name, c)
				<-sem
				fut <- decoded{data: data, own: own, pooled: c.pooled && !own, i: i, err: err}
			}()
		}
	}()
	// The file's SHA-256 is computed by a goroutine of its own while the
	// chunks are written: hashing in line would put a second pass over
	// every byte, at about the speed of the reader (CRIU), between it and
	// the data. A written chunk is given back once hashed; the hasher may
	// lag hashLag chunks behind. The last chunk still waits for the whole
	// file's digest before it is written.
	sum := newChunkHasher(a.noDigests)
	defer sum.stop()
	type written struct {
		d   decoded
		ack <-chan struct{}
	}
	var lag []written
	release := func(w written) {
		<-w.ack
		giveBack(w.d, a.served(af, w.d.i), recycle)
	}
	// Every chunk written is released, also when the file fails midway:
	// its buffer may be in the pipe (by reference), and must then be the
	// splicer's alone to give back, not the archive's as well (Close).
	defer func() {
		for _, w := range lag {
			release(w)
		}
	}()
	var n int64
	chunks := 0
	for fut := range futures {
		d := <-fut
		if d.err != nil {
			return n, d.err
		}
		ack := sum.add(d.data)
		chunks++
		if !a.noDigests && a.lastAt(af, d.i) {
			<-ack // every chunk so far is hashed
			want, err := a.digestOf(name, af)
			if err == nil && !bytes.Equal(sum.h.Sum(nil), want) {
				err = errDigest(name)
			}
			if err != nil {
				if d.own {
					putChunkBuf(d.data) // never written
				}
				return n, err
			}
		}
		k, err := write(d.data, d.piece())
		n += int64(k)
		lag = append(lag, written{d, ack})
		for len(lag) > 0 {
			select {
			case <-lag[0].ack:
			default:
				if len(lag) <= hashLag {
					goto next
				}
			}
			release(lag[0])
			lag = lag[1:]
		}
	next:
		if err != nil {
			return n, err
		}
	}
	if chunks == 0 && !a.noDigests {
		want, err := a.digestOf(name, af)
		if err != nil {
			return 0, err
		}
		if !bytes.Equal(sum.h.Sum(nil), want) {
			return 0, errDigest(name)
		}
	}
	return n, nil
}

// single says whether af is known to be one chunk, or none.
func (a *Archive) single(af *archiveFile) bool {
	a.lock()
	defer a.unlock()
	return len(af.chunks) <= 1 && af.ended
}

// writeSingle is writeTo for a file of one chunk (or none), most of a
// checkpoint's files but its memory: the same checks, in line, without
// the decoders, hasher and futures a long file is served with, whose
// start-up and hand-offs cost more than the chunk (a post-copy
// destination unpacks some 25 of them while the job is stopped).
func (a *Archive) writeSingle(name string, af *archiveFile, write func(b []byte, p piece) (int, error), recycle func([]byte)) (int64, error) {
	defer a.doneServing(af)
	var d decoded
	c, more, err := a.chunkAt(name, af, 0, nil)
	if err != nil {
		return 0, err
	}
	if more {
		if d.data, d.own, err = a.decodeChunk(name, c); err != nil {
			return 0, err
		}
		d.pooled = c.pooled && !d.own
	}
	if !a.noDigests {
		want, err := a.digestOf(name, af)
		if err == nil {
			var sum [sha256.Size]byte
			// A mapped file cut short faults here: the sum then fails.
			err = touching(func() error { sum = sha256.Sum256(d.data); return nil })
			if err == nil && !bytes.Equal(sum[:], want) {
				err = errDigest(name)
			}
		}
		if err != nil {
			if d.own {
				putChunkBuf(d.data)
			}
			return 0, err
		}
	}
	if !more {
		return 0, nil
	}
	n, err := write(d.data, d.piece())
	giveBack(d, a.served(af, 0), recycle)
	return int64(n), err
}

// ReadAhead decodes up to n chunks, the first of each named file in
// turn, in the background on every core, before anyone asks for them: a
// restore calls it for the memory (CRIU's pages files, which it asks for
// last) while CRIU starts and rebuilds the tree, when this process would
// otherwise wait, so that the first chunks CRIU reads are ready. Memory
// is bounded by n chunks. Only for an archive of a file (OpenArchive);
// a no-op otherwise.
func (a *Archive) ReadAhead(names []string, n int) {
	if a.src == nil || n <= 0 {
		return
	}
	type job struct {
		name string
		c    archiveChunk
		fut  chan decoded
	}
	var jobs []job
	a.aheadMu.Lock()
	if a.ahead == nil {
		a.ahead = map[string][]chan decoded{}
	}
	for _, name := range names {
		af := a.files[name]
		if af == nil || a.ahead[name] != nil {
			continue
		}
		k := min(n-len(jobs), len(af.chunks))
		futs := make([]chan decoded, k)
		for i := range k {
			futs[i] = make(chan decoded, 1)
			jobs = append(jobs, job{name, af.chunks[i], futs[i]})
		}
		a.ahead[name] = futs
	}
	a.aheadMu.Unlock()
	go func() {
		sem := make(chan struct{}, runtime.GOMAXPROCS(0))
		for _, j := range jobs {
			sem <- struct{}{}
			go func() {
				defer func() { <-sem }()
				data, own, err := a.decodeChunk(j.name, j.c)
				j.fut <- decoded{data: data, own: own, err: err}
			}()
		}
	}()
}

// takeAhead returns the futures ReadAhead made for file name, once.
func (a *Archive) takeAhead(name string) []chan decoded {
	a.aheadMu.Lock()
	defer a.aheadMu.Unlock()
	futs := a.ahead[name]
	if futs != nil {
		a.ahead[name] = []chan decoded{} // taken: a second reader decodes afresh
	}
	return futs
}

// hashLag is how many written chunks the hasher of a file being served
// may be behind (their buffers are held until it catches up).
const hashLag = 4

// chunkHasher hashes a file's chunks in order on a goroutine of its own
// (see writeTo); with no digests it does nothing.
type chunkHasher struct {
	h    hash.Hash
	in   chan hashJob
	done chan struct{}
}

type hashJob struct {
	data []byte
	ack  chan struct{}
}

func newChunkHasher(none bool) *chunkHasher {
	c := &chunkHasher{h: newDigest(none)}
	if none {
		return c
	}
	c.in, c.done = make(chan hashJob, hashLag+2), make(chan struct{})
	go func() {
		defer close(c.done)
		for j := range c.in {
			// A mapped file cut short faults here: the sum then fails.
			_ = touching(func() error { _, err := c.h.Write(j.data); return err })
			close(j.ack)
		}
	}()
	return c
}

// add queues b, which must not change until the returned channel closes
// (b and every chunk before it are hashed then).
func (c *chunkHasher) add(b []byte) <-chan struct{} {
	ack := make(chan struct{})
	if c.in == nil {
		close(ack)
		return ack
	}
	c.in <- hashJob{b, ack}
	return ack
}

// stop waits for what was queued and ends the goroutine.
func (c *chunkHasher) stop() {
	if c.in != nil {
		close(c.in)
		<-c.done
	}
}

// decodeChunk reads (from src, or memory), checks and decompresses one
// chunk into a pooled buffer (own), or returns a raw chunk held in memory
// as it is (checked when it was read).
func (a *Archive) decodeChunk(name string, c archiveChunk) (data []byte, own bool, err error) {
	payload := c.data
	if a.mapped != nil {
		end := c.at + int64(c.h.GetPayloadLen())
		if c.at < 0 || end > int64(len(a.mapped)) {
			return nil, false, fmt.Errorf("chunk of %s at byte %d runs past the records: %w", name, c.at, ErrCorrupt)
		}
		payload = a.mapped[c.at:end:end]
		err = touching(func() error {
			if crc(payload) != c.h.GetPayloadCrc32C() {
				return fmt.Errorf("chunk of %s at byte %d fails its checksum: %w", name, c.at, ErrCorrupt)
			}
			if c.h.GetCompression() == pb.Compression_COMPRESSION_NONE {
				if c.h.GetPayloadLen() != c.h.GetRawLen() {
					return fmt.Errorf("chunk of %s: %d bytes stored raw, header says %d: %w", name, c.h.GetPayloadLen(), c.h.GetRawLen(), ErrCorrupt)
				}
				data = payload // served by reference (vmsplice)
				return nil
			}
			data, own, err = a.decodePayload(name, c, payload)
			return err
		})
		if err != nil && own {
			putChunkBuf(data)
			data, own = nil, false
		}
		return data, own, err
	}
	if a.src != nil && c.h.GetCompression() == pb.Compression_COMPRESSION_NONE {
		// Raw: read straight into the buffer that is served (a restore
		// moves half a job's memory or more this way; a copy saved).
		if c.h.GetPayloadLen() != c.h.GetRawLen() {
			return nil, false, fmt.Errorf("chunk of %s: %d bytes stored raw, header says %d: %w", name, c.h.GetPayloadLen(), c.h.GetRawLen(), ErrCorrupt)
		}
		out := getChunkBuf(int(c.h.GetRawLen()))
		if _, err := a.src.ReadAt(out, c.at); err != nil {
			putChunkBuf(out)
			return nil, false, fmt.Errorf("reading chunk of %s at byte %d: %w", name, c.at, err)
		}
		if crc(out) != c.h.GetPayloadCrc32C() {
			putChunkBuf(out)
			return nil, false, fmt.Errorf("chunk of %s at byte %d fails its checksum: %w", name, c.at, ErrCorrupt)
		}
		return out, true, nil
	}
	if a.src != nil {
		payload = getChunkBuf(int(c.h.GetPayloadLen()))
		defer putChunkBuf(payload)
		if _, err := a.src.ReadAt(payload, c.at); err != nil {
			return nil, false, fmt.Errorf("reading chunk of %s at byte %d: %w", name, c.at, err)
		}
		if crc(payload) != c.h.GetPayloadCrc32C() {
			return nil, false, fmt.Errorf("chunk of %s at byte %d fails its checksum: %w", name, c.at, ErrCorrupt)
		}
	} else if c.h.GetCompression() == pb.Compression_COMPRESSION_NONE {
		if uint32(len(payload)) != c.h.GetRawLen() {
			return nil, false, fmt.Errorf("chunk of %s: %d bytes stored raw, header says %d: %w", name, len(payload), c.h.GetRawLen(), ErrCorrupt)
		}
		return payload, false, nil
	}
	return a.decodePayload(name, c, payload)
}

// decodePayload decompresses the checked payload of chunk c into a pooled
// buffer (own).
func (a *Archive) decodePayload(name string, c archiveChunk, payload []byte) (data []byte, own bool, err error) {
	out := getChunkBuf(int(c.h.GetRawLen()))
	switch c.h.GetCompression() {
	case pb.Compression_COMPRESSION_NONE:
		if len(payload) != len(out) {
			putChunkBuf(out)
			return nil, false, fmt.Errorf("chunk of %s: %d bytes stored raw, header says %d: %w", name, len(payload), len(out), ErrCorrupt)
		}
		copy(out, payload)
	case pb.Compression_COMPRESSION_ZSTD:
		dec := decoders.Get().(*zstd.Decoder)
		got, err := dec.DecodeAll(payload, out[:0])
		decoders.Put(dec)
		if err != nil || len(got) != len(out) {
			putChunkBuf(out)
			if err == nil {
				err = fmt.Errorf("%d bytes, header says %d", len(got), len(out))
			}
			return nil, false, fmt.Errorf("chunk of %s: %w: zstd: %w", name, ErrCorrupt, err)
		}
	case pb.Compression_COMPRESSION_S2:
		// The block's own length must be the header's (bounded) before
		// it is decoded into out, which has just that room.
		n, err := s2.DecodedLen(payload)
		if err == nil && n != len(out) {
			err = fmt.Errorf("%d bytes, header says %d", n, len(out))
		}
		if err == nil {
			_, err = s2.Decode(out, payload)
		}
		if err != nil {
			putChunkBuf(out)
			return nil, false, fmt.Errorf("chunk of %s: %w: s2: %w", name, ErrCorrupt, err)
		}
	default:
		putChunkBuf(out)
		return nil, false, fmt.Errorf("chunk of %s: %w", name, unsupported(c.h.GetCompression()))
	}
	return out, true, nil
}

var decoders = sync.Pool{New: func() any {
	d, err := zstd.NewReader(nil, zstd.WithDecoderMaxMemory(maxChunkRaw), zstd.WithDecoderConcurrency(1))
	if err != nil {
		panic(err) // only for invalid options
	}
	return d
}}

// getChunkBuf returns n bytes, recycled from chunkBufs when n fits.
func getChunkBuf(n int) []byte {
	if n <= DefaultChunkSize {
		b := chunkBufs.get()[:n]
		if chunkBufTrace != nil {
			chunkBufTrace(b, false)
		}
		return b
	}
	return make([]byte, n)
}

func putChunkBuf(b []byte) {
	if chunkBufTrace != nil {
		chunkBufTrace(b, true)
	}
	chunkBufs.put(b)
}

// chunkBufTrace, when set (by tests), hears of every buffer an archive
// takes from chunkBufs (put false) and gives back (put true): a buffer
// given back twice, or while a pipe may still read it, would be handed
// out again under another chunk's bytes.
var chunkBufTrace func(b []byte, put bool)

// Names lists the files of the stream, in name order.
func (a *Archive) Names() []string {
	a.lock()
	defer a.unlock()
	return slices.Sorted(maps.Keys(a.files))
}
