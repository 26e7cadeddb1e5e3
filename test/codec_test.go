package test

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"

	gproto "google.golang.org/protobuf/proto"

	"github.com/ferry-cr/ferry/image"
	pb "github.com/ferry-cr/ferry/proto"
)

// chunkCodecs counts the chunks of a .ferry file by the codec each
// records, walking the records as the format lays them out (image.go).
func chunkCodecs(t *testing.T, path string) map[pb.Compression]int {
	t.Helper()
	n := map[pb.Compression]int{}
	for _, h := range chunkHeaders(t, path) {
		n[h.GetCompression()]++
	}
	return n
}

// chunkHeaders returns the headers of a .ferry file's chunk records.
func chunkHeaders(t *testing.T, path string) []*pb.RecordHeader {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var hs []*pb.RecordHeader
	for off := image.HeaderSize; off < len(data)-image.FooterSize; {
		hl := int(binary.LittleEndian.Uint32(data[off:]))
		h := &pb.RecordHeader{}
		if err := gproto.Unmarshal(data[off+8:off+8+hl], h); err != nil {
			t.Fatalf("%s: record at %d: %v", path, off, err)
		}
		if h.GetKind() == pb.RecordHeader_CHUNK {
			hs = append(hs, h)
		}
		off += 8 + hl + int(h.GetPayloadLen())
	}
	return hs
}

// headerFlags reads the flags of a .ferry file's header (image.go).
func headerFlags(t *testing.T, path string) uint16 {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil || len(data) < image.HeaderSize {
		t.Fatalf("%s: %v", path, err)
	}
	return binary.LittleEndian.Uint16(data[10:])
}

// TestCheckpointCodecs: ferry checkpoint writes s2 by default, zstd at a
// level on request (--level alone meaning zstd, as before s2), adapts
// with auto, stores raw with none; every one restores the job's memory
// intact; bad combinations are usage errors. Files carry SHA-256 digests
// only with --digests, and verify and inspect say which checks they hold.
func TestCheckpointCodecs(t *testing.T) {
	e := newEnv(t)
	requireCriu(t)
	w := buildWorkload(t)
	e.must("run", "--name", "mem", "--", w, "memory", "64")
	e.waitLines("mem", "sum ", 1)
	sum := e.lines("mem", "sum ")[0]
	dir := t.TempDir()
	for _, tc := range []struct {
		name    string
		args    []string
		want    pb.Compression // the codec of the compressed chunks
		restore bool
	}{
		{"default", nil, pb.Compression_COMPRESSION_S2, true},
		{"digests", []string{"--digests"}, pb.Compression_COMPRESSION_S2, true},
		{"zstd3", []string{"--compress", "zstd", "--level", "3"}, pb.Compression_COMPRESSION_ZSTD, true},
		{"level2", []string{"--level", "2"}, pb.Compression_COMPRESSION_ZSTD, false},
		{"auto", []string{"--compress", "auto"}, -1, true},
		{"none", []string{"--compress", "none"}, pb.Compression_COMPRESSION_NONE, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			file := filepath.Join(dir, tc.name+".ferry")
			args := append(append([]string{"checkpoint", "--leave-running", "-o", file}, tc.args...), "mem")
			e.must(args...)
			codecs := chunkCodecs(t, file)
			switch tc.want {
			case pb.Compression_COMPRESSION_NONE:
				if len(codecs) != 1 || codecs[pb.Compression_COMPRESSION_NONE] == 0 {
					t.Errorf("--compress none: chunks by codec %v", codecs)
				}
			case -1:
				// S2 where compressing pays, zstd only for long runs (a
				// chunk shrunk 16 times or more: image.runChunk), the
				// random half raw.
				if codecs[pb.Compression_COMPRESSION_NONE] == 0 {
					t.Errorf("auto stored no chunk raw: %v", codecs)
				}
				for _, h := range chunkHeaders(t, file) {
					if h.GetCompression() == pb.Compression_COMPRESSION_ZSTD && uint64(h.GetPayloadLen())*16 > uint64(h.GetRawLen()) {
						t.Errorf("auto wrote a zstd chunk that is no long run: %d bytes of %d", h.GetPayloadLen(), h.GetRawLen())
					}
				}
			default:
				// Half the workload is random: those chunks go raw. An s2
				// stream keeps its longest runs (the workload's repeated
				// text) in zstd, which decodes them faster (image.runChunk).
				if codecs[tc.want] == 0 || codecs[pb.Compression_COMPRESSION_NONE] == 0 ||
					tc.want == pb.Compression_COMPRESSION_ZSTD && codecs[pb.Compression_COMPRESSION_S2] != 0 {
					t.Errorf("chunks by codec %v, want %s and raw", codecs, tc.want)
				}
			}
			// SHA-256 only when asked for; CRC-32C always (image.FlagNoDigests).
			digests := tc.name == "digests"
			if got := headerFlags(t, file)&image.FlagNoDigests == 0; got != digests {
				t.Errorf("SHA-256 digests in the file: %v, want %v", got, digests)
			}
			out := e.must("verify", file)
			if !strings.Contains(out, "ok") || !strings.Contains(out, "CRC-32C") || strings.Contains(out, "every file's SHA-256") != digests {
				t.Fatalf("verify does not say what it checked (SHA-256 digests: %v): %s", digests, out)
			}
			if ins := e.must("inspect", file); !strings.Contains(ins, "integrity: CRC-32C of every record") || strings.Contains(ins, "SHA-256 of every file") != digests {
				t.Errorf("inspect does not say how the file is protected (SHA-256 digests: %v):\n%s", digests, ins)
			}
			if !tc.restore {
				return
			}
			name := "from-" + tc.name
			e.must("restore", "--name", name, file)
			e.waitLines(name, "verify ", len(e.lines(name, "verify "))+1)
			for _, l := range e.lines(name, "verify ") {
				if !strings.HasSuffix(l, sum) {
					t.Fatalf("restored from %s: %q, want sum %s", tc.name, l, sum)
				}
			}
			e.must("kill", name)
		})
	}
	for _, args := range [][]string{
		{"--compress", "lz4"},
		{"--compress", "s2", "--level", "3"},
		{"--level", "9"},
	} {
		r := e.ferry(append(append([]string{"checkpoint", "--leave-running", "-o", filepath.Join(dir, "bad.ferry")}, args...), "mem")...)
		if r.code != 2 || !strings.HasPrefix(r.stderr, "ferry: ") {
			t.Errorf("checkpoint %v: %s, want a usage error", args, r)
		}
		if _, err := os.Stat(filepath.Join(dir, "bad.ferry")); err == nil {
			t.Errorf("checkpoint %v wrote a file", args)
		}
	}
	assertNoStrays(t, e)
}
