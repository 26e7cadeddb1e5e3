package image

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"slices"
	"sync"
	"syscall"

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
// Either way WriteTo checks every chunk it serves, decompresses with every
// core, and holds back a file's last chunk until the file's SHA-256 matches
// the trailer, so a reader never receives a whole file that is wrong.
type Archive struct {
	manifest  *pb.Manifest
	trailer   *pb.Trailer
	files     map[string]*archiveFile
	src       io.ReaderAt // nil when the payloads are in memory
	noDigests bool        // FlagNoDigests: files are checked by their chunks' CRCs only
	mem       *arena      // ReadArchive: where the payloads are held
}

type archiveFile struct {
	index  *pb.FileIndex
	size   uint64
	chunks []archiveChunk
}

type archiveChunk struct {
	h    *pb.RecordHeader
	at   int64  // payload offset in src
	data []byte // the payload, when held in memory
}

// Manifest is the stream's first record.
func (a *Archive) Manifest() *pb.Manifest { return a.manifest }

// Trailer is the stream's index.
func (a *Archive) Trailer() *pb.Trailer { return a.trailer }

// Size reports the size of file name and whether the stream holds it.
func (a *Archive) Size(name string) (uint64, bool) {
	f, ok := a.files[name]
	if !ok {
		return 0, false
	}
	return f.size, true
}

// OpenArchive indexes the stream in f by its record headers.
func OpenArchive(f io.ReaderAt) (*Archive, error) {
	m, t, trailerAt, flags, err := readIndex(f)
	if err != nil {
		return nil, err
	}
	a := &Archive{manifest: m, trailer: t, files: map[string]*archiveFile{}, src: f, noDigests: flags&FlagNoDigests != 0}
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
			af.chunks = append(af.chunks, archiveChunk{h: h, at: int64(off + hlen)})
			af.size += uint64(h.GetRawLen())
		case pb.RecordHeader_FILE_END:
			if h.GetOffset() != af.size {
				return nil, fmt.Errorf("%q ends at %d, its chunks hold %d bytes: %w", af.index.GetName(), h.GetOffset(), af.size, ErrCorrupt)
			}
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
	return a, nil
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
	rd, err := NewReader(r)
	if err != nil {
		return nil, err
	}
	defer rd.Close()
	mem := &arena{}
	a := &Archive{manifest: rd.Manifest(), files: map[string]*archiveFile{}, noDigests: !rd.Digests(), mem: mem}
	// Should a caller forget Close: nothing can use the arena once the
	// archive is unreachable (its chunks are only reached through it).
	runtime.AddCleanup(a, func(m *arena) { m.release() }, mem)
	rd.keep = a
	if _, err := rd.Next(); !errors.Is(err, io.EOF) {
		mem.release()
		if err == nil {
			err = fmt.Errorf("chunk handed out while archiving: %w", ErrCorrupt)
		}
		return nil, err
	}
	a.trailer = rd.Trailer()
	for _, fi := range a.trailer.GetFiles() {
		af := a.files[fi.GetName()]
		if af == nil {
			af = &archiveFile{}
			a.files[fi.GetName()] = af
		}
		af.index = fi
	}
	return a, nil
}

// keepChunk is Reader.Next's CHUNK case for ReadArchive: the payload,
// read into the archive's memory, is kept compressed instead of decoded.
func (a *Archive) keepChunk(name string, h *pb.RecordHeader, payload []byte) {
	af := a.files[name]
	if af == nil {
		af = &archiveFile{}
		a.files[name] = af
	}
	af.chunks = append(af.chunks, archiveChunk{h: h, data: payload})
	af.size += uint64(h.GetRawLen())
}

