package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"
	"golang.org/x/sys/unix"

	"github.com/ferry-cr/ferry/dump"
	"github.com/ferry-cr/ferry/image"
	"github.com/ferry-cr/ferry/internal/checkpoint"
	"github.com/ferry-cr/ferry/internal/criu"
	"github.com/ferry-cr/ferry/internal/job"
	"github.com/ferry-cr/ferry/internal/progress"
	pb "github.com/ferry-cr/ferry/proto"
)

var checkpointCommand = &cli.Command{
	Name:      "checkpoint",
	Before:    sweepScratch,
	Usage:     "checkpoint a running job",
	ArgsUsage: "JOB | --pid PID | --all --store DIR",
	Description: `Freezes the job, captures it with CRIU into the checkpoint directory given
by -o, makes the checkpoint durable, and only then ends the job (or thaws it,
with --leave-running). If anything fails the job is thawed and keeps running.
With --pid, checkpoints a tree that ferry did not start (CRIU seizes its
tasks); "ferry restore" brings it back as a job under a new ferry init, with
its original pids inside a fresh PID namespace.

With --store DIR, adds a snapshot of the job to that store instead, while
the job keeps running (--leave-running=false ends it once the snapshot is
durable): only chunks the store does not already hold are written, so a
snapshot of a job that changed little costs little. --keep N then prunes
the job's older snapshots. --all (with --store) snapshots every running
job and ends each once its snapshot is durable, for a reboot:
"ferry restore --all --store DIR" brings them back.`,
	Flags: []cli.Flag{
		&cli.StringFlag{Name: "output", Aliases: []string{"o"}, Usage: "checkpoint to create: a .ferry file, - for standard output, or a directory (default: JOB.ferry, or pid-PID.ferry)"},
		&cli.StringFlag{Name: "format", Value: "auto", Usage: "stream (one compressed, checksummed file), dir (CRIU's images in a directory), or auto (stream for .ferry and -)"},
		&cli.StringFlag{Name: "compress", Value: "s2", Usage: "compression of a stream's chunks: s2 (fastest), zstd (smaller, see --level), auto (s2 only while the output is slower than compressing), or none"},
		&cli.IntFlag{Name: "level", Value: 1, Usage: "zstd level, 1 (fastest) to 4 (smallest); alone, it means --compress zstd"},
		&cli.BoolFlag{Name: "digests", Usage: "also record the SHA-256 of every file and of the stream (a file is always checked by the CRC-32C of each record; SHA-256 costs more CPU than s2 compressing)"},
		&cli.IntFlag{Name: "pid", Usage: "checkpoint the process tree rooted at `PID` instead of a job"},
		&cli.BoolFlag{Name: "force", Usage: "replace the output if it exists"},
		&cli.BoolFlag{Name: "leave-running", Usage: "keep the job running after the checkpoint"},
		&cli.BoolFlag{Name: "tcp-established", Usage: "checkpoint established TCP connections"},
		&cli.BoolFlag{Name: "file-locks", Usage: "checkpoint file locks"},
		&cli.BoolFlag{Name: "ext-unix-sk", Usage: "allow unix sockets connected outside the tree"},
		&cli.DurationFlag{Name: "timeout", Usage: "give up (and thaw the job) after this long"},
		&cli.BoolFlag{Name: "json", Usage: "print the summary as JSON"},
		progressFlag,
		&cli.BoolFlag{Name: "dry-run", Usage: "print the inventory of the tree and the checkpoint plan; freeze nothing"},
		storeFlag,
		&cli.IntFlag{Name: "keep", Usage: "with --store: keep only the newest `N` snapshots of the job"},
		&cli.BoolFlag{Name: "all", Usage: "with --store: snapshot and end every running job (before a reboot)"},
	},
	Action: func(c *cli.Context) error {
		// A reader of -o - that quits (| head) must fail a write, not kill
		// ferry with SIGPIPE while it holds the job frozen; so must a
		// closed stderr. Asked for, SIGPIPE makes such writes return EPIPE.
		signal.Notify(make(chan os.Signal, 1), unix.SIGPIPE)
		if c.Bool("all") {
			if c.NArg() != 0 || c.IsSet("pid") || !c.IsSet("store") {
				return usageError{fmt.Errorf("checkpoint --all takes --store DIR and no JOB or --pid")}
			}
			return checkpointAll(c)
		}
		if c.IsSet("store") && !c.Bool("dry-run") {
			if c.IsSet("pid") || c.IsSet("output") {
				return usageError{fmt.Errorf("checkpoint --store takes a JOB, not --pid or -o")}
			}
			s, name, err := jobArg(c)
			if err != nil {
				return err
			}
			return checkpointToStore(c, s, name)
		}
		pid := c.Int("pid")
		if c.IsSet("pid") && c.NArg() != 0 {
			return usageError{fmt.Errorf("checkpoint: give a JOB or --pid, not both")}
		}
		var s *job.Registry
		var name string
		var err error
		if c.IsSet("pid") {
			if err = requireRoot(); err != nil {
				return err
			}
			if s, err = registry(c); err != nil {
				return err
			}
			name = fmt.Sprintf("pid-%d", pid)
		} else if s, name, err = jobArg(c); err != nil {
			return err
		}
		if c.Bool("dry-run") {
			allow := dump.Allowed{
				TCPEstablished: c.Bool("tcp-established"),
				ExtUnixSk:      c.Bool("ext-unix-sk"),
				FileLocks:      c.Bool("file-locks"),
			}
			var inv *dump.Inventory
			var plan *dump.Plan
			if c.IsSet("pid") {
				inv, plan, err = dump.DryRunPid(pid, allow)
			} else {
				inv, plan, err = dump.DryRun(s, name, allow)
			}
			if err != nil {
				return err
			}
			if c.Bool("json") {
				return writeJSON(c, map[string]any{"inventory": inv, "plan": plan})
			}
			printInventory(c.App.Writer, inv, plan)
			return nil
		}
		bin, err := findCriu(c)
		if err != nil {
			return err
		}
		out := c.String("output")
		if out == "" {
			out = name + checkpoint.StreamSuffix
		}
		stream, err := streamFormat(c, out)
		if err != nil {
			return err
		}
		if out == "-" {
			if err := checkStdout(c); err != nil {
				return err
			}
		} else if err := probeOutput(out); err != nil {
			return err
		}
		ctx := c.Context
		if d := c.Duration("timeout"); d > 0 {
			var cancel func()
			ctx, cancel = context.WithTimeout(ctx, d)
			defer cancel()
		}
		meter, err := newMeter(c, "checkpoint")
		if err != nil {
			return err
		}
		streamTo := c.App.Writer
		if out == "-" {
			var release func()
			streamTo, release = pipeOut(ctx, streamTo)
			defer release()
		}
		opts := dump.Options{
			Progress:       meter,
			Criu:           bin,
			Output:         out,
			Force:          c.Bool("force"),
			LeaveRunning:   c.Bool("leave-running"),
			TCPEstablished: c.Bool("tcp-established"),
			FileLocks:      c.Bool("file-locks"),
			ExtUnixSk:      c.Bool("ext-unix-sk"),
			FerryVersion:   versionString(),
			Logger:         slog.Default(),
			LogDir:         filepath.Join(s.Root, "logs"),
			CgroupRoot:     c.String("cgroup-root"),
			CriuLogLevel:   criuLogLevel(c),
			Stream:         stream,
			StreamTo:       streamTo,
			Image:          streamCompression(c),
		}
		var res *dump.Result
		if c.IsSet("pid") {
			res, err = dump.Process(ctx, pid, opts)
		} else {
			res, err = dump.Job(ctx, s, name, opts)
		}
		meter.Done(err)
		if err != nil {
			var oe *dump.OutputError
			if errors.As(err, &oe) && !strings.Contains(err.Error(), "\n") {
				// One failure: say it plainly, and that the job is whole.
				return fmt.Errorf("%w; %s was not ended", oe, name)
			}
			return withCode(err, exitCheckpoint)
		}
		// With -o - the checkpoint itself is on standard output.
		summary := c.App.Writer
		if out == "-" {
			summary = c.App.ErrWriter
		}
		if c.Bool("json") {
			enc := json.NewEncoder(summary)
			enc.SetIndent("", "  ")
			return enc.Encode(res)
		}
		ended := "ended"
		if !res.JobEnded {
			ended = "still running"
		}
		fmt.Fprintf(summary, "checkpointed %s to %s: %d processes, %d threads, %s memory, %s written; frozen %s, total %s; job %s\n",
			res.Job, res.Output, res.Processes, res.Threads, humanBytes(res.Memory), humanBytes(res.Size),
			res.Frozen.Round(time.Millisecond), res.Total.Round(time.Millisecond), ended)
		return nil
	},
}

