package image

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"

	"github.com/klauspost/compress/s2"
	"github.com/klauspost/compress/zstd"
	gproto "google.golang.org/protobuf/proto"

	pb "github.com/ferry-cr/ferry/proto"
)

// Chunk is a piece of one file, checked and decompressed. Its Data is
// valid until the next call of Next.
type Chunk struct {
	File   string
	Offset uint64
	Data   []byte
}

// Reader reads an image stream front to back, checking every record
// before handing out its data, and the trailer and footer at the end.
type Reader struct {
	r        *bufio.Reader
	off      uint64
	digest   hash.Hash
	manifest *pb.Manifest
	trailer  *pb.Trailer
	files    []*readFile
	dec      *zstd.Decoder
	done     bool
	payload  []byte   // reused by readN
	data     []byte   // reused by decode
	keep     *Archive // ReadArchive: keep chunks compressed instead of handing them out
	flags    uint16   // the header's
	// remaining holds the names of a REMAINING record: true until the
	// file is declared.
	remaining map[string]bool
	// declared holds the sizes a REMAINING record gave its files.
	declared map[string]uint64
}

type readFile struct {
	name   string
	size   uint64
	ended  bool
	chunks uint32
	sum    hash.Hash
	start  uint64
}

// NewReader checks the header and reads the manifest.
func NewReader(r io.Reader) (*Reader, error) {
	rd := &Reader{r: bufio.NewReaderSize(r, 64<<10), digest: sha256.New()}
	var hdr [HeaderSize]byte
	if err := rd.read(hdr[:]); err != nil {
		return nil, err
	}
	if string(hdr[:8]) != Magic {
		return nil, ErrBadMagic
	}
	if v := binary.LittleEndian.Uint16(hdr[8:]); v != Version {
		return nil, fmt.Errorf("version %d, this ferry reads %d: %w", v, Version, ErrUnsupportedVersion)
	}
	if f := binary.LittleEndian.Uint16(hdr[10:]); f&^flagsKnown != 0 || binary.LittleEndian.Uint32(hdr[12:]) != 0 {
		return nil, fmt.Errorf("unknown header flags %#x: %w", f, ErrCorrupt)
	}
	rd.flags = binary.LittleEndian.Uint16(hdr[10:])
	if rd.flags&FlagNoDigests != 0 {
		// The header was hashed already, into nothing that will be checked.
		rd.digest = nopHash{}
	}
	h, payload, err := rd.record()
	if err != nil {
		return nil, err
	}
	if h.GetKind() != pb.RecordHeader_MANIFEST {
		return nil, fmt.Errorf("first record is %s, not the manifest: %w", h.GetKind(), ErrCorrupt)
	}
	rd.manifest = &pb.Manifest{}
	if err := gproto.Unmarshal(payload, rd.manifest); err != nil {
		return nil, fmt.Errorf("manifest: %w: %w", ErrCorrupt, err)
	}
	return rd, nil
}

// Manifest is the stream's manifest.
func (rd *Reader) Manifest() *pb.Manifest { return rd.manifest }

// Digests says whether the stream carries SHA-256 digests (see
// FlagNoDigests).
func (rd *Reader) Digests() bool { return rd.flags&FlagNoDigests == 0 }

// Trailer is the stream's index; it is known once Next returned io.EOF.
func (rd *Reader) Trailer() *pb.Trailer { return rd.trailer }

// Close releases the decoder.
func (rd *Reader) Close() {
	if rd.dec != nil {
		rd.dec.Close()
	}
}

// read fills b from the stream, hashing and counting it; an early end is
// ErrTruncated.
func (rd *Reader) read(b []byte) error {
	if _, err := io.ReadFull(rd.r, b); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return fmt.Errorf("at byte %d: %w", rd.off, ErrTruncated)
		}
		return fmt.Errorf("reading image: %w", err)
	}
	rd.digest.Write(b)
	rd.off += uint64(len(b))
	return nil
}

