package image

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"
	"math"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/klauspost/compress/s2"
	"github.com/klauspost/compress/zstd"
	gproto "google.golang.org/protobuf/proto"

	pb "github.com/ferry-cr/ferry/proto"
)

// WriterOptions says how to write. The zero value compresses with zstd's
// fastest level on every core in 4 MiB chunks.
//
// With either codec a chunk that does not shrink is stored raw (random
// data, already compressed data): readers then only check and copy it,
// and neither codec is even tried on a chunk that a sample says will not
// shrink (see probe); an S2 stream stores long runs in zstd (runChunk).
// Where both compress, S2 is about twice as fast as zstd's fastest
// level (text, here: 5.4 against 2.5 GB/s a core) for output a few
// percent larger, and is what ferry checkpoint writes by default; zstd
// decodes faster (6 against 1.5 GB/s a core on that text) and, at a
// level of choice, suits an archive that is kept.
type WriterOptions struct {
	// COMPRESSION_ZSTD (the default), COMPRESSION_S2 or COMPRESSION_NONE.
	Compression pb.Compression
	NoCompress  bool // shorthand for COMPRESSION_NONE
	Level       int  // zstd level 1 (fastest, default) to 4 (best)
	Concurrency int  // chunks compressed at once; default GOMAXPROCS
	ChunkSize   int  // raw bytes per chunk; default DefaultChunkSize
	// NoDigests writes the stream without SHA-256 (FlagNoDigests): every
	// record still carries its CRC-32C.
	NoDigests bool
	// Adaptive compresses a chunk only while compressing pays: while the
	// output (a link) takes bytes more slowly than the compressing
	// workers together produce them. A link faster than the codec then gets
	// raw chunks and costs no CPU on either side; a slow one gets them
	// compressed. Both rates are measured as the stream goes, and each
	// chunk records its own compression, so readers need nothing new.
	// Files of up to 64 KiB (most of a checkpoint's files but its
	// memory) always go raw: compressing them saves little on any link,
	// and in a fresh process the encoder's first uses cost page faults
	// worth more than that (tens of ms for a lazy checkpoint, which is
	// all downtime).
	Adaptive bool
	// Backlog is how many more records may wait for the output beyond
	// the few the compressing workers need (2 a worker): the writer then
	// takes what it is given, compressed, while the output is slower,
	// up to Backlog chunks held in memory. A checkpoint that leaves its
	// job running sets it, so that the job stands still only as long as
	// CRIU takes, not as long as a slow disk does.
	Backlog int
}

// Writer writes one image stream. Files may be written from several
// goroutines at once; records reach the stream in the order they were
// submitted, each chunk compressed in parallel with the others.
type Writer struct {
	out   io.Writer
	opts  WriterOptions
	enc   *zstd.Encoder // COMPRESSION_ZSTD
	runs  *zstd.Encoder // COMPRESSION_S2: for the chunks S2 shrinks most (see runChunk)
	s2out *bufList      // COMPRESSION_S2: buffers for compressed chunks
	queue chan *pending
	sem   chan struct{}
	done  chan error

	bufs    *bufList
	mu      sync.Mutex
	files   []*FileWriter
	closed  bool
	aborted bool // closed by Abort
	failed  error
	written uint64 // set by the writing goroutine only
	stored  uint64 // likewise
	raw     atomic.Uint64
	digest  hash.Hash
	outRate rate // bytes per second the output takes (Adaptive)
	zipRate rate // raw bytes per second one worker compresses (Adaptive)
}

// rate is a moving average of a throughput, safe for concurrent use.
type rate struct{ bits atomic.Uint64 }

func (r *rate) get() float64 { return math.Float64frombits(r.bits.Load()) }

// add folds in n bytes that took d.
func (r *rate) add(n int, d time.Duration) {
	if n <= 0 || d <= 0 {
		return
	}
	v := float64(n) / d.Seconds()
	for {
		old := r.bits.Load()
		avg := math.Float64frombits(old)
		if avg > 0 {
			avg += (v - avg) / 4
		} else {
			avg = v
		}
		if r.bits.CompareAndSwap(old, math.Float64bits(avg)) {
			return
		}
	}
}

