// Command ferry checkpoints, restores and migrates Linux process trees.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"

	"golang.org/x/sys/unix"

	"github.com/ferry-cr/ferry/dump"
	"github.com/ferry-cr/ferry/internal/criu"
	"github.com/ferry-cr/ferry/internal/job"
	"github.com/ferry-cr/ferry/restore"
)

// Set by the Makefile through -ldflags.
var (
	version   = "dev"
	gitCommit = ""
)

func main() {
	// A job's shim and init, the gate CRIU starts behind, and CRIU's
	// action script are this same binary, re-executed.
	if criu.IsActionHook() {
		criu.ActionHookMain()
	}
	if len(os.Args) > 1 {
		switch os.Args[1] {
		case job.ShimArg:
			if len(os.Args) != 4 {
				os.Exit(2)
			}
			os.Exit(job.ShimMain(os.Args[2], os.Args[3], restore.Restorer))
		case job.InitArg:
			job.InitMain(os.Args[2:], restore.InitRestorer)
		case criu.GateArg:
			criu.GateMain(os.Args[2:])
		case dump.GuardianArg:
			os.Exit(dump.GuardianMain(os.Args[2:]))
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), unix.SIGINT, unix.SIGTERM)
	app := newApp()
	err := app.RunContext(ctx, interspersed(app, os.Args))
	stop()
	if err != nil {
		code := exitCode(err)
		if msg := err.Error(); msg != "" {
			fmt.Fprintf(os.Stderr, "ferry: %s%s\n", msg, hint(err))
		}
		os.Exit(code)
	}
}
