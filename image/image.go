// Package image is ferry's checkpoint format: one self-describing stream
// that can be written and read strictly front to back (a pipe, a socket)
// and still be checked byte for byte.
//
// Byte layout:
//
//	+-----------------------------------------------------------------+
//	| header, 16 bytes                                                |
//	|   magic "FERRYIMG" | u16 LE version | u16 LE flags | u32 zero   |
//	|   (flag 1: no SHA-256 digests, CRC-32C only; see FlagNoDigests) |
//	+-----------------------------------------------------------------+
//	| record: MANIFEST  (pb.Manifest: ferry/CRIU versions, kernel,    |
//	|                    host, CPU, job, CRIU's options; the walk     |
//	|                    (Inventory), the plan (Plan), the snapshot   |
//	|                    policy (Periodic) as messages)               |
//	| record: FILE      (file 0 is "inventory.img")                   |
//	| record: CHUNK     (file 0, offset 0, s2, zstd or raw payload)   |
//	| record: FILE      (file 1 is "pages-1.img")                     |
//	| record: CHUNK     (file 1, ...)   files may interleave, as CRIU |
//	| record: CHUNK     (file 0, ...)   writes several at once        |
//	| record: FILE_END  (file 0, size)                                |
//	| ...                                                             |
//	| record: REMAINING (optional, once: every file so far has ended; |
//	|                    only the files it names follow, each of the  |
//	|                    size it gives when it gives sizes; a         |
//	|                    migration names CRIU's pages files, and its  |
//	|                    restore starts here, see StreamArchive)      |
//	| record: FILE, CHUNK..., FILE_END of each remaining file         |
//	| record: TRAILER   (index: file -> size, chunks, SHA-256;        |
//	|                    SHA-256 of every byte before this record;    |
//	|                    the manifest as it stands once CRIU is done: |
//	|                    counts, CRIU's statistics, files)            |
//	+-----------------------------------------------------------------+
//	| footer, 20 bytes                                                |
//	|   u64 LE offset of the TRAILER record | u32 LE its length |     |
//	|   magic "FERRYEND"                                              |
//	+-----------------------------------------------------------------+
//
//	record := u32 LE n | u32 LE CRC-32C of the next n bytes |
//	          RecordHeader (protobuf, n bytes) | payload (payload_len bytes)
//
// The manifest is one message (proto/image.proto), the same a checkpoint
// directory keeps as ferry.json. Streams written before the walk, the plan
// and CRIU's statistics were messages carry them as JSON in its deprecated
// *_json fields; internal/checkpoint.FromRecord reads those.
//
// The RecordHeader (proto/image.proto) carries the kind, the file index,
// the offset and raw length of a chunk, its compression and the CRC-32C of
// its stored payload. Each chunk (up to 4 MiB of raw data by default) is
// compressed on its own, so writers and readers use every core, and
// records its own codec:
//
//	compression 0 NONE  payload is the raw bytes (payload_len = raw_len);
//	                    what a writer stores for a chunk that did not shrink
//	compression 1 ZSTD  payload is one zstd frame (any level)
//	compression 2 S2    payload is one S2 block: uvarint raw length, then
//	                    S2's literals and copies (klauspost/compress/s2)
//
// A stream may mix them. Streams written before S2 existed hold only 0
// and 1 and read as they always did; a reader meeting a codec it does not
// know refuses the stream (ErrUnsupportedCompression), and decodes into
// no more than the chunk's raw_len, itself at most 64 MiB, whatever the
// payload claims.
//
// What is detected, before any of it is used: a wrong magic or unknown
// version (ErrUnsupportedVersion) or flags; a length over its named limit
// (ErrRecordTooLarge); a flipped bit in any header, payload, trailer or
// footer (ErrCorrupt); a stream that ends early, at a record boundary or
// inside one (ErrTruncated); chunks out of order or overlapping; files
// whose size or SHA-256 disagree with the trailer (SHA-256 unless the
// stream was written with FlagNoDigests).
package image

import (
	"errors"
	"fmt"
	"hash/crc32"

	pb "github.com/ferry-cr/ferry/proto"
)

// Format constants.
const (
	Magic         = "FERRYIMG"
	FooterMagic   = "FERRYEND"
	Version       = 1
	HeaderSize    = 16
	FooterSize    = 20
	frameSize     = 8 // record length + CRC-32C
	flagsKnown    = FlagNoDigests
	maxHeaderLen  = 64 << 10 // a RecordHeader is tens of bytes
	maxChunkRaw   = 64 << 20 // raw bytes in one chunk
	maxPayloadLen = maxChunkRaw + maxChunkRaw/64 + 1<<16
	maxMetaLen    = 64 << 20 // manifest and trailer payloads
	maxFiles      = 1 << 20
	// DefaultChunkSize is the raw size of a chunk: large enough for zstd
	// to work well and to keep the records' cost negligible, small enough
	// to keep memory bounded (Concurrency chunks in flight).
	DefaultChunkSize = 4 << 20
)

// FlagNoDigests (header flags) marks a stream written without SHA-256:
// its trailer holds no file or stream digests, and every header and
// payload is checked by its CRC-32C alone, besides the structure
// (offsets, sizes, chunk counts, the index and the footer).
//
// It is how ferry writes streams by default (WriterOptions.NoDigests;
// `ferry checkpoint --digests` asks for SHA-256). Per-file SHA-256 over
// every raw byte, plus the stream's over every stored byte, took more
// CPU than compressing them with S2 (55-65% of a checkpoint's and of a
// restore's, measured here), and bought little: a digest kept in the
// same file detects no tampering (whoever rewrites a chunk rewrites the
// trailer too), and against accidental damage a CRC-32C over each chunk
// of at most 4 MiB and each header already detects every burst of up to
// 32 bits and all but one in 2^32 of the rest. Where identity matters it
// is recorded apart: the init binary's SHA-256 in the manifest, and the
// snapshot store's chunks, named by their SHA-256. A migration's stream
// never had digests: a digest computed by the sender proves nothing
// against a sender that lies. Streams with digests (earlier ferry, or
// --digests) are checked against them as before.
const FlagNoDigests = 1 << 0

// Errors a reader tells apart with errors.Is.
var (
	ErrBadMagic           = errors.New("not a ferry image (bad magic)")
	ErrUnsupportedVersion = errors.New("unsupported ferry image version")
	ErrTruncated          = errors.New("ferry image is truncated")
	ErrCorrupt            = errors.New("ferry image is corrupt")
	ErrRecordTooLarge     = errors.New("ferry image record exceeds its size limit")
	// ErrUnsupportedCompression is a chunk in a codec this ferry does not
	// know (a newer ferry wrote it); it is also ErrUnsupportedVersion.
	ErrUnsupportedCompression = fmt.Errorf("unsupported compression in ferry image: %w", ErrUnsupportedVersion)
)

// knownCompression says whether this ferry decodes chunks in c.
func knownCompression(c pb.Compression) bool {
	switch c {
	case pb.Compression_COMPRESSION_NONE, pb.Compression_COMPRESSION_ZSTD, pb.Compression_COMPRESSION_S2:
		return true
	}
	return false
}

// unsupported is the error for a chunk in codec c.
func unsupported(c pb.Compression) error {
	return fmt.Errorf("chunk compressed with codec %d: %w", int32(c), ErrUnsupportedCompression)
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func crc(b []byte) uint32 { return crc32.Checksum(b, castagnoli) }
