package checkpoint

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

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
	iw, err := image.NewWriter(w, ToProto(m), opts)
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
func PackInto(iw *image.Writer, dir string, m *Manifest, final *pb.Manifest) error {
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

// ToProto is the stream's manifest: what inspect shows without reading
// the files.
func ToProto(m *Manifest) *pb.Manifest {
	p := &pb.Manifest{
		FerryVersion: m.FerryVersion, CriuVersion: m.CriuVersion, Kernel: m.Kernel, Host: m.Host,
		CreatedUnixNano: m.Created.UnixNano(), Job: m.Job, Command: m.Command, Dir: m.Dir,
		Foreign: m.Foreign, ExternalPidNs: m.ExternalPidNS, ShellJob: m.ShellJob,
		OutputPipe: m.OutputPipe, ErrorPipe: m.ErrorPipe, TcpEstablished: m.TCPEstablished,
		NetworkLock: m.NetworkLock, FileLocks: m.FileLocks, ExtUnixSk: m.ExtUnixSk,
		Processes: int32(m.Processes), Threads: int32(m.Threads), MemoryBytes: m.MemoryBytes,
		InventoryJson: m.Inventory, PlanJson: m.Plan, CriuStats: m.CriuStats,
	}
	p.CpuModel, p.CpuFlags = cpuInfo()
	if m.Init != nil {
		p.Init = &pb.Executable{Path: m.Init.Path, Size: m.Init.Size, Sha256: m.Init.SHA256}
	}
	return p
}

// FromProto reads back the manifest ferry.json carries, from a stream's
// manifest record: for inspect, which reads no file, and for a restore
// that starts before the rest of the stream has come (everything CRIU's
// command line needs is there; Files is not).
func FromProto(p *pb.Manifest) *Manifest {
	m := &Manifest{
		Format: FormatVersion, FerryVersion: p.GetFerryVersion(), CriuVersion: p.GetCriuVersion(),
		Kernel: p.GetKernel(), Host: p.GetHost(), Job: p.GetJob(), Command: p.GetCommand(), Dir: p.GetDir(),
		Foreign: p.GetForeign(), ExternalPidNS: p.GetExternalPidNs(), ShellJob: p.GetShellJob(),
		TCPEstablished: p.GetTcpEstablished(), NetworkLock: p.GetNetworkLock(), FileLocks: p.GetFileLocks(),
		ExtUnixSk: p.GetExtUnixSk(), Processes: int(p.GetProcesses()), Threads: int(p.GetThreads()),
		MemoryBytes: p.GetMemoryBytes(), Inventory: p.GetInventoryJson(), Plan: p.GetPlanJson(), CriuStats: p.GetCriuStats(),
		Created:    time.Unix(0, p.GetCreatedUnixNano()).UTC(),
		OutputPipe: p.GetOutputPipe(), ErrorPipe: p.GetErrorPipe(),
	}
	if e := p.GetInit(); e != nil {
		m.Init = &Executable{Path: e.GetPath(), Size: e.GetSize(), SHA256: e.GetSha256()}
	}
	return m
}

// cpuInfo reads the CPU model and flags, which decide whether a
// checkpoint can run on another host's CPU.
func cpuInfo() (string, []string) {
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