// readN reads n bytes into a buffer it reuses from call to call; past
// 8 MiB it grows the buffer only as data arrives, so that a lying length
// costs no more memory than the stream really holds.
func (rd *Reader) readN(n int) ([]byte, error) {
	const direct, step = 8 << 20, 1 << 20
	if n <= direct {
		if cap(rd.payload) < n {
			rd.payload = make([]byte, n)
		}
		buf := rd.payload[:n]
		if err := rd.read(buf); err != nil {
			return nil, err
		}
		return buf, nil
	}
	buf := make([]byte, 0, step)
	for len(buf) < n {
		k := min(n-len(buf), step)
		buf = append(buf, make([]byte, k)...)
		if err := rd.read(buf[len(buf)-k:]); err != nil {
			return nil, err
		}
	}
	return buf, nil
}

// record reads and checks one record.
func (rd *Reader) record() (*pb.RecordHeader, []byte, error) {
	at := rd.off
	var fr [frameSize]byte
	if err := rd.read(fr[:]); err != nil {
		return nil, nil, err
	}
	n := binary.LittleEndian.Uint32(fr[0:])
	if n == 0 || n > maxHeaderLen {
		return nil, nil, fmt.Errorf("record header of %d bytes at byte %d (limit %d): %w", n, at, maxHeaderLen, ErrRecordTooLarge)
	}
	hb := make([]byte, n)
	if err := rd.read(hb); err != nil {
		return nil, nil, err
	}
	if crc(hb) != binary.LittleEndian.Uint32(fr[4:]) {
		return nil, nil, fmt.Errorf("record header at byte %d fails its checksum: %w", at, ErrCorrupt)
	}
	h := &pb.RecordHeader{}
	if err := gproto.Unmarshal(hb, h); err != nil {
		return nil, nil, fmt.Errorf("record header at byte %d: %w: %w", at, ErrCorrupt, err)
	}
	limit := uint32(maxPayloadLen)
	if k := h.GetKind(); k == pb.RecordHeader_MANIFEST || k == pb.RecordHeader_TRAILER || k == pb.RecordHeader_REMAINING {
		limit = maxMetaLen
	}
	if h.GetPayloadLen() > limit {
		return nil, nil, fmt.Errorf("payload of %d bytes at byte %d (limit %d): %w", h.GetPayloadLen(), at, limit, ErrRecordTooLarge)
	}
	var payload []byte
	if n := int(h.GetPayloadLen()); n > 0 {
		var err error
		if rd.keep != nil && h.GetKind() == pb.RecordHeader_CHUNK {
			// Kept whole: read straight into the archive's memory (which
			// keepChunk then owns; readN's buffer is reused).
			name := ""
			if i := int(h.GetFile()); i < len(rd.files) {
				name = rd.files[i].name
			}
			payload = rd.keep.payloadFor(name, n)
			if err = rd.read(payload); err == nil && crc(payload) != h.GetPayloadCrc32C() {
				err = fmt.Errorf("payload at byte %d fails its checksum: %w", at, ErrCorrupt)
			}
			if err != nil {
				rd.keep.unkept(name, payload)
				return nil, nil, err
			}
		} else {
			payload, err = rd.readN(n)
			if err != nil {
				return nil, nil, err
			}
			if crc(payload) != h.GetPayloadCrc32C() {
				return nil, nil, fmt.Errorf("payload at byte %d fails its checksum: %w", at, ErrCorrupt)
			}
		}
	}
	return h, payload, nil
}

