package main

import (
	"fmt"
	"log/slog"

	"github.com/urfave/cli/v2"

	"github.com/ferry-cr/ferry/internal/job"
	"github.com/ferry-cr/ferry/store"
)

var runCommand = &cli.Command{
	Name:      "run",
	Usage:     "start a command as a checkpointable job",
	ArgsUsage: "[--name NAME] -- CMD [ARGS...]",
	Description: `Starts CMD detached, as the only child of ferry's init, which is pid 1 of
fresh PID and IPC namespaces, inside a cgroup of its own. stdin is /dev/null;
stdout and stderr go to the job's log ("ferry logs"). Prints the job's name.

--checkpoint-every D adds a snapshot of the job to the store every D while it
runs (taken by the job's shim; --keep N prunes older ones). With
--checkpoint-on-term, ferry run stays in the foreground until the job exits
(and exits with its status); sent SIGTERM or SIGINT, as a batch scheduler
does before preemption or at the time limit, it takes a final snapshot,
ends the job once the snapshot is durable and exits 26, so a batch script
requeues and the requeued job resumes with "ferry restore --store DIR JOB".`,
	Flags: []cli.Flag{
		&cli.StringFlag{Name: "name", Usage: "job name (default: generated from the command)"},
		storeFlag,
		checkpointEveryFlag, keepFlag,
		&cli.BoolFlag{Name: "checkpoint-on-term", Usage: "stay in the foreground; on SIGTERM/SIGINT snapshot the job into the store and end it"},
	},
	Action: func(c *cli.Context) error {
		if c.NArg() == 0 {
			return usageError{fmt.Errorf("run: no command given (ferry run [--name NAME] -- CMD [ARGS...])")}
		}
		if err := requireRoot(); err != nil {
			return err
		}
		s, err := registry(c)
		if err != nil {
			return err
		}
		policy, err := periodicPolicy(c, s, "run")
		if err != nil {
			return err
		}
		if policy != nil && policy.Every == 0 {
			policy = nil
		}
		var st *store.Store
		if c.Bool("checkpoint-on-term") || policy != nil {
			// Open (create) the store now: a bad --store fails here, not
			// at the first snapshot.
			if st, _, err = openStore(c, s, true); err != nil {
				return err
			}
			defer st.Close()
		}
		rec, err := job.Start(c.Context, s, job.Spec{
			Name:       c.String("name"),
			Command:    c.Args().Slice(),
			CgroupRoot: c.String("cgroup-root"),
			Logger:     slog.Default(),
			Snapshots:  policy,
		})
		if err != nil {
			return err
		}
		fmt.Fprintln(c.App.Writer, rec.Name)
		if c.Bool("checkpoint-on-term") {
			return waitOrSnapshot(c, s, st, rec.Name)
		}
		return nil
	},
}
