package main

import (
	"errors"
	"io"
	"io/fs"
	"os"
	"time"

	"github.com/urfave/cli/v2"
)

// followInterval paces `ferry logs -f` polling of the log file.
const followInterval = 100 * time.Millisecond

var logsCommand = &cli.Command{
	Name:      "logs",
	Usage:     "print a job's output",
	ArgsUsage: "JOB",
	Flags: []cli.Flag{
		&cli.BoolFlag{Name: "follow", Aliases: []string{"f"}, Usage: "keep printing new output until the job ends"},
	},
	Action: func(c *cli.Context) error {
		if err := exactArgs(c, 1, "JOB"); err != nil {
			return err
		}
		s, err := registry(c)
		if err != nil {
			return err
		}
		name := c.Args().First()
		rec, err := s.Load(name)
		if err != nil {
			return err
		}
		f, err := os.Open(s.LogPath(name))
		if errors.Is(err, fs.ErrNotExist) {
			if !c.Bool("follow") {
				return nil
			}
		} else if err != nil {
			return err
		} else {
			defer f.Close()
		}
		for {
			if f != nil {
				if _, err := io.Copy(c.App.Writer, f); err != nil {
					return err
				}
			}
			if !c.Bool("follow") {
				return nil
			}
			// Stop once the job has ended and everything it wrote is out.
			if r, err := s.Load(name); err != nil || !r.InitAlive() {
				if f != nil {
					_, err := io.Copy(c.App.Writer, f)
					return err
				}
				return nil
			}
			select {
			case <-c.Context.Done():
				return nil
			case <-time.After(followInterval):
			}
			if f == nil {
				if f, err = os.Open(s.LogPath(rec.Name)); err != nil {
					f = nil
				} else {
					defer f.Close()
				}
			}
		}
	},
}