// pending is one record on its way to the stream.
type pending struct {
	ready   chan struct{}
	record  []byte // frame and header (and payload, for small records)
	payload []byte // a chunk's payload, written after record, then recycled
	recycle func()
	err     error
	file    *FileWriter // for FILE records: where the file starts
	stored  uint64      // for CHUNK records: payload bytes
}

// NewWriter writes the header and the manifest to w and returns a Writer
// for the files.
func NewWriter(w io.Writer, m *pb.Manifest, opts WriterOptions) (*Writer, error) {
	if opts.NoCompress {
		opts.Compression = pb.Compression_COMPRESSION_NONE
	} else if opts.Compression == pb.Compression_COMPRESSION_NONE {
		opts.Compression = pb.Compression_COMPRESSION_ZSTD
	}
	if opts.Concurrency <= 0 {
		opts.Concurrency = runtime.GOMAXPROCS(0)
	}
	if opts.ChunkSize <= 0 {
		opts.ChunkSize = DefaultChunkSize
	}
	if opts.ChunkSize > maxChunkRaw {
		return nil, fmt.Errorf("chunk size %d over %d: %w", opts.ChunkSize, maxChunkRaw, ErrRecordTooLarge)
	}
	wr := &Writer{
		out:    w,
		opts:   opts,
		queue:  make(chan *pending, 2*opts.Concurrency+max(0, opts.Backlog)),
		sem:    make(chan struct{}, opts.Concurrency),
		done:   make(chan error, 1),
		digest: newDigest(opts.NoDigests),
		bufs:   chunkBufs,
	}
	if opts.ChunkSize != DefaultChunkSize {
		wr.bufs = newBufList(opts.ChunkSize, 2*opts.Concurrency+2)
	}
	if !knownCompression(opts.Compression) {
		return nil, fmt.Errorf("compression %d: %w", opts.Compression, ErrUnsupportedCompression)
	}
	if opts.Compression == pb.Compression_COMPRESSION_S2 {
		wr.s2out = s2Bufs
		if opts.ChunkSize != DefaultChunkSize {
			wr.s2out = newBufList(s2.MaxEncodedLen(opts.ChunkSize), 2*opts.Concurrency+2)
		}
		runs, err := encoder(zstd.SpeedFastest, opts.Concurrency)
		if err != nil {
			return nil, fmt.Errorf("zstd: %w", err)
		}
		wr.runs = runs
	}
	if opts.Compression == pb.Compression_COMPRESSION_ZSTD {
		level := zstd.SpeedFastest
		if opts.Level > 1 {
			level = zstd.EncoderLevelFromZstd(opts.Level)
		}
		enc, err := encoder(level, opts.Concurrency)
		if err != nil {
			return nil, fmt.Errorf("zstd: %w", err)
		}
		wr.enc = enc
	}
	var hdr [HeaderSize]byte
	copy(hdr[:], Magic)
	binary.LittleEndian.PutUint16(hdr[8:], Version)
	var flags uint16
	if opts.NoDigests {
		flags |= FlagNoDigests
	}
	binary.LittleEndian.PutUint16(hdr[10:], flags)
	if err := wr.emit(hdr[:]); err != nil {
		return nil, err
	}
	payload, err := gproto.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("encoding manifest: %w", err)
	}
	if len(payload) > maxMetaLen {
		return nil, fmt.Errorf("manifest of %d bytes: %w", len(payload), ErrRecordTooLarge)
	}
	rec, err := frame(&pb.RecordHeader{Kind: pb.RecordHeader_MANIFEST}, payload)
	if err != nil {
		return nil, err
	}
	if err := wr.emit(rec); err != nil {
		return nil, err
	}
	go wr.drain()
	return wr, nil
}

// emit writes b, counting and hashing it.
func (wr *Writer) emit(b []byte) error {
	_, err := wr.emitTimed(b)
	return err
}