// Next returns the next chunk of file data, in stream order, or io.EOF
// once the trailer and footer have been read and every check passed.
func (rd *Reader) Next() (*Chunk, error) {
	for !rd.done {
		at := rd.off
		before := rd.digest.Sum(nil)
		h, payload, err := rd.record()
		if err != nil {
			return nil, err
		}
		switch h.GetKind() {
		case pb.RecordHeader_FILE:
			if int(h.GetFile()) != len(rd.files) || len(rd.files) >= maxFiles {
				return nil, fmt.Errorf("file %d declared out of order at byte %d: %w", h.GetFile(), at, ErrCorrupt)
			}
			if rd.remaining != nil {
				if !rd.remaining[h.GetName()] {
					return nil, fmt.Errorf("file %q at byte %d was not among the remaining ones: %w", h.GetName(), at, ErrCorrupt)
				}
				rd.remaining[h.GetName()] = false
			}
			rd.files = append(rd.files, &readFile{name: h.GetName(), sum: newDigest(!rd.Digests()), start: at})
			if rd.keep != nil {
				rd.keep.declare(h.GetName())
			}
		case pb.RecordHeader_CHUNK:
			f, err := rd.file(h, at)
			if err != nil {
				return nil, err
			}
			if h.GetOffset() != f.size {
				return nil, fmt.Errorf("chunk of %q at offset %d, expected %d: %w", f.name, h.GetOffset(), f.size, ErrCorrupt)
			}
			if d, ok := rd.declared[f.name]; ok && uint64(h.GetRawLen()) > d-f.size {
				return nil, fmt.Errorf("chunk of %q at byte %d goes past the %d bytes declared for it: %w", f.name, at, d, ErrCorrupt)
			}
			if rd.keep != nil {
				if h.GetRawLen() > maxChunkRaw {
					return nil, fmt.Errorf("chunk of %d raw bytes: %w", h.GetRawLen(), ErrRecordTooLarge)
				}
				if !knownCompression(h.GetCompression()) {
					return nil, fmt.Errorf("chunk of %q at byte %d: %w", f.name, at, unsupported(h.GetCompression()))
				}
				if err := rd.keep.keepChunk(f.name, h, payload); err != nil {
					return nil, err
				}
				f.size += uint64(h.GetRawLen())
				f.chunks++
				continue
			}
			data, err := rd.decode(h, payload)
			if err != nil {
				return nil, fmt.Errorf("chunk of %q at byte %d: %w", f.name, at, err)
			}
			f.size += uint64(len(data))
			f.chunks++
			f.sum.Write(data)
			return &Chunk{File: f.name, Offset: h.GetOffset(), Data: data}, nil
		case pb.RecordHeader_FILE_END:
			f, err := rd.file(h, at)
			if err != nil {
				return nil, err
			}
			if h.GetOffset() != f.size {
				return nil, fmt.Errorf("%q ends at %d, its chunks hold %d bytes: %w", f.name, h.GetOffset(), f.size, ErrCorrupt)
			}
			if d, ok := rd.declared[f.name]; ok && d != f.size {
				return nil, fmt.Errorf("%q ends at %d, %d bytes were declared for it: %w", f.name, f.size, d, ErrCorrupt)
			}
			f.ended = true
			if rd.keep != nil {
				rd.keep.endFile(f.name)
			}
		case pb.RecordHeader_REMAINING:
			if err := rd.setRemaining(payload, at); err != nil {
				return nil, err
			}
		case pb.RecordHeader_TRAILER:
			if err := rd.finish(at, before, payload); err != nil {
				return nil, err
			}
			rd.done = true
		default:
			return nil, fmt.Errorf("record of kind %s at byte %d: %w", h.GetKind(), at, ErrCorrupt)
		}
	}
	return nil, io.EOF
}

// setRemaining takes in a REMAINING record: once only, after every file
// declared so far has ended, naming each file once.
func (rd *Reader) setRemaining(payload []byte, at uint64) error {
	if rd.remaining != nil {
		return fmt.Errorf("second list of remaining files at byte %d: %w", at, ErrCorrupt)
	}
	for _, f := range rd.files {
		if !f.ended {
			return fmt.Errorf("%q has not ended where the remaining files are named (byte %d): %w", f.name, at, ErrCorrupt)
		}
	}
	var m pb.Remaining
	if err := gproto.Unmarshal(payload, &m); err != nil {
		return fmt.Errorf("remaining files at byte %d: %w: %w", at, ErrCorrupt, err)
	}
	if len(m.GetNames()) > maxFiles {
		return fmt.Errorf("%d remaining files: %w", len(m.GetNames()), ErrRecordTooLarge)
	}
	if len(m.GetSizes()) != 0 && len(m.GetSizes()) != len(m.GetNames()) {
		return fmt.Errorf("%d sizes for %d remaining files at byte %d: %w", len(m.GetSizes()), len(m.GetNames()), at, ErrCorrupt)
	}
	rem := make(map[string]bool, len(m.GetNames()))
	declared := make(map[string]uint64, len(m.GetSizes()))
	for i, n := range m.GetNames() {
		if rem[n] {
			return fmt.Errorf("%q named twice among the remaining files: %w", n, ErrCorrupt)
		}
		rem[n] = true
		if i < len(m.GetSizes()) {
			declared[n] = m.GetSizes()[i]
		}
	}
	for _, f := range rd.files {
		if rem[f.name] {
			return fmt.Errorf("%q named among the remaining files after it ended: %w", f.name, ErrCorrupt)
		}
	}
	rd.remaining, rd.declared = rem, declared
	if rd.keep != nil {
		rd.keep.setRemaining(rem, declared)
	}
	return nil
}