// Close frees the memory of an archive read by ReadArchive; nothing read
// from it may be used afterwards. A no-op for OpenArchive's.
func (a *Archive) Close() {
	if a.mem != nil {
		a.mem.release()
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
	data []byte
	own  bool // data is a pooled buffer (not the archive's memory): recycle it
	err  error
}

// WriteTo writes file name to w. Chunks are read, checked and decompressed
// by up to GOMAXPROCS goroutines ahead of the writer; memory stays bounded
// by that window. The last chunk is written only once the file's SHA-256
// matches the trailer's.
func (a *Archive) WriteTo(name string, w io.Writer) (int64, error) {
	return a.writeTo(name, func(b []byte, _ bool) (int, error) { return w.Write(b) })
}

// SpliceTo is WriteTo into a pipe: raw chunks held in memory (ReadArchive)
// go in with vmsplice, by reference, not copied: the pipe takes its own
// references to their pages, and they do not change until Close. Where a
// process reads its images from a pipe (CRIU's restore), the pipe's lock
// is then held only to link pages, not to copy them, so the reader is
// not kept waiting. Other chunks are written. count, when not nil, hears
// of every byte.
func (a *Archive) SpliceTo(name string, pipe *os.File, count func(int64)) (int64, error) {
	rc, err := pipe.SyscallConn()
	if err != nil {
		return 0, err
	}
	return a.writeTo(name, func(b []byte, held bool) (int, error) {
		var n int
		var err error
		if held {
			n, err = vmsplice(rc, b)
		} else {
			n, err = pipe.Write(b)
		}
		if count != nil {
			count(int64(n))
		}
		return n, err
	})
}

// vmsplice hands b to the pipe behind rc without copying it.
func vmsplice(rc syscall.RawConn, b []byte) (int, error) {
	n := 0
	var serr error
	err := rc.Write(func(fd uintptr) bool {
		for n < len(b) {
			iov := unix.Iovec{Base: &b[n]}
			iov.SetLen(len(b) - n)
			k, err := unix.Vmsplice(int(fd), []unix.Iovec{iov}, 0)
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
		return n, &os.PathError{Op: "vmsplice", Path: "pipe", Err: err}
	}
	return n, nil
}

// writeTo is WriteTo and SpliceTo: write gets each piece in order, with
// held set for memory that stays unchanged until Close.
func (a *Archive) writeTo(name string, write func(b []byte, held bool) (int, error)) (int64, error) {
	af, ok := a.files[name]
	if !ok {
		return 0, fmt.Errorf("%s is not in the checkpoint", name)
	}
	workers := runtime.GOMAXPROCS(0)
	futures := make(chan chan decoded, workers)
	done := make(chan struct{})
	defer close(done)
	go func() {
		defer close(futures)
		sem := make(chan struct{}, workers)
		for _, c := range af.chunks {
			fut := make(chan decoded, 1)
			select {
			case futures <- fut:
			case <-done:
				return
			}
			select {
			case sem <- struct{}{}:
			case <-done:
				return
			}
			go func() {
				data, own, err := a.decodeChunk(name, c)
				<-sem
				fut <- decoded{data, own, err}
			}()
		}
	}()
	sum := newDigest(a.noDigests)
	var n int64
	left := len(af.chunks)
	for fut := range futures {
		d := <-fut
		if d.err != nil {
			return n, d.err
		}
		sum.Write(d.data)
		left--
		if left == 0 && !bytes.Equal(sum.Sum(nil), af.index.GetSha256()) {
			return n, fmt.Errorf("%s does not match its SHA-256 in the trailer: %w", name, ErrCorrupt)
		}
		k, err := write(d.data, !d.own)
		n += int64(k)
		if d.own {
			putChunkBuf(d.data)
		}
		if err != nil {
			return n, err
		}
	}
	if left != 0 {
		return n, fmt.Errorf("%s: %d chunks not read", name, left)
	}
	if len(af.chunks) == 0 && !bytes.Equal(sum.Sum(nil), af.index.GetSha256()) {
		return 0, fmt.Errorf("%s does not match its SHA-256 in the trailer: %w", name, ErrCorrupt)
	}
	return n, nil
}

// decodeChunk reads (from src, or memory), checks and decompresses one
// chunk into a pooled buffer (own), or returns a raw chunk held in memory
// as it is (checked when it was read).
func (a *Archive) decodeChunk(name string, c archiveChunk) (data []byte, own bool, err error) {
	payload := c.data
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
	default:
		putChunkBuf(out)
		return nil, false, fmt.Errorf("chunk of %s: compression %d: %w", name, c.h.GetCompression(), ErrCorrupt)
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
		return chunkBufs.get()[:n]
	}
	return make([]byte, n)
}

func putChunkBuf(b []byte) { chunkBufs.put(b) }

// Names lists the files of the stream, in name order.
func (a *Archive) Names() []string {
	names := make([]string, 0, len(a.files))
	for n := range a.files {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}
