package checkpoint

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"google.golang.org/protobuf/encoding/protojson"

	"github.com/ferry-cr/ferry/image"
	pb "github.com/ferry-cr/ferry/proto"
)

// A checkpoint travels as a single image stream (package image): its
// directory's files, ferry.json among them, each compressed and
// checksummed. Usually CRIU's images stream straight into it (dump's
// --stream, with --leave-running too); Pack covers a checkpoint that was
// dumped into a directory first (a CRIU without --stream; post-copy's
// images but the memory).

// StreamSuffix marks a checkpoint file (rather than a directory).
const StreamSuffix = ".ferry"

// IsStream reports whether path names a checkpoint file: "-" (a pipe), a
// name ending in .ferry, or an existing regular file.
func IsStream(path string) bool {
	if path == "-" || strings.HasSuffix(path, StreamSuffix) {
		return true
	}
	st, err := os.Stat(path)
	return err == nil && st.Mode().IsRegular()
}

// Pack writes the checkpoint directory dir to w as an image stream and
// returns the stream's trailer figures (raw and stored bytes).
func Pack(dir string, w io.Writer, m *Manifest, opts image.WriterOptions) (raw, stored uint64, err error) {
	iw, err := image.NewWriter(w, m, opts)
	if err != nil {
		return 0, 0, err
	}
	if err := PackInto(iw, dir, m, nil); err != nil {
		return 0, 0, err
	}
	return iw.RawBytes(), iw.StoredBytes(), nil
}

// PackInto writes the checkpoint in dir (the manifest m, then its files
// in name order) into iw, whose stream began with an earlier manifest,
// and closes it with final in the trailer (nil: the first stands). On
// failure the stream is left incomplete (image.Writer.Abort).
func PackInto(iw *image.Writer, dir string, m *Manifest, final *Manifest) error {
	names := make([]string, 0, len(m.Files)+1)
	for name := range m.Files {
		names = append(names, name)
	}
	slices.Sort(names)
	names = append([]string{ManifestFile}, names...)
	for _, name := range names {
		if err := packFile(iw, filepath.Join(dir, name), name); err != nil {
			iw.Abort()
			return err
		}
	}
	return iw.CloseWith(final)
}

func packFile(iw *image.Writer, path, name string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	fw, err := iw.Create(name)
	if err != nil {
		return err
	}
	if _, err := io.Copy(fw, f); err != nil {
		return fmt.Errorf("packing %s: %w", name, err)
	}
	return fw.Close()
}

// Verify reads a whole stream and reports the first problem, if any.
func Verify(r io.Reader) (*pb.Manifest, *pb.Trailer, error) {
	rd, err := image.NewReader(r)
	if err != nil {
		return nil, nil, err
	}
	defer rd.Close()
	for {
		if _, err := rd.Next(); errors.Is(err, io.EOF) {
			return rd.Manifest(), rd.Trailer(), nil
		} else if err != nil {
			return rd.Manifest(), nil, err
		}
	}
}

// FromRecord is the manifest a stream's record carries, as this ferry
// reads it: a stream written before the walk, the plan and CRIU's
// statistics were messages has them as JSON (inventory_json, plan_json,
// criu_stats_json), which it turns into the fields, and no format (it is
// format 1's); p is changed in place.
// For inspect, which reads no file, and for a restore that starts before
// the rest of the stream has come (everything CRIU's command line needs
// is in the record).
func FromRecord(p *pb.Manifest) (*Manifest, error) {
	if p == nil {
		return nil, fmt.Errorf("stream has no manifest: %w", ErrNotCheckpoint)
	}
	if p.Format == 0 {
		p.Format = formatV1 // written before records said which
	}
	//nolint:staticcheck // the deprecated fields are what is read here
	if inv, plan, st := p.InventoryJson, p.PlanJson, p.CriuStatsJson; len(inv)+len(plan)+len(st) > 0 {
		old := protojson.UnmarshalOptions{DiscardUnknown: true}
		if len(inv) > 0 && p.Inventory == nil {
			p.Inventory = &pb.Inventory{}
			if err := old.Unmarshal(inv, p.Inventory); err != nil {
				return nil, fmt.Errorf("manifest's inventory: %w: %w", ErrNotCheckpoint, err)
			}
		}
		if len(plan) > 0 && p.Plan == nil {
			p.Plan = &pb.Plan{}
			if err := old.Unmarshal(plan, p.Plan); err != nil {
				return nil, fmt.Errorf("manifest's plan: %w: %w", ErrNotCheckpoint, err)
			}
		}
		if len(p.CriuDumpStats) == 0 {
			var err error
			if p.CriuDumpStats, err = legacyStats(st); err != nil {
				return nil, fmt.Errorf("manifest: %w: %w", ErrNotCheckpoint, err)
			}
		}
		p.InventoryJson, p.PlanJson, p.CriuStatsJson = nil, nil, nil
	}
	return p, nil
}

// CPUInfo reads the CPU model and flags, which decide whether a
// checkpoint can run on another host's CPU.
func CPUInfo() (string, []string) {
	data, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return "", nil
	}
	var model string
	var flags []string
	for line := range strings.SplitSeq(string(data), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		switch strings.TrimSpace(k) {
		case "model name":
			if model == "" {
				model = strings.TrimSpace(v)
			}
		case "flags":
			if flags == nil {
				flags = strings.Fields(v)
			}
		}
		if model != "" && flags != nil {
			break
		}
	}
	return model, flags
}
