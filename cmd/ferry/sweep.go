package main

import (
	"log/slog"
	"os"
	"path/filepath"

	"github.com/urfave/cli/v2"

	"github.com/ferry-cr/ferry/internal/scratch"
	"github.com/ferry-cr/ferry/restore"
)

// sweepScratch is the Before of the commands that make scratch space
// (checkpoint, restore, serve, migrate) and of those that clear what
// others left (kill, rm): it removes the scratch directories and files
// (package scratch) that ferry processes killed before they could clean
// up left where ferry makes them: tmpfs, the temporary directory, the
// serve directories, the state directory's job area and, for a
// checkpoint to a file or directory, the output's directory. Only entries
// whose owner is gone go, at the cost of one directory read each; what
// cannot be removed is logged and fails nothing.
func sweepScratch(c *cli.Context) error {
	if os.Geteuid() != 0 {
		return nil // the command itself says it needs root
	}
	root, err := filepath.Abs(c.String("root"))
	if err != nil {
		return nil
	}
	dirs := append(restore.ScratchBases(filepath.Join(root, "serve")), filepath.Join(root, "jobs"))
	if c.Command.Name == "checkpoint" && !c.IsSet("store") {
		out := c.String("output")
		if out == "" {
			out = "x" // JOB.ferry in the working directory
		}
		if out != "-" {
			if abs, err := filepath.Abs(out); err == nil {
				dirs = append(dirs, filepath.Dir(abs))
			}
		}
	}
	for _, d := range dirs {
		removed, err := scratch.Sweep(d)
		if len(removed) > 0 {
			slog.Debug("removed what killed ferry processes left", "dir", d, "removed", removed)
		}
		if err != nil {
			slog.Debug("sweeping scratch space", "dir", d, "err", err)
		}
	}
	return nil
}
