package main

import (
	"fmt"
	"log/slog"

	"github.com/urfave/cli/v2"

	"github.com/ferry-cr/ferry/internal/job"
)

var runCommand = &cli.Command{
	Name:      "run",
	Usage:     "start a command as a checkpointable job",
	ArgsUsage: "[--name NAME] -- CMD [ARGS...]",
	Description: `Starts CMD detached, as the only child of ferry's init, which is pid 1 of
fresh PID and IPC namespaces, inside a cgroup of its own. stdin is /dev/null;
stdout and stderr go to the job's log ("ferry logs"). Prints the job's name.`,
	Flags: []cli.Flag{
		&cli.StringFlag{Name: "name", Usage: "job name (default: generated from the command)"},
	},
	Action: func(c *cli.Context) error {
		if c.NArg() == 0 {
			return usageError{fmt.Errorf("run: no command given (ferry run [--name NAME] -- CMD [ARGS...])")}
		}
		if err := requireRoot(); err != nil {
			return err
		}
		s, err := store(c)
		if err != nil {
			return err
		}
		rec, err := job.Start(c.Context, s, job.Spec{
			Name:       c.String("name"),
			Command:    c.Args().Slice(),
			CgroupRoot: c.String("cgroup-root"),
			Logger:     slog.Default(),
		})
		if err != nil {
			return err
		}
		fmt.Fprintln(c.App.Writer, rec.Name)
		return nil
	},
}
