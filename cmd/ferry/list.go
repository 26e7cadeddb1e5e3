package main

import (
	"encoding/json"
	"fmt"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/ferry-cr/ferry/internal/job"
)

var listCommand = &cli.Command{
	Name:    "list",
	Aliases: []string{"ps"},
	Usage:   "list jobs",
	Flags: []cli.Flag{
		&cli.BoolFlag{Name: "json", Usage: "print JSON"},
	},
	Action: func(c *cli.Context) error {
		if err := exactArgs(c, 0, "no arguments"); err != nil {
			return err
		}
		s, err := registry(c)
		if err != nil {
			return err
		}
		recs, err := s.List()
		if err != nil {
			return err
		}
		views := make([]*job.View, 0, len(recs))
		for _, r := range recs {
			views = append(views, s.Inspect(r))
		}
		if c.Bool("json") {
			enc := json.NewEncoder(c.App.Writer)
			enc.SetIndent("", "  ")
			return enc.Encode(views)
		}
		tw := tabwriter.NewWriter(c.App.Writer, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "NAME\tSTATE\tINIT\tMAIN\tRSS\tAGE\tCOMMAND")
		now := time.Now()
		for _, v := range views {
			state := v.State
			if v.Exit != nil && v.State == "exited" {
				state = "exited (" + v.Exit.String() + ")"
			}
			if v.Operation != "" && v.State != "exited" && v.State != "lost" && v.State != "stale" {
				state = operationState(v.Operation, v.State)
			}
			if v.State == "stale" {
				state = "stale (owner gone)"
			}
			switch m := v.Migration; {
			case m == nil, m.State == "frozen" && v.Operation != "":
				// none, or the migration that wrote it is under way
			case m.State == "frozen" && v.State == "running":
				state += ", an earlier migration may have left a copy there"
			case m.State == "lazy":
				state += ", memory still arriving"
			default:
				state += ", migration in doubt"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", v.Name, state,
				pidOrDash(v.InitPID, v.State), pidOrDash(v.MainPID, v.State),
				humanBytes(v.RSS), humanAge(now.Sub(v.Created)), strings.Join(v.Command, " "))
		}
		if err := tw.Flush(); err != nil {
			return err
		}
		for _, v := range views {
			if m := v.Migration; m != nil {
				fmt.Fprintf(c.App.Writer, "%s: %s; to settle: %s\n", v.Name, m.Note, m.Resolve)
			}
			if v.State == "stale" {
				fmt.Fprintf(c.App.Writer, "%s: the ferry that was starting it (pid %d) is gone; ferry rm %s clears it, and a restore under this name replaces it\n", v.Name, v.OwnerPID, v.Name)
			}
		}
		return nil
	},
}

func pidOrDash(pid int, state string) string {
	if pid <= 0 || state == "exited" || state == "lost" || state == "stale" {
		return "-"
	}
	return fmt.Sprint(pid)
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%dB", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f%ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

func humanAge(d time.Duration) string {
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh", int(d.Hours()))
	}
	return fmt.Sprintf("%dd", int(d.Hours()/24))
}

// operationState is how the table shows a job whose lease an operation
// holds, or whose last operation kept it: "checkpointing", "migrating,
// frozen", or the kept note itself ("post-copy migration: ...").
func operationState(op, state string) string {
	doing := map[string]string{
		"checkpoint": "checkpointing", "migrate": "migrating", "snapshot": "snapshotting",
		"freeze": "freezing", "thaw": "thawing",
	}[op]
	if doing == "" {
		return state + " (" + op + ")"
	}
	if state == "frozen" && op != "freeze" {
		return doing + ", frozen"
	}
	return doing
}
