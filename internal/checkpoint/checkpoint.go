// Package checkpoint describes a checkpoint as it sits on disk until the
// image-stream format replaces it: a directory with CRIU's image files and
// ferry's manifest beside them.
//
//	<checkpoint>/       0700
//	  ferry.json        Manifest (proto/image.proto) as protojson: what was
//	                    dumped, how, and from where (format 2; 1 is read too)
//	  *.img             CRIU's images, untouched
//	  dump.log          CRIU's log of the dump
//	  stats-dump        CRIU's dump statistics
package checkpoint

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/checkpoint-restore/go-criu/v7/stats"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	pb "github.com/ferry-cr/ferry/proto"
)

// FormatVersion is the version of a directory's manifest this ferry
// writes: 2, the proto message as protojson. It reads 1 too (ferry.json
// as ferry's own Go struct wrote it, before the manifest was a message).
const FormatVersion = 2

// formatV1 is ferry.json before the manifest was a proto message.
const formatV1 = 1

// ManifestFile is the manifest's name inside a checkpoint directory.
const ManifestFile = "ferry.json"

// maxManifestSize bounds what Load reads.
const maxManifestSize = 16 << 20

// Errors a reader tells apart with errors.Is.
var (
	ErrNotCheckpoint      = errors.New("not a ferry checkpoint")
	ErrUnsupportedVersion = errors.New("checkpoint format version not supported")
	ErrIncomplete         = errors.New("checkpoint is incomplete")
)

// Manifest is ferry's description of a checkpoint: the message a stream
// carries as its first record and a directory as ferry.json (see
// proto/image.proto for what each field means). The functions below are
// what ferry does with one; there is no other copy of its fields.
type (
	Manifest   = pb.Manifest
	Periodic   = pb.Periodic
	Executable = pb.Executable
)

// PidNSKey names the tree's PID namespace when it was dumped as external.
const PidNSKey = "extRootPidNS"

// OutputPipes lists the inherit-fd keys of the pipes that carried the
// tree's stdout and stderr: restore gives each the job's fresh log pipe.
func OutputPipes(m *Manifest) []string {
	var keys []string
	for _, k := range []string{m.GetOutputPipe(), m.GetErrorPipe()} {
		if k != "" && (len(keys) == 0 || keys[0] != k) {
			keys = append(keys, k)
		}
	}
	return keys
}

// Created is when the checkpoint was taken.
func Created(m *Manifest) time.Time { return time.Unix(0, m.GetCreatedUnixNano()).UTC() }

// Every is the periodic policy's interval.
func Every(p *Periodic) time.Duration { return time.Duration(p.GetEveryNs()) }

// ErrExecutableChanged means a binary the checkpoint needs at restore is
// missing or is not the one the checkpoint was taken with.
var ErrExecutableChanged = errors.New("executable missing or changed since the checkpoint")

// Identify reads path's size and SHA-256.
func Identify(path string) (*Executable, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", path, err)
	}
	return &Executable{Path: path, Size: n, Sha256: hex.EncodeToString(h.Sum(nil))}, nil
}

// CheckExecutable verifies that the binary at e's path is still the one
// recorded.
func CheckExecutable(e *Executable) error {
	now, err := Identify(e.GetPath())
	if err != nil {
		return fmt.Errorf("%s: %w (%w)", e.GetPath(), ErrExecutableChanged, err)
	}
	if now.Size != e.GetSize() || now.Sha256 != e.GetSha256() {
		return fmt.Errorf("%s: %w: it is another build now (the checkpoint needs sha256 %.12s, found %.12s); keep the ferry binary a checkpoint was taken with at its path", e.GetPath(), ErrExecutableChanged, e.GetSha256(), now.Sha256)
	}
	return nil
}

