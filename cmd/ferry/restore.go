package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/urfave/cli/v2"

	"github.com/ferry-cr/ferry/restore"
)

var restoreCommand = &cli.Command{
	Name:      "restore",
	Before:    sweepScratch,
	Usage:     "bring a checkpoint back as a running job",
	ArgsUsage: "CHECKPOINT | - | --store DIR JOB[@SNAPSHOT] | --all --store DIR",
	Description: `Restores the checkpoint into fresh PID and IPC namespaces, so its original
pids never clash with the host's and one checkpoint can be restored twice
side by side (give the second a --name). CHECKPOINT is a .ferry file, "-"
for standard input, or a checkpoint directory. A stream is served to CRIU
as it asks (no unpacked copy), every chunk checked on the way; from a pipe
it is read and checked whole before CRIU starts. A bad chunk aborts the
restore and leaves nothing running. Prints the job's name.

With --store DIR, restores the latest snapshot of JOB in that store, or the
one named by JOB@SNAPSHOT (a unique prefix of its id will do). --all
restores every job that "ferry checkpoint --all" ended into the store (jobs
already running again are left alone). --checkpoint-on-term stays in the
foreground until the job exits, and on SIGTERM or SIGINT takes a final
snapshot and ends the job (see ferry run). A job that took periodic
snapshots (ferry run --checkpoint-every) goes on taking them into the same
store; --checkpoint-every D [--keep N] changes that, --checkpoint-every 0
stops it.`,
	Flags: []cli.Flag{
		&cli.StringFlag{Name: "name", Usage: "job name (default: the checkpointed job's)"},
		progressFlag,
		storeFlag,
		&cli.BoolFlag{Name: "all", Usage: "with --store: restore every job checkpoint --all ended into the store"},
		checkpointEveryFlag, keepFlag,
		&cli.BoolFlag{Name: "checkpoint-on-term", Usage: "with --store: wait for the job; on SIGTERM/SIGINT snapshot it into the store and end it"},
		&cli.DurationFlag{Name: "timeout", Usage: "give up after this long (reading CHECKPOINT or - included); nothing is left running"},
	},
	Action: func(c *cli.Context) error {
		if c.IsSet("timeout") && (c.Bool("all") || c.IsSet("store")) {
			return usageError{fmt.Errorf("restore --timeout bounds a restore of CHECKPOINT or -, not of --store or --all")}
		}
		if c.Bool("all") {
			if !c.IsSet("store") {
				return usageError{fmt.Errorf("restore --all needs --store DIR")}
			}
			return restoreAll(c)
		}
		if c.IsSet("store") {
			return restoreFromStore(c)
		}
		if c.IsSet("checkpoint-every") || c.IsSet("keep") || c.Bool("checkpoint-on-term") {
			return usageError{fmt.Errorf("restore: --checkpoint-every, --keep and --checkpoint-on-term need --store DIR")}
		}
		if err := exactArgs(c, 1, "CHECKPOINT"); err != nil {
			return err
		}
		if err := requireRoot(); err != nil {
			return err
		}
		if err := checkRestoreSource(c.Args().First()); err != nil {
			return err
		}
		s, err := registry(c)
		if err != nil {
			return err
		}
		bin, err := findCriu(c)
		if err != nil {
			return err
		}
		meter, err := newMeter(c, "restore")
		if err != nil {
			return err
		}
		warnListenersInUse(c.App.ErrWriter, s, c.Args().First())
		meter.SetPhase("restoring")
		ctx := c.Context
		if d := c.Duration("timeout"); d > 0 {
			var cancel func()
			ctx, cancel = context.WithTimeoutCause(ctx, d, fmt.Errorf("--timeout %s passed", d))
			defer cancel()
		}
		rec, err := restore.Job(ctx, s, restore.Options{
			Progress:   meter,
			Criu:       bin,
			Checkpoint: c.Args().First(),
			Stdin:      os.Stdin,
			ServeDir:   filepath.Join(s.Root, "serve"),
			Name:       c.String("name"),
			CgroupRoot: c.String("cgroup-root"),
			Logger:     slog.Default(),
		})
		meter.Done(err)
		if err != nil {
			return withCode(err, exitRestore)
		}
		fmt.Fprintln(c.App.Writer, rec.Name)
		return nil
	},
}