// findCriu locates CRIU as --criu, $FERRY_CRIU, the provisioned copy, then
// PATH, and checks its version.
func findCriu(c *cli.Context) (*criu.Binary, error) { return criuFor(c.Context, c) }

func writeJSON(c *cli.Context, v any) error {
	enc := json.NewEncoder(c.App.Writer)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// printInventory renders the walk and the plan for people, with the
// verdict: checkpointable or not.
func printInventory(w io.Writer, inv *dump.Inventory, plan *dump.Plan) {
	printTree(w, inv, plan)
	if err := dump.Refusal(plan); err == nil {
		fmt.Fprintln(w, "checkpointable: yes")
	} else {
		fmt.Fprintln(w, "checkpointable: no")
	}
}

// printTree renders the walk and the plan for people.
func printTree(w io.Writer, inv *dump.Inventory, plan *dump.Plan) {
	fmt.Fprintf(w, "tree of pid %d: %d processes, memory %s (RSS %s: anonymous %s, file %s, shared %s)\n",
		inv.Root, len(inv.Tasks), humanBytes(inv.GetMemory().GetSize()), humanBytes(inv.GetMemory().GetRss()),
		humanBytes(inv.GetMemory().GetAnonymous()), humanBytes(inv.GetMemory().GetFileRss()), humanBytes(inv.GetMemory().GetShmemRss()))
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "PID\tNSPID\tPPID\tPGID\tSID\tTHR\tRSS\tFDS\tCOMMAND")
	for _, t := range inv.Tasks {
		kinds := map[string]int{}
		for _, fd := range t.Fds {
			kinds[fd.Kind]++
		}
		var fds []string
		for _, k := range slices.Sorted(maps.Keys(kinds)) {
			fds = append(fds, fmt.Sprintf("%s:%d", k, kinds[k]))
		}
		fmt.Fprintf(tw, "%d\t%d\t%d\t%d\t%d\t%d\t%s\t%s\t%s\n", t.Pid, t.Nspid, t.Ppid, t.Pgid, t.Sid, t.Threads,
			humanBytes(t.GetMemory().GetRss()), strings.Join(fds, ","), strings.Join(t.Cmdline, " "))
	}
	tw.Flush()
	if len(inv.Sockets) > 0 {
		fmt.Fprintln(w, "sockets:")
		for _, s := range inv.Sockets {
			peer := ""
			if s.Remote != "" || s.PeerInode != 0 {
				peer = " (peer outside the tree)"
				if s.PeerInTree {
					peer = " (peer inside the tree)"
				}
			}
			fmt.Fprintf(w, "  pid %d fd %d: %s %s %s %s%s\n", s.Pid, s.Fd, s.Family, s.State, s.Local, s.Remote, peer)
		}
	}
	fmt.Fprintf(w, "SysV IPC: %d shm, %d sem, %d msg (own IPC namespace: %v); file locks: %d\n",
		inv.GetIpc().GetShm(), inv.GetIpc().GetSem(), inv.GetIpc().GetMsg(), inv.OwnIpcNamespace, inv.FileLocks)
	fmt.Fprintf(w, "plan: tcp-established=%v ext-unix-sk=%v file-locks=%v shell-job=%v\n",
		plan.TcpEstablished, plan.ExtUnixSk, plan.FileLocks, plan.ShellJob)
	for _, f := range plan.Blockers {
		fmt.Fprintf(w, "  cannot checkpoint: %s\n", dump.FindingString(f))
	}
	for _, f := range plan.Needs {
		fmt.Fprintf(w, "  needs a flag: %s\n", dump.FindingString(f))
	}
	for _, n := range plan.Notes {
		fmt.Fprintf(w, "  note: %s\n", n)
	}
}