// Load reads and validates the manifest of the checkpoint in dir, and
// checks that every file it lists is present with its recorded size.
func Load(dir string) (*Manifest, error) {
	m, err := LoadManifest(dir)
	if err != nil {
		return nil, err
	}
	if len(m.GetFiles()) == 0 {
		return nil, fmt.Errorf("%q: manifest lists no image files: %w", dir, ErrIncomplete)
	}
	for name, size := range m.Files {
		st, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			return nil, fmt.Errorf("%q: %s: %w", dir, name, ErrIncomplete)
		}
		if st.Size() != size {
			return nil, fmt.Errorf("%q: %s has %d bytes, manifest says %d: %w", dir, name, st.Size(), size, ErrIncomplete)
		}
	}
	return m, nil
}

// WriteHead writes m, less its list of files, as dir's manifest: for a
// restore that starts from a stream's first record, before its images
// have come (LoadManifest reads it; Load would find it incomplete).
func WriteHead(dir string, m *Manifest) error {
	head := proto.CloneOf(m)
	head.Files = nil
	data, err := Encode(head)
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, ManifestFile), data, 0o600)
}

// LoadManifest is Load without looking for the image files: for a
// directory whose images are streamed to CRIU from elsewhere.
func LoadManifest(dir string) (*Manifest, error) {
	f, err := os.Open(filepath.Join(dir, ManifestFile))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("%q: %w (no %s)", dir, ErrNotCheckpoint, ManifestFile)
		}
		return nil, fmt.Errorf("reading checkpoint %q: %w", dir, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if st.Size() > maxManifestSize {
		return nil, fmt.Errorf("%q: manifest of %d bytes exceeds %d: %w", dir, st.Size(), maxManifestSize, ErrNotCheckpoint)
	}
	return DecodeManifest(f, fmt.Sprintf("%q", dir))
}

// Encode is m as a directory's ferry.json: protojson, the message's own
// JSON form, which any protobuf library reads back (a binary manifest
// would save nothing worth having on a file this small, and ferry.json
// has always been readable beside CRIU's images), with Format set to the
// version this ferry writes.
func Encode(m *Manifest) ([]byte, error) {
	m.Format = FormatVersion
	data, err := protojson.MarshalOptions{Multiline: true, Indent: "  "}.Marshal(m)
	if err != nil {
		return nil, err
	}
	return append(data, '\n'), nil
}

// DecodeManifest reads and checks a manifest (ferry.json) from r, of
// either format; where names it in errors.
func DecodeManifest(r io.Reader, where string) (*Manifest, error) {
	data, err := io.ReadAll(io.LimitReader(r, maxManifestSize))
	if err != nil {
		return nil, fmt.Errorf("%s: manifest: %w", where, err)
	}
	var head struct {
		Format int `json:"format"`
	}
	if err := json.Unmarshal(data, &head); err != nil {
		return nil, fmt.Errorf("%s: manifest: %w: %w", where, ErrNotCheckpoint, err)
	}
	m := &Manifest{}
	switch head.Format {
	case FormatVersion:
		err = protojson.UnmarshalOptions{DiscardUnknown: true}.Unmarshal(data, m)
	case formatV1:
		m, err = decodeV1(data)
	default:
		return nil, fmt.Errorf("%s has format %d, this ferry reads %d and %d: %w", where, head.Format, formatV1, FormatVersion, ErrUnsupportedVersion)
	}
	if err != nil {
		return nil, fmt.Errorf("%s: manifest: %w: %w", where, ErrNotCheckpoint, err)
	}
	for name, size := range m.GetFiles() {
		if name != filepath.Base(name) || size < 0 {
			return nil, fmt.Errorf("%s: file %q of %d bytes in manifest: %w", where, name, size, ErrNotCheckpoint)
		}
	}
	return m, nil
}