func (rd *Reader) file(h *pb.RecordHeader, at uint64) (*readFile, error) {
	i := int(h.GetFile())
	if i >= len(rd.files) {
		return nil, fmt.Errorf("record at byte %d names undeclared file %d: %w", at, i, ErrCorrupt)
	}
	f := rd.files[i]
	if f.ended {
		return nil, fmt.Errorf("record at byte %d for %q after its end: %w", at, f.name, ErrCorrupt)
	}
	return f, nil
}

func (rd *Reader) decode(h *pb.RecordHeader, payload []byte) ([]byte, error) {
	if h.GetRawLen() > maxChunkRaw {
		return nil, fmt.Errorf("chunk of %d raw bytes: %w", h.GetRawLen(), ErrRecordTooLarge)
	}
	var data []byte
	switch h.GetCompression() {
	case pb.Compression_COMPRESSION_NONE:
		data = payload
	case pb.Compression_COMPRESSION_ZSTD:
		if rd.dec == nil {
			dec, err := zstd.NewReader(nil, zstd.WithDecoderMaxMemory(maxChunkRaw), zstd.WithDecoderConcurrency(1))
			if err != nil {
				return nil, err
			}
			rd.dec = dec
		}
		var err error
		if cap(rd.data) < int(h.GetRawLen()) {
			rd.data = make([]byte, 0, h.GetRawLen())
		}
		data, err = rd.dec.DecodeAll(payload, rd.data[:0])
		if cap(data) > cap(rd.data) {
			rd.data = data[:0]
		}
		if err != nil {
			return nil, fmt.Errorf("%w: zstd: %w", ErrCorrupt, err)
		}
	case pb.Compression_COMPRESSION_S2:
		// The block names its length first: it must be the header's,
		// which is bounded, before any memory is taken for it.
		n, err := s2.DecodedLen(payload)
		if err != nil || n != int(h.GetRawLen()) {
			return nil, fmt.Errorf("s2 block of %d bytes, header says %d: %w", n, h.GetRawLen(), ErrCorrupt)
		}
		if cap(rd.data) < n {
			rd.data = make([]byte, 0, n)
		}
		if data, err = s2.Decode(rd.data[:n], payload); err != nil {
			return nil, fmt.Errorf("%w: s2: %w", ErrCorrupt, err)
		}
	default:
		return nil, unsupported(h.GetCompression())
	}
	if uint32(len(data)) != h.GetRawLen() {
		return nil, fmt.Errorf("%d bytes, header says %d: %w", len(data), h.GetRawLen(), ErrCorrupt)
	}
	return data, nil
}