// emitTimed is emit that also says how long the output took.
func (wr *Writer) emitTimed(b []byte) (time.Duration, error) {
	t := time.Now()
	if _, err := wr.out.Write(b); err != nil {
		return 0, fmt.Errorf("writing image: %w", err)
	}
	took := time.Since(t)
	wr.digest.Write(b)
	wr.written += uint64(len(b))
	return took, nil
}

// drain writes records in submission order as they become ready.
//
// Small records (a file's start and end, a small file's one chunk) are
// gathered and written together whenever drain would otherwise wait: a
// checkpoint has dozens of files of a few KiB, and one write per record
// costs a system call, and on a migration link a message and a wake-up
// of the receiver, each. Nothing gathered waits for more: the gathered
// bytes go out before drain waits for a record or for the queue.
func (wr *Writer) drain() {
	var err error
	// The output's rate is sampled over several payloads: one small (well
	// compressed) payload alone would time mostly the call's overhead.
	const sampleBytes, samplePayloads = 256 << 10, 8
	var sampled, payloads int
	var took time.Duration
	gathered := make([]byte, 0, gatherMax)
	flush := func() {
		if len(gathered) > 0 && err == nil {
			_, err = wr.emitTimed(gathered)
		}
		gathered = gathered[:0]
	}
	for {
		var p *pending
		var ok bool
		select {
		case p, ok = <-wr.queue:
		default:
			flush()
			p, ok = <-wr.queue
		}
		if !ok {
			break
		}
		select {
		case <-p.ready:
		default:
			flush()
			<-p.ready
		}
		if err != nil {
			continue // keep receiving so submitters never block
		}
		if p.err != nil {
			err = p.err
			continue
		}
		if p.file != nil {
			p.file.firstRecord = wr.written + uint64(len(gathered))
		}
		wr.stored += p.stored
		if n := len(p.record) + len(p.payload); n <= gatherMax/2 {
			if len(gathered)+n > gatherMax {
				flush()
			}
			gathered = append(append(gathered, p.record...), p.payload...)
		} else {
			flush()
			if err == nil {
				err = wr.emit(p.record)
			}
			if err == nil && len(p.payload) > 0 {
				var d time.Duration
				d, err = wr.emitTimed(p.payload)
				sampled, took, payloads = sampled+len(p.payload), took+d, payloads+1
				if sampled >= sampleBytes || payloads >= samplePayloads {
					wr.outRate.add(sampled, took)
					sampled, took, payloads = 0, 0, 0
				}
			}
		}
		if p.recycle != nil {
			p.recycle()
		}
	}
	flush()
	wr.done <- err
}

// gatherMax is the most drain gathers before writing; records of up to
// half of it are gathered.
const gatherMax = 64 << 10

// submit queues a record; work, if any, runs concurrently and fills it.
func (wr *Writer) submit(p *pending, work func(*pending)) error {
	wr.mu.Lock()
	defer wr.mu.Unlock()
	if wr.closed {
		return errors.New("image writer is closed")
	}
	if wr.failed != nil {
		return wr.failed
	}
	wr.queue <- p
	if work == nil {
		close(p.ready)
		return nil
	}
	wr.sem <- struct{}{}
	go func() {
		defer func() { <-wr.sem }()
		work(p)
		close(p.ready)
	}()
	return nil
}

// frameHead encodes a record's frame and header for payload, which the
// caller writes right after it.
func frameHead(h *pb.RecordHeader, payload []byte) ([]byte, error) {
	h.PayloadLen = uint32(len(payload))
	if len(payload) > 0 {
		h.PayloadCrc32C = crc(payload)
	}
	hb, err := gproto.Marshal(h)
	if err != nil {
		return nil, fmt.Errorf("encoding record header: %w", err)
	}
	rec := make([]byte, frameSize, frameSize+len(hb))
	binary.LittleEndian.PutUint32(rec[0:], uint32(len(hb)))
	binary.LittleEndian.PutUint32(rec[4:], crc(hb))
	return append(rec, hb...), nil
}

// frame encodes one whole record: frameHead followed by the payload.
func frame(h *pb.RecordHeader, payload []byte) ([]byte, error) {
	head, err := frameHead(h, payload)
	if err != nil {
		return nil, err
	}
	return append(head, payload...), nil
}