// decodeV1 reads a format 1 ferry.json. Its names are the message's JSON
// names (they were chosen to be), so protojson reads it but for two
// values whose JSON types differ: created, a time (now nanoseconds), and
// criuStats, go-criu's DumpStatsEntry as encoding/json wrote it (now the
// entry's protobuf encoding).
func decodeV1(data []byte) (*Manifest, error) {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(data, &fields); err != nil {
		return nil, err
	}
	var created time.Time
	if raw, ok := fields["created"]; ok {
		if err := json.Unmarshal(raw, &created); err != nil {
			return nil, fmt.Errorf("created: %w", err)
		}
	}
	st, err := legacyStats(fields["criuStats"])
	if err != nil {
		return nil, err
	}
	delete(fields, "created")
	delete(fields, "criuStats")
	rest, err := json.Marshal(fields)
	if err != nil {
		return nil, err
	}
	m := &Manifest{}
	if err := (protojson.UnmarshalOptions{DiscardUnknown: true}).Unmarshal(rest, m); err != nil {
		return nil, err
	}
	if !created.IsZero() {
		m.CreatedUnixNano = created.UnixNano()
	}
	m.CriuDumpStats = st
	return m, nil
}

// legacyStats turns CRIU's dump statistics as format 1 (and streams of
// that time) carried them, go-criu's DumpStatsEntry through encoding/json,
// into the entry's protobuf encoding.
func legacyStats(raw []byte) ([]byte, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return nil, nil
	}
	var st stats.DumpStatsEntry
	if err := json.Unmarshal(raw, &st); err != nil {
		return nil, fmt.Errorf("criuStats: %w", err)
	}
	return partial.Marshal(&st)
}

// CRIU's stats.proto is proto2 with required fields: a statistics entry
// missing one (from a hand-edited or older manifest) is kept, not refused.
var (
	partial   = proto.MarshalOptions{AllowPartial: true}
	unpartial = proto.UnmarshalOptions{AllowPartial: true}
)

// CriuStats reads CRIU's dump statistics from m; nil when it has none.
func CriuStats(m *Manifest) *stats.DumpStatsEntry {
	var st stats.DumpStatsEntry
	if len(m.GetCriuDumpStats()) == 0 || unpartial.Unmarshal(m.GetCriuDumpStats(), &st) != nil {
		return nil
	}
	return &st
}

// SetCriuStats records CRIU's dump statistics in m.
func SetCriuStats(m *Manifest, st *stats.DumpStatsEntry) {
	m.CriuDumpStats = nil
	if st != nil {
		m.CriuDumpStats, _ = partial.Marshal(st) // a message always marshals, partial or not
	}
}

// JSON is m as the command line prints it (ferry inspect --json): the
// shape and types it has always had (proto.AppendJSON), with created as
// a time and criuStats as go-criu's DumpStatsEntry through encoding/json.
func JSON(m *Manifest) json.Marshaler { return manifestJSON{m} }

type manifestJSON struct{ m *Manifest }

func (j manifestJSON) MarshalJSON() ([]byte, error) {
	if j.m == nil {
		return []byte("null"), nil
	}
	created := pb.File_proto_image_proto.Messages().ByName("Manifest").Fields().ByName("created_unix_nano")
	stats := pb.File_proto_image_proto.Messages().ByName("Manifest").Fields().ByName("criu_dump_stats")
	return pb.AppendJSON(nil, j.m.ProtoReflect(), func(fd protoreflect.FieldDescriptor, _ protoreflect.Value) ([]byte, bool) {
		switch fd {
		case created:
			raw, err := json.Marshal(Created(j.m))
			return raw, err == nil
		case stats:
			st := CriuStats(j.m)
			if st == nil {
				return nil, true
			}
			raw, err := json.Marshal(st)
			return raw, err == nil
		}
		return nil, false
	})
}

// SameRestore says whether a restore started from one manifest restores
// the other: whether everything a restore's command line is made of is
// the same in both.
func SameRestore(a, b *Manifest) bool {
	return slices.Equal(OutputPipes(a), OutputPipes(b)) && a.GetExternalPidNs() == b.GetExternalPidNs() &&
		a.GetShellJob() == b.GetShellJob() && a.GetTcpEstablished() == b.GetTcpEstablished() &&
		a.GetNetworkLock() == b.GetNetworkLock() && a.GetFileLocks() == b.GetFileLocks() &&
		a.GetExtUnixSk() == b.GetExtUnixSk() && a.GetForeign() == b.GetForeign() &&
		slices.Equal(a.GetCommand(), b.GetCommand()) && a.GetDir() == b.GetDir()
}