// finish checks the trailer against what was read, then the footer, and
// that nothing follows.
func (rd *Reader) finish(at uint64, digest, payload []byte) error {
	t := &pb.Trailer{}
	if err := gproto.Unmarshal(payload, t); err != nil {
		return fmt.Errorf("trailer: %w: %w", ErrCorrupt, err)
	}
	if !bytes.Equal(t.GetStreamSha256(), digest) {
		return fmt.Errorf("stream digest does not match the trailer's: %w", ErrCorrupt)
	}
	if len(t.GetFiles()) != len(rd.files) {
		return fmt.Errorf("trailer lists %d files, the stream has %d: %w", len(t.GetFiles()), len(rd.files), ErrCorrupt)
	}
	for n, missing := range rd.remaining {
		if missing {
			return fmt.Errorf("%q was named among the remaining files but never came: %w", n, ErrCorrupt)
		}
	}
	for i, fi := range t.GetFiles() {
		f := rd.files[i]
		// Kept chunks were not decoded: Archive.WriteTo checks their sum.
		sumOK := rd.keep != nil || bytes.Equal(fi.GetSha256(), f.sum.Sum(nil))
		if !f.ended || fi.GetName() != f.name || fi.GetSize() != f.size || fi.GetChunks() != f.chunks ||
			fi.GetFirstRecord() != f.start || !sumOK {
			return fmt.Errorf("file %q disagrees with the trailer's index: %w", f.name, ErrCorrupt)
		}
	}
	recLen := rd.off - at
	var foot [FooterSize]byte
	if err := rd.read(foot[:]); err != nil {
		return err
	}
	if string(foot[12:]) != FooterMagic || binary.LittleEndian.Uint64(foot[0:]) != at || uint64(binary.LittleEndian.Uint32(foot[8:])) != recLen {
		return fmt.Errorf("footer does not point at the trailer: %w", ErrCorrupt)
	}
	if _, err := rd.r.ReadByte(); !errors.Is(err, io.EOF) {
		return fmt.Errorf("data after the footer: %w", ErrCorrupt)
	}
	rd.trailer = t
	return nil
}

// ReadIndex reads only the manifest (at the start) and the trailer (found
// through the footer at the end) of a stream in a file, checking both
// records' checksums: enough to describe a checkpoint without reading it.
func ReadIndex(f io.ReaderAt) (*pb.Manifest, *pb.Trailer, error) {
	m, t, _, _, err := readIndex(f)
	return m, t, err
}

// readIndex is ReadIndex that also returns the trailer record's offset
// and the header's flags.
func readIndex(f io.ReaderAt) (*pb.Manifest, *pb.Trailer, uint64, uint16, error) {
	size, err := sizeOf(f)
	if err != nil {
		return nil, nil, 0, 0, err
	}
	rd, err := NewReader(io.NewSectionReader(f, 0, size))
	if err != nil {
		return nil, nil, 0, 0, err
	}
	defer rd.Close()
	if size < HeaderSize+FooterSize {
		return nil, nil, 0, 0, ErrTruncated
	}
	var foot [FooterSize]byte
	if _, err := f.ReadAt(foot[:], size-FooterSize); err != nil {
		return nil, nil, 0, 0, fmt.Errorf("reading footer: %w", err)
	}
	if string(foot[12:]) != FooterMagic {
		return nil, nil, 0, 0, fmt.Errorf("no footer (the stream may be truncated): %w", ErrTruncated)
	}
	at := binary.LittleEndian.Uint64(foot[0:])
	n := binary.LittleEndian.Uint32(foot[8:])
	if n > maxMetaLen+maxHeaderLen+frameSize || at+uint64(n)+FooterSize != uint64(size) {
		return nil, nil, 0, 0, fmt.Errorf("footer points outside the stream: %w", ErrCorrupt)
	}
	tr := &Reader{r: bufio.NewReader(io.NewSectionReader(f, int64(at), int64(n))), digest: sha256.New(), off: at}
	h, payload, err := tr.record()
	if err != nil {
		return nil, nil, 0, 0, err
	}
	if h.GetKind() != pb.RecordHeader_TRAILER {
		return nil, nil, 0, 0, fmt.Errorf("footer does not point at the trailer: %w", ErrCorrupt)
	}
	t := &pb.Trailer{}
	if err := gproto.Unmarshal(payload, t); err != nil {
		return nil, nil, 0, 0, fmt.Errorf("trailer: %w: %w", ErrCorrupt, err)
	}
	return rd.Manifest(), t, at, rd.flags, nil
}

func sizeOf(f io.ReaderAt) (int64, error) {
	type stater interface{ Stat() (os.FileInfo, error) }
	if s, ok := f.(stater); ok {
		st, err := s.Stat()
		if err != nil {
			return 0, err
		}
		return st.Size(), nil
	}
	if s, ok := f.(interface{ Size() int64 }); ok {
		return s.Size(), nil
	}
	return 0, errors.New("cannot tell the stream's size")
}
