package main

import (
	"encoding/base64"
	"fmt"
	"io"
	"os"
	"text/tabwriter"
	"time"

	"github.com/checkpoint-restore/go-criu/v7/stats"
	"github.com/urfave/cli/v2"

	"github.com/ferry-cr/ferry/image"
	"github.com/ferry-cr/ferry/internal/checkpoint"
	pb "github.com/ferry-cr/ferry/proto"
)

var inspectCommand = &cli.Command{
	Name:      "inspect",
	Usage:     "show what a checkpoint holds: tree, memory, files, sockets, IPC, sizes",
	ArgsUsage: "CHECKPOINT",
	Description: `Reads only the manifest and, for a .ferry file, the index at its end
(use "ferry verify" to check every chunk).`,
	Flags: []cli.Flag{&cli.BoolFlag{Name: "json", Usage: "print JSON"}},
	Action: func(c *cli.Context) error {
		if err := exactArgs(c, 1, "CHECKPOINT"); err != nil {
			return err
		}
		path := c.Args().First()
		var m *checkpoint.Manifest
		var files []*pb.FileIndex
		var raw, stored uint64
		var trailer *pb.Trailer
		// What inspect read, said with what it printed: a corrupt chunk
		// goes unnoticed here (ferry verify reads them all).
		checked := "the manifest only, not the image files' sizes: ferry verify " + path + " compares them"
		if checkpoint.IsStream(path) {
			checked = "the header and the index only, no chunk: ferry verify " + path + " checks every chunk"
			in, err := openInput(c, path)
			if err != nil {
				return err
			}
			defer in.Close()
			var pm *pb.Manifest
			var t *pb.Trailer
			if in.Regular() {
				pm, t, err = image.ReadIndex(in.File())
			} else {
				// A pipe or FIFO has no index to seek to: read it whole.
				var a *image.Archive
				if a, err = image.ReadArchive(in); err == nil {
					pm, t = a.Manifest(), a.Trailer()
					a.Close()
				}
			}
			if err != nil {
				return withCode(fmt.Errorf("%s: %w", path, err), exitBadCheckpoint)
			}
			if fm := t.GetFinalManifest(); fm != nil {
				pm = fm // written at the end of a streamed dump, complete
			}
			if m, err = checkpoint.FromRecord(pm); err != nil {
				return withCode(fmt.Errorf("%s: %w", path, err), exitBadCheckpoint)
			}
			files, raw, stored = t.GetFiles(), t.GetRawBytes(), t.GetStoredBytes()
			trailer = t
		} else {
			var err error
			if m, err = checkpoint.Load(path); err != nil {
				return err
			}
			for name, size := range m.Files {
				files = append(files, &pb.FileIndex{Name: name, Size: uint64(size), Stored: uint64(size)})
				raw += uint64(size)
			}
			stored = raw
		}
		if c.Bool("json") {
			v := map[string]any{"manifest": checkpoint.JSON(m), "files": filesJSON(files), "rawBytes": raw, "storedBytes": stored, "checked": checked}
			if trailer != nil {
				v["integrity"] = integrity(trailer)
			}
			return writeJSON(c, v)
		}
		w := c.App.Writer
		fmt.Fprintf(w, "job %s: %s\n", m.Job, joinCmd(m.Command))
		fmt.Fprintf(w, "taken %s on %s (kernel %s) by ferry %s with CRIU %s\n",
			checkpoint.Created(m).Format(time.RFC3339), m.Host, m.Kernel, m.FerryVersion, m.CriuVersion)
		fmt.Fprintf(w, "%d processes, %d threads, %s of memory; %s raw, %s stored",
			m.Processes, m.Threads, humanBytes(m.MemoryBytes), humanBytes(int64(raw)), humanBytes(int64(stored)))
		if raw > 0 && stored < raw {
			fmt.Fprintf(w, " (%.0f%%)", 100*float64(stored)/float64(raw))
		}
		fmt.Fprintln(w)
		if m.Inventory != nil && m.Plan != nil {
			fmt.Fprintln(w, "the tree when it was checkpointed:")
			printTree(w, m.Inventory, m.Plan)
		}
		printCriuStats(w, checkpoint.CriuStats(m))
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "FILE\tSIZE\tSTORED")
		for _, f := range files {
			fmt.Fprintf(tw, "%s\t%s\t%s\n", f.GetName(), humanBytes(int64(f.GetSize())), humanBytes(int64(f.GetStored())))
		}
		if err := tw.Flush(); err != nil {
			return err
		}
		if checkpoint.IsStream(path) {
			fmt.Fprintf(w, "integrity: %s\n", integrity(trailer))
		}
		_, err := fmt.Fprintf(w, "checked: %s\n", checked)
		return err
	},
}