// FileWriter writes one file of the image; it is an io.WriteCloser.
type FileWriter struct {
	wr          *Writer
	index       uint32
	name        string
	buf         []byte
	size        uint64
	chunks      uint32
	sum         hash.Hash
	closed      bool
	firstRecord uint64
	storedBytes atomic.Uint64
	mu          sync.Mutex
}

// Create starts a file named name.
func (wr *Writer) Create(name string) (*FileWriter, error) {
	wr.mu.Lock()
	n := len(wr.files)
	wr.mu.Unlock()
	if n >= maxFiles {
		return nil, fmt.Errorf("more than %d files: %w", maxFiles, ErrRecordTooLarge)
	}
	fw := &FileWriter{wr: wr, name: name, sum: newDigest(wr.opts.NoDigests)}
	wr.mu.Lock()
	fw.index = uint32(len(wr.files))
	wr.files = append(wr.files, fw)
	wr.mu.Unlock()
	rec, err := frame(&pb.RecordHeader{Kind: pb.RecordHeader_FILE, File: fw.index, Name: name}, nil)
	if err != nil {
		return nil, err
	}
	return fw, wr.submit(&pending{ready: make(chan struct{}), record: rec, file: fw}, nil)
}

// Write buffers p and submits every full chunk.
func (fw *FileWriter) Write(p []byte) (int, error) {
	fw.mu.Lock()
	defer fw.mu.Unlock()
	if fw.closed {
		return 0, fmt.Errorf("image file %q is closed", fw.name)
	}
	n := len(p)
	cs := fw.wr.opts.ChunkSize
	for len(p) > 0 {
		fw.room()
		take := min(cap(fw.buf)-len(fw.buf), len(p))
		fw.buf = append(fw.buf, p[:take]...)
		p = p[take:]
		if len(fw.buf) == cs {
			if err := fw.flush(false); err != nil {
				return n - len(p), err
			}
		}
	}
	return n, nil
}

