package criu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// GateArg is the hidden subcommand of the ferry binary that holds a CRIU
// command line until it is released: Command.Run starts
// `ferry __criu-gate CRIU ARGS...`, lets Started move that process (into
// the cgroup a restored tree must land in, say), then releases it to exec
// CRIU, so CRIU and every task it forks start where they belong.
const GateArg = "__criu-gate"

// gateFD is where the gate reads its release byte.
const gateFD = 3

// GateMain is the body of `ferry __criu-gate CRIU ARGS...`: wait for one
// byte on fd 3, then become CRIU. It never returns.
func GateMain(args []string) {
	gate := os.NewFile(gateFD, "gate")
	var b [1]byte
	if n, _ := gate.Read(b[:]); n != 1 || len(args) == 0 {
		os.Exit(125) // the caller gave up before releasing us
	}
	gate.Close()
	err := unix.Exec(args[0], args, os.Environ())
	fmt.Fprintf(os.Stderr, "ferry: running %s: %v\n", args[0], err)
	os.Exit(126)
}

// Command is one run of the criu command line, for what RPC cannot do
// (--stream).
type Command struct {
	Path string
	Args []string
	// ExtraFiles are inherited at fds 4, 5, ... (see ExtraFD), as with Call.
	ExtraFiles []*os.File
	// Started runs after CRIU's process exists and before CRIU itself
	// starts (it waits behind ferry's gate).
	Started func(pid int) error
}

// Run runs c and waits for CRIU to exit; a failure carries CRIU's stderr,
// a cancelled ctx kills CRIU.
func (c Command) Run(ctx context.Context) error {
	self, err := os.Executable()
	if err != nil {
		return fmt.Errorf("finding ferry's own binary for the criu gate: %w", err)
	}
	gateR, gateW, err := os.Pipe()
	if err != nil {
		return err
	}
	defer gateW.Close()
	cmd := exec.CommandContext(ctx, self, append([]string{GateArg, c.Path}, c.Args...)...)
	cmd.ExtraFiles = append([]*os.File{gateR}, c.ExtraFiles...)
	cmd.WaitDelay = 5 * time.Second
	var stderr strings.Builder
	cmd.Stderr = &stderr
	err = cmd.Start()
	gateR.Close()
	if err != nil {
		return fmt.Errorf("starting criu: %w", err)
	}
	if c.Started != nil {
		if err := c.Started(cmd.Process.Pid); err != nil {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
			return err
		}
	}
	if _, err := gateW.Write([]byte{1}); err != nil {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		return fmt.Errorf("releasing criu: %w", err)
	}
	gateW.Close()
	if err := cmd.Wait(); err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		verb := "criu"
		if len(c.Args) > 0 {
			verb += " " + c.Args[0]
		}
		var ee *exec.ExitError
		if msg := cleanOutput(stderr.String()); msg != "" && errors.As(err, &ee) {
			return fmt.Errorf("%s: %w: %s", verb, err, firstLine(msg))
		}
		return fmt.Errorf("%s: %w", verb, err)
	}
	return nil
}