// criuLogLevel is 4 (everything) with --debug, else CRIU's default.
func criuLogLevel(c *cli.Context) int {
	if c.Bool("debug") {
		return 4
	}
	return 2
}

// streamFormat decides between a stream and a directory checkpoint.
func streamFormat(c *cli.Context, out string) (bool, error) {
	switch c.String("compress") {
	case "s2", "zstd", "auto", "none":
	default:
		return false, usageError{fmt.Errorf("unknown --compress %q (s2, zstd, auto or none)", c.String("compress"))}
	}
	if l := c.Int("level"); l < 1 || l > 4 {
		return false, usageError{fmt.Errorf("--level %d out of range 1 to 4", l)}
	}
	if c.IsSet("level") && c.IsSet("compress") && c.String("compress") != "zstd" {
		return false, usageError{fmt.Errorf("--level is zstd's: it does not go with --compress %s", c.String("compress"))}
	}
	switch c.String("format") {
	case "stream":
		return true, nil
	case "dir":
		if out == "-" {
			return false, usageError{fmt.Errorf("a directory checkpoint cannot go to standard output")}
		}
		return false, nil
	case "auto":
		return out == "-" || strings.HasSuffix(out, checkpoint.StreamSuffix), nil
	}
	return false, usageError{fmt.Errorf("unknown --format %q (stream, dir or auto)", c.String("format"))}
}