// ReadFrom lets io.Copy read straight into chunk buffers.
func (fw *FileWriter) ReadFrom(r io.Reader) (int64, error) {
	fw.mu.Lock()
	defer fw.mu.Unlock()
	if fw.closed {
		return 0, fmt.Errorf("image file %q is closed", fw.name)
	}
	cs := fw.wr.opts.ChunkSize
	var total int64
	for {
		fw.room()
		k, err := r.Read(fw.buf[len(fw.buf):cap(fw.buf)])
		fw.buf = fw.buf[:len(fw.buf)+k]
		total += int64(k)
		if len(fw.buf) == cs {
			if ferr := fw.flush(false); ferr != nil {
				return total, ferr
			}
		}
		if errors.Is(err, io.EOF) {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
}

// room makes sure fw.buf has room for more bytes of the current chunk.
// A file's first chunk starts in a small buffer and moves to a full one
// only if it outgrows it: most of a checkpoint's files are a few KiB, and
// a full chunk buffer, fresh, is megabytes that must be faulted in (a
// process that packs a small lazy checkpoint would spend more time on
// that than on the data).
func (fw *FileWriter) room() {
	switch {
	case fw.buf == nil && fw.chunks == 0 && fw.wr.opts.ChunkSize > smallChunk:
		fw.buf = smallBufs.get()
	case fw.buf == nil:
		fw.buf = fw.wr.getBuf()
	case len(fw.buf) == cap(fw.buf):
		// A small first buffer, full: the file is larger.
		full := append(fw.wr.getBuf(), fw.buf...)
		smallBufs.put(fw.buf)
		fw.buf = full
	}
}

// getBuf and putBuf recycle chunk buffers: a checkpoint moves gigabytes
// through a handful of them. putBuf also takes the small buffers files
// start in (see room), and getOut returns a buffer for compressing n
// bytes.
func (wr *Writer) getBuf() []byte { return wr.bufs.get() }

func (wr *Writer) putBuf(b []byte) {
	if cap(b) == smallChunk && wr.opts.ChunkSize != smallChunk {
		smallBufs.put(b)
		return
	}
	wr.bufs.put(b)
}

// getOut returns a buffer for the compressed form of n raw bytes, and
// the list it goes back to.
func (wr *Writer) getOut(n int) ([]byte, *bufList) {
	small := n <= smallChunk && wr.opts.ChunkSize > smallChunk
	switch {
	case wr.s2out != nil && small:
		return s2SmallBufs.get(), s2SmallBufs
	case wr.s2out != nil:
		// S2 needs room for its worst case (s2.MaxEncodedLen), a few bytes
		// over the chunk, or it allocates.
		return wr.s2out.get(), wr.s2out
	case small:
		// zstd grows it should the output exceed it (put then drops it).
		return smallBufs.get(), smallBufs
	}
	return wr.getBuf(), wr.bufs
}

// newDigest is SHA-256, or nothing for a stream without digests.
func newDigest(none bool) hash.Hash {
	if none {
		return nopHash{}
	}
	return sha256.New()
}

// flush submits the buffered bytes as one chunk; last says the file
// ends with it.
func (fw *FileWriter) flush(last bool) error {
	if len(fw.buf) == 0 {
		return nil
	}
	// A small file, whole in this one chunk (see WriterOptions.Adaptive).
	small := last && fw.chunks == 0 && len(fw.buf) <= smallChunk
	data := fw.buf
	fw.buf = nil
	fw.sum.Write(data)
	offset := fw.size
	fw.size += uint64(len(data))
	fw.chunks++
	fw.wr.raw.Add(uint64(len(data)))
	wr := fw.wr
	return wr.submit(&pending{ready: make(chan struct{})}, func(p *pending) {
		h := &pb.RecordHeader{Kind: pb.RecordHeader_CHUNK, File: fw.index, Offset: offset, RawLen: uint32(len(data)), Compression: wr.opts.Compression}
		payload := data
		p.recycle = func() { wr.putBuf(data) }
		codec := wr.opts.Compression != pb.Compression_COMPRESSION_NONE
		if codec && wr.opts.Adaptive && (small || !wr.compressing()) {
			h.Compression = pb.Compression_COMPRESSION_NONE
		} else if codec {
			out, list := wr.getOut(len(data))
			t := time.Now()
			var enc []byte
			switch {
			case wr.enc == nil:
				// S2, but neither on what a sample says will not shrink
				// (stored raw below, S2 spared) nor, where it can, on long
				// runs (zstd's: see runChunk).
				kind := probe(data)
				if kind != sampledRandom {
					if kind != sampledRuns || !wr.runsInZstd() {
						enc = s2.Encode(out, data)
					}
					if z, zlist := wr.runChunk(data, enc); z != nil {
						list.put(out)
						enc, out, list = z, z, zlist
						h.Compression = pb.Compression_COMPRESSION_ZSTD
					} else if enc == nil {
						enc = s2.Encode(out, data) // zstd did not shrink it
					}
				} else {
					enc = data
				}
			case incompressible(data):
				enc = data // stored raw below, zstd spared
			default:
				enc = wr.enc.EncodeAll(data, out)
			}
			wr.zipRate.add(len(data), time.Since(t))
			if len(enc) < len(data) {
				payload = enc
				wr.putBuf(data) // done with the raw bytes
				p.recycle = func() { list.put(out) }
			} else {
				// Incompressible (random) data is stored as it is.
				h.Compression = pb.Compression_COMPRESSION_NONE
				list.put(out)
			}
		}
		p.stored = uint64(len(payload))
		fw.storedBytes.Add(uint64(len(payload)))
		p.payload = payload
		p.record, p.err = frameHead(h, payload)
	})
}

// runChunk re-encodes with zstd a chunk that S2 shrank to less than
// 1/runRatio of its size (s2enc), and returns that and the list its
// buffer goes back to; nil where S2's block stands. Such chunks are long
// runs (zero pages, repeated text), which S2 encodes at memory speed but
// decodes slowly, a byte or so at a time along each overlapping copy:
// about 0.35 GB/s a core for zeros and 0.75 for the bench's text, here,
// where zstd decodes either at 2.4 GB/s and encodes it at about 3 GB/s.
// A restore reads every byte at CRIU's pace, so it gains several times
// what the checkpoint pays. Small chunks keep S2 (zstd's fixed cost).
// An Adaptive S2 stream does the same with the chunks it compresses.
//
// s2enc nil means S2 was not tried: a sample said the chunk is runs
// (probe).
func (wr *Writer) runChunk(data, s2enc []byte) ([]byte, *bufList) {
	if !wr.runsInZstd() || len(data) <= smallChunk || s2enc != nil && len(s2enc) >= len(data)/runRatio {
		return nil, nil
	}
	z := wr.runs.EncodeAll(data, smallBufs.get())
	if len(z) >= len(data) {
		smallBufs.put(z)
		return nil, nil
	}
	return z, smallBufs // a z grown past a small buffer is left to the collector
}

// runsInZstd says whether this writer stores long runs in zstd: an S2
// one, Adaptive or not (an Adaptive one, while it compresses).
func (wr *Writer) runsInZstd() bool { return wr.runs != nil }

// runRatio: a chunk S2 shrinks more than this many times is zstd's (runChunk).
const runRatio = 16

// compressing says whether the next chunk should be compressed
// (Adaptive): while the rates are unknown, yes (the link may be slow);
// then only while the workers together compress faster than the output
// takes bytes. Were the output the faster, compressing would make the
// workers the bottleneck; raw chunks go at the output's pace.
func (wr *Writer) compressing() bool {
	out, zip := wr.outRate.get(), wr.zipRate.get()
	if out == 0 || zip == 0 {
		return true
	}
	return zip*float64(wr.opts.Concurrency) > out
}

// Abort ends the writer without a trailer: what it wrote stays an
// incomplete stream, which every reader refuses. For a stream already
// on its way whose writing failed elsewhere. Open files are abandoned.
func (wr *Writer) Abort() {
	wr.mu.Lock()
	if wr.closed {
		wr.mu.Unlock()
		return
	}
	wr.closed, wr.aborted = true, true
	wr.mu.Unlock()
	close(wr.queue)
	<-wr.done
}

var errAborted = errors.New("image writer was aborted: the stream is incomplete")

// Close submits the last chunk and the file's end.
func (fw *FileWriter) Close() error {
	fw.mu.Lock()
	defer fw.mu.Unlock()
	if fw.closed {
		return nil
	}
	if err := fw.flush(true); err != nil {
		return err
	}
	fw.closed = true
	rec, err := frame(&pb.RecordHeader{Kind: pb.RecordHeader_FILE_END, File: fw.index, Offset: fw.size}, nil)
	if err != nil {
		return err
	}
	return fw.wr.submit(&pending{ready: make(chan struct{}), record: rec}, nil)
}

// Remaining records that the files named are the only ones still to
// come (a REMAINING record, after every record submitted so far): a
// reader that gets it may start on the files it has (StreamArchive).
// Every file created so far must be closed, and each name must be
// created after it, once. sizes, when not nil, gives each file's size,
// in the order of names: each must then have exactly that size.
func (wr *Writer) Remaining(names []string, sizes []uint64) error {
	if sizes != nil && len(sizes) != len(names) {
		return fmt.Errorf("%d sizes for %d remaining files", len(sizes), len(names))
	}
	wr.mu.Lock()
	for _, fw := range wr.files {
		fw.mu.Lock()
		closed := fw.closed
		fw.mu.Unlock()
		if !closed {
			wr.mu.Unlock()
			return fmt.Errorf("image file %q is still open: every file must end before the remaining ones are named", fw.name)
		}
	}
	wr.mu.Unlock()
	payload, err := gproto.Marshal(&pb.Remaining{Names: names, Sizes: sizes})
	if err != nil {
		return fmt.Errorf("encoding remaining files: %w", err)
	}
	if len(payload) > maxMetaLen {
		return fmt.Errorf("remaining files' list of %d bytes: %w", len(payload), ErrRecordTooLarge)
	}
	rec, err := frame(&pb.RecordHeader{Kind: pb.RecordHeader_REMAINING}, payload)
	if err != nil {
		return err
	}
	return wr.submit(&pending{ready: make(chan struct{}), record: rec}, nil)
}

// RawBytes is the total of the files' bytes; valid after Close.
func (wr *Writer) RawBytes() uint64 { return wr.raw.Load() }

// StoredBytes is what the chunks' payloads take in the stream; valid
// after Close.
func (wr *Writer) StoredBytes() uint64 { return wr.stored }

// Close waits for every record, then writes the trailer and the footer.
// Every file must have been closed. The stream is complete only when
// Close returns nil.
func (wr *Writer) Close() error { return wr.CloseWith(nil) }

// CloseWith is Close that also records final, the manifest as it stands
// at the end, in the trailer.
func (wr *Writer) CloseWith(final *pb.Manifest) error {
	wr.mu.Lock()
	if wr.closed {
		wr.mu.Unlock()
		if wr.aborted {
			return errAborted
		}
		return nil
	}
	wr.closed = true
	files := append([]*FileWriter(nil), wr.files...)
	wr.mu.Unlock()
	close(wr.queue)
	err := <-wr.done
	if err != nil {
		return err
	}
	t := &pb.Trailer{RawBytes: wr.raw.Load(), StoredBytes: wr.stored, StreamSha256: wr.digest.Sum(nil), FinalManifest: final}
	for _, fw := range files {
		if !fw.closed {
			return fmt.Errorf("image file %q was not closed", fw.name)
		}
		t.Files = append(t.Files, &pb.FileIndex{
			File: fw.index, Name: fw.name, Size: fw.size, Stored: fw.storedBytes.Load(),
			Chunks: fw.chunks, FirstRecord: fw.firstRecord, Sha256: fw.sum.Sum(nil),
		})
	}
	payload, err := gproto.Marshal(t)
	if err != nil {
		return fmt.Errorf("encoding trailer: %w", err)
	}
	if len(payload) > maxMetaLen {
		return fmt.Errorf("trailer of %d bytes: %w", len(payload), ErrRecordTooLarge)
	}
	rec, err := frame(&pb.RecordHeader{Kind: pb.RecordHeader_TRAILER}, payload)
	if err != nil {
		return err
	}
	at := wr.written
	if err := wr.emit(rec); err != nil {
		return err
	}
	var foot [FooterSize]byte
	binary.LittleEndian.PutUint64(foot[0:], at)
	binary.LittleEndian.PutUint32(foot[8:], uint32(len(rec)))
	copy(foot[12:], FooterMagic)
	return wr.emit(foot[:])
}

// incompressible guesses, from a sample, that zstd would not shrink data
// (random bytes, or bytes compressed already) so that it can be stored
// raw without paying zstd's full pass over it, which on such data costs
// as much as on text (about 1 GB/s a core here) for nothing. The sample
// is probeSamples pieces spread over the chunk, each tried with S2 (tens
// of microseconds in all); the data counts as incompressible when S2
// saves less than 1/64 of them. Small chunks are always tried.
func incompressible(data []byte) bool { return probe(data) == sampledRandom }

// What probe says of a chunk from its sample.
const (
	sampledMixed  = iota // neither below (or too small to sample)
	sampledRandom        // S2 saves less than 1/64 of the sample
	sampledRuns          // S2 leaves less than 1/runRatio of it
)

// probe tries S2 on probeSamples pieces spread over data (tens of
// microseconds in all) and says which kind of data it holds (see
// incompressible and runChunk). Chunks under 1 MiB are not sampled.
func probe(data []byte) int {
	if len(data) < 16*probePiece*probeSamples {
		return sampledMixed
	}
	var out [probePiece + 64]byte // over s2.MaxEncodedLen(probePiece)
	stride := len(data) / probeSamples
	saved := 0
	for i := range probeSamples {
		piece := data[i*stride : i*stride+probePiece]
		saved += len(piece) - len(s2.Encode(out[:0], piece))
	}
	switch total := probeSamples * probePiece; {
	case saved < total/64:
		return sampledRandom
	case total-saved < total/runRatio:
		return sampledRuns
	}
	return sampledMixed
}

const probePiece, probeSamples = 4 << 10, 16