var verifyCommand = &cli.Command{
	Name:      "verify",
	Usage:     "check every chunk of a checkpoint file (or of a snapshot store); exit 0 only if all match",
	ArgsUsage: "CHECKPOINT | - | --store DIR",
	Flags:     []cli.Flag{storeFlag},
	Action: func(c *cli.Context) error {
		if c.IsSet("store") {
			if c.NArg() != 0 {
				return usageError{fmt.Errorf("verify --store takes no CHECKPOINT")}
			}
			return verifyStore(c)
		}
		if err := exactArgs(c, 1, "CHECKPOINT"); err != nil {
			return err
		}
		path := c.Args().First()
		if !checkpoint.IsStream(path) {
			if _, err := checkpoint.Load(path); err != nil {
				return err
			}
			fmt.Fprintf(c.App.Writer, "%s: directory complete (file sizes match; directories carry no checksums)\n", path)
			return nil
		}
		in, err := openInput(c, path)
		if err != nil {
			return err
		}
		defer in.Close()
		_, t, err := checkpoint.Verify(in)
		if err != nil {
			return withCode(fmt.Errorf("%s: %w", path, err), exitBadCheckpoint)
		}
		fmt.Fprintf(c.App.Writer, "%s: ok, %d files, %s raw, %s stored; %s\n",
			path, len(t.GetFiles()), humanBytes(int64(t.GetRawBytes())), humanBytes(int64(t.GetStoredBytes())), verified(t))
		return nil
	},
}

// fileJSON is a file of the index as inspect --json shows it: sha256 is
// always there, empty for a stream written without digests, so that a
// script reading it finds the key it always found.
type fileJSON struct {
	*pb.FileIndex
	Sha256 string `json:"sha256"` // base64, as encoding/json writes bytes
}

func filesJSON(files []*pb.FileIndex) []fileJSON {
	out := make([]fileJSON, len(files))
	for i, f := range files {
		out[i] = fileJSON{FileIndex: f, Sha256: base64.StdEncoding.EncodeToString(f.GetSha256())}
	}
	return out
}

// integrity says how a stream's data is protected, from its trailer: a
// stream written without digests (image.FlagNoDigests, the default since
// SHA-256 cost more than compressing) has none there.
func integrity(t *pb.Trailer) string {
	if len(t.GetStreamSha256()) == 0 {
		return "CRC-32C of every record (no SHA-256 digests: written without --digests)"
	}
	return "CRC-32C of every record, SHA-256 of every file and of the stream"
}

// verified is what verify checked, all of which matched.
func verified(t *pb.Trailer) string {
	what := "every record's CRC-32C (headers, chunks, index), every chunk decoded to its length, every file's size and chunks against the index"
	if len(t.GetStreamSha256()) == 0 {
		return what + " (the file has no SHA-256 digests: written without --digests)"
	}
	return what + ", every file's SHA-256 and the stream's"
}

func printCriuStats(w io.Writer, st *stats.DumpStatsEntry) {
	if st == nil {
		return
	}
	fmt.Fprintf(w, "CRIU: frozen %dms (freezing %dms, memdump %dms, memwrite %dms), pages scanned %d, written %d\n",
		st.GetFrozenTime()/1000, st.GetFreezingTime()/1000, st.GetMemdumpTime()/1000, st.GetMemwriteTime()/1000,
		st.GetPagesScanned(), st.GetPagesWritten())
}

func joinCmd(cmd []string) string {
	s := ""
	for i, a := range cmd {
		if i > 0 {
			s += " "
		}
		s += a
	}
	return s
}

// openInput opens a checkpoint stream to read, path or "-" for standard
// input, so that waiting for a FIFO's writer or a stalled pipe ends on
// Ctrl-C or SIGTERM (exit 130).
func openInput(c *cli.Context, path string) (*image.Input, error) {
	if path == "-" {
		return image.NewInput(c.Context, os.Stdin)
	}
	in, err := image.OpenInput(c.Context, path)
	if err != nil {
		if c.Context.Err() != nil {
			return nil, fmt.Errorf("%q: %w", path, err)
		}
		return nil, fmt.Errorf("%q: %w: %w", path, checkpoint.ErrNotCheckpoint, err)
	}
	return in, nil
}