// streamCompression is how --compress and --level (checked by
// streamFormat) ask a stream to be written. S2 is the default, for the
// checkpoint's speed: where zstd's fastest level and S2 both compress,
// S2 takes half the time, for a few percent more output (image.WriterOptions).
// --level alone asks for zstd at that level, as it did when zstd was the
// default.
func streamCompression(c *cli.Context) image.WriterOptions {
	opts := image.WriterOptions{Compression: pb.Compression_COMPRESSION_S2, Level: c.Int("level")}
	switch c.String("compress") {
	case "zstd":
		opts.Compression = pb.Compression_COMPRESSION_ZSTD
	case "auto":
		opts.Adaptive = true
	case "none":
		opts.NoCompress = true
	}
	if c.IsSet("level") && !c.IsSet("compress") {
		opts.Compression = pb.Compression_COMPRESSION_ZSTD
	}
	// Every record carries its CRC-32C; SHA-256 over every byte besides
	// cost more than compressing them with s2 (image.FlagNoDigests).
	opts.NoDigests = !c.Bool("digests")
	return opts
}

// progressFlag is --progress of checkpoint and restore.
var progressFlag = &cli.StringFlag{Name: "progress", Value: "auto", Usage: "progress on stderr: auto (a live line on a terminal, else nothing), line, json (one object per line), or off"}

// newMeter starts the progress meter --progress asks for (nil for none).
func newMeter(c *cli.Context, op string) (*progress.Meter, error) {
	mode, err := progress.ParseMode(c.String("progress"))
	if err != nil {
		return nil, usageError{err}
	}
	return progress.New(c.App.ErrWriter, mode, op, 0), nil
}

// checkStdout refuses -o - when standard output is the null device, as it
// is when ferry was started with it closed (the Go runtime opens
// /dev/null there): the checkpoint would vanish and the job be ended for
// it. Refused before anything is frozen, as a bad output (exit 17), like
// a missing directory: nothing was attempted. With --leave-running
// nothing is lost, so a checkpoint may be discarded on purpose.
func checkStdout(c *cli.Context) error {
	f, ok := c.App.Writer.(*os.File)
	if !ok || c.Bool("leave-running") || !dump.IsDevNull(f) {
		return nil
	}
	return fmt.Errorf("%w: standard output is /dev/null or was closed, so the checkpoint would be lost with the job; send it to a file or a pipe (or add --leave-running to discard it)", dump.ErrBadOutput)
}

// pipeOut is where -o - writes when standard output is a pipe: a
// description of that pipe of its own, non-blocking and written through
// the runtime's poller (standard output's own, which others may share, is
// left as it was). A reader that stops reading would otherwise hold ferry
// in write(2), and the job frozen, past Ctrl-C, SIGTERM and --timeout;
// this way the write fails when ctx ends, and the job runs on. Anything
// else (a file, a terminal) is w itself.
func pipeOut(ctx context.Context, w io.Writer) (io.Writer, func()) {
	f, ok := w.(*os.File)
	if !ok {
		return w, func() {}
	}
	if fi, err := f.Stat(); err != nil || fi.Mode()&os.ModeNamedPipe == 0 {
		return w, func() {}
	}
	fd, err := unix.Open(fmt.Sprintf("/proc/self/fd/%d", f.Fd()), unix.O_WRONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return w, func() {} // no reader left (ENXIO): the first write says so
	}
	p := os.NewFile(uintptr(fd), "/dev/stdout")
	if p.SetWriteDeadline(time.Time{}) != nil {
		p.Close()
		return w, func() {}
	}
	stop := context.AfterFunc(ctx, func() { _ = p.SetWriteDeadline(time.Unix(1, 0)) })
	return p, func() { stop(); p.Close() }
}
