package main

import (
	"os"

	"github.com/urfave/cli/v2"

	"github.com/ferry-cr/ferry/internal/criu"
	"github.com/ferry-cr/ferry/internal/doctor"
)

var doctorCommand = &cli.Command{
	Name:  "doctor",
	Usage: "check whether this host can checkpoint and restore, and what else it can do",
	Flags: []cli.Flag{
		&cli.BoolFlag{Name: "json", Usage: "print JSON"},
	},
	Action: func(c *cli.Context) error {
		if err := exactArgs(c, 0, "no arguments"); err != nil {
			return err
		}
		r := doctor.Run(c.Context, doctor.Options{
			Criu: criu.FindOptions{
				Flag:            c.String("criu"),
				Env:             os.Getenv("FERRY_CRIU"),
				ProvisionedDirs: criu.DefaultProvisionedPaths(),
			},
			CgroupRoot: c.String("cgroup-root"),
		})
		var err error
		if c.Bool("json") {
			err = writeJSON(c, r)
		} else {
			err = r.WriteTable(c.App.Writer)
		}
		if err != nil {
			return err
		}
		if !r.Ready {
			return cli.Exit("host not ready for checkpoint/restore: "+r.Problems[0], exitNotReady)
		}
		return nil
	},
}
