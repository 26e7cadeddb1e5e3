package main

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/ferry-cr/ferry/internal/job"
)

func newApp() *cli.App {
	app := &cli.App{
		Name:    "ferry",
		Usage:   "checkpoint, restore and migrate Linux process trees",
		Version: versionString(),
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "root", Value: job.DefaultRoot, EnvVars: []string{"FERRY_ROOT"}, Usage: "state directory"},
			&cli.StringFlag{Name: "criu", Usage: "CRIU `BINARY` (default: $FERRY_CRIU, the copy that make deps provisioned, then PATH)"},
			&cli.BoolFlag{Name: "debug", Usage: "log debug messages"},
			&cli.StringFlag{Name: "log", Usage: "write logs to `FILE` instead of stderr"},
			&cli.StringFlag{Name: "log-format", Value: "text", Usage: "log format: text or json"},
			&cli.StringFlag{Name: "cgroup-root", Value: "/sys/fs/cgroup", EnvVars: []string{"FERRY_CGROUP_ROOT"}, Usage: "cgroupfs mount point", Hidden: true},
		},
		Before: setupLogging,
		Action: func(c *cli.Context) error {
			if c.NArg() > 0 {
				return usageError{fmt.Errorf("unknown command %q (ferry --help lists them)", c.Args().First())}
			}
			return cli.ShowAppHelp(c)
		},
		DisableSliceFlagSeparator: true,
		HideHelpCommand:           true,
		Commands: []*cli.Command{
			runCommand,
			listCommand,
			logsCommand,
			killCommand,
			rmCommand,
			freezeCommand,
			thawCommand,
			checkpointCommand,
			restoreCommand,
			inspectCommand,
			verifyCommand,
			snapshotsCommand,
			pruneCommand,
			doctorCommand,
			serveCommand,
			migrateCommand,
		},
		OnUsageError: func(c *cli.Context, err error, isSubcommand bool) error {
			return usageError{err}
		},
		ExitErrHandler: func(*cli.Context, error) {}, // main prints and exits
	}
	for _, cmd := range app.Commands {
		if cmd.OnUsageError == nil {
			cmd.OnUsageError = app.OnUsageError
		}
		checkRequired(cmd)
	}
	return app
}

// checkRequired moves the check of cmd's required flags from urfave/cli,
// which prints the whole help and exits 1, into a Before that says in one
// line what is missing, as a usage error (exit 2).
func checkRequired(cmd *cli.Command) {
	var names []string
	for _, f := range cmd.Flags {
		switch f := f.(type) {
		case *cli.StringFlag:
			if f.Required {
				f.Required, names = false, append(names, f.Name)
			}
		case *cli.IntFlag:
			if f.Required {
				f.Required, names = false, append(names, f.Name)
			}
		case *cli.DurationFlag:
			if f.Required {
				f.Required, names = false, append(names, f.Name)
			}
		case *cli.BoolFlag:
			if f.Required {
				f.Required, names = false, append(names, f.Name)
			}
		}
	}
	if len(names) == 0 {
		return
	}
	before := cmd.Before
	cmd.Before = func(c *cli.Context) error {
		var missing []string
		for _, n := range names {
			if !c.IsSet(n) {
				missing = append(missing, "--"+n)
			}
		}
		if len(missing) > 0 {
			return usageError{fmt.Errorf("%s needs %s", c.Command.Name, strings.Join(missing, " and "))}
		}
		if before != nil {
			return before(c)
		}
		return nil
	}
}

func versionString() string {
	if gitCommit != "" {
		return version + " (" + gitCommit + ")"
	}
	return version
}

func setupLogging(c *cli.Context) error {
	level := slog.LevelInfo
	if c.Bool("debug") {
		level = slog.LevelDebug
	}
	var w io.Writer = os.Stderr
	if path := c.String("log"); path != "" {
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
		if err != nil {
			return fmt.Errorf("opening log file: %w", err)
		}
		w = f
	}
	opts := &slog.HandlerOptions{Level: level}
	var h slog.Handler
	switch c.String("log-format") {
	case "text":
		h = slog.NewTextHandler(w, opts)
	case "json":
		h = slog.NewJSONHandler(w, opts)
	default:
		return usageError{fmt.Errorf("unknown --log-format %q (text or json)", c.String("log-format"))}
	}
	slog.SetDefault(slog.New(h))
	return nil
}

// registry opens the job registry in the state directory named by --root / FERRY_ROOT.
func registry(c *cli.Context) (*job.Registry, error) {
	return job.OpenRegistry(c.String("root"))
}

// exactArgs checks the number of positional arguments.
func exactArgs(c *cli.Context, n int, what string) error {
	if c.NArg() != n {
		return usageError{fmt.Errorf("%s: want %s, got %d arguments", c.Command.Name, what, c.NArg())}
	}
	return nil
}

var errNotRoot = errors.New("ferry must run as root (it creates namespaces and cgroups and drives CRIU)")

func requireRoot() error {
	if os.Geteuid() != 0 {
		return errNotRoot
	}
	return nil
}
