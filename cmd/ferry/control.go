package main

import (
	"errors"
	"fmt"
	"log/slog"

	"github.com/urfave/cli/v2"

	"github.com/ferry-cr/ferry/internal/job"
)

var freezeCommand = &cli.Command{
	Name:      "freeze",
	Usage:     "freeze every process of a job (cgroup freezer)",
	ArgsUsage: "JOB",
	Action: func(c *cli.Context) error {
		s, name, err := jobArg(c)
		if err != nil {
			return err
		}
		return s.Freeze(c.Context, name)
	},
}

var thawCommand = &cli.Command{
	Name:      "thaw",
	Usage:     "resume a frozen job",
	ArgsUsage: "JOB",
	Action: func(c *cli.Context) error {
		s, name, err := jobArg(c)
		if err != nil {
			return err
		}
		return s.Thaw(c.Context, name)
	},
}

var killCommand = &cli.Command{
	Name:      "kill",
	Usage:     "end a job: SIGTERM, then SIGKILL after a grace period; the record is kept",
	ArgsUsage: "JOB",
	Description: `A job still starting is ended by killing what its start has put in its
cgroup; a start whose ferry was killed (ferry list: stale) is cleared: what
is left in the job's cgroup is killed and the cgroup removed.`,
	Before: sweepScratch,
	Flags: []cli.Flag{
		&cli.DurationFlag{Name: "grace", Aliases: []string{"t"}, Value: job.DefaultGrace, Usage: "time between SIGTERM and SIGKILL"},
	},
	Action: func(c *cli.Context) error {
		s, name, err := jobArg(c)
		if err != nil {
			return err
		}
		return s.Kill(c.Context, name, c.Duration("grace"), slog.Default())
	},
}

var rmCommand = &cli.Command{
	Name:      "rm",
	Usage:     "forget an ended job (its record and log)",
	ArgsUsage: "JOB",
	Description: `Also clears a start whose ferry was killed (ferry list: stale): what is
left in the job's cgroup is killed and the cgroup removed.`,
	Before: sweepScratch,
	Action: func(c *cli.Context) error {
		s, name, err := jobArg(c)
		if err != nil {
			return err
		}
		err = s.Forget(c.Context, name, slog.Default())
		switch {
		case errors.Is(err, job.ErrRunning):
			return fmt.Errorf("%w: ferry kill %s first", err, name)
		case errors.Is(err, job.ErrStarting):
			return fmt.Errorf("%w: wait, or ferry kill %s", err, name)
		}
		return err
	},
}

// jobArg is the common preamble of commands that take one JOB and need root.
func jobArg(c *cli.Context) (*job.Registry, string, error) {
	if err := exactArgs(c, 1, "JOB"); err != nil {
		return nil, "", err
	}
	if err := requireRoot(); err != nil {
		return nil, "", err
	}
	s, err := registry(c)
	if err != nil {
		return nil, "", err
	}
	return s, c.Args().First(), nil
}
