package criu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
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
	// Cgroup, a cgroup v2 directory, is where CRIU starts (clone3 with
	// CLONE_INTO_CGROUP): what Started would do for a cgroup, without
	// the gate.
	Cgroup string
}

// Run runs c and waits for CRIU to exit; a failure carries CRIU's stderr,
// a cancelled ctx kills CRIU.
func (c Command) Run(ctx context.Context) error {
	r, err := c.start(ctx)
	if err != nil {
		return err
	}
	return r.wait(ctx)
}

// Daemon is a CRIU that keeps working after it has told us it is ready:
// a lazy dump serving its pages, or the lazy-pages daemon.
type Daemon struct {
	r    *running
	done chan struct{}
	err  error
}

// StartReady starts c with a --status-fd and returns once CRIU writes its
// ready byte (after a lazy dump has written every image but memory and
// serves pages; once the lazy-pages daemon listens). If CRIU exits first,
// the error is its failure. CRIU is not tied to ctx after that: a daemon
// is stopped with Kill or by closing what it serves.
func (c Command) StartReady(ctx context.Context) (*Daemon, error) {
	statusR, statusW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	defer statusR.Close()
	c.Args = append(append([]string{}, c.Args...), "--status-fd", strconv.Itoa(int(ExtraFD(len(c.ExtraFiles)))))
	c.ExtraFiles = append(append([]*os.File{}, c.ExtraFiles...), statusW)
	r, err := c.start(context.WithoutCancel(ctx))
	statusW.Close()
	if err != nil {
		return nil, err
	}
	d := &Daemon{r: r, done: make(chan struct{})}
	go func() {
		d.err = r.wait(context.Background())
		close(d.done)
	}()
	ready := make(chan bool, 1)
	go func() {
		var b [1]byte
		n, _ := statusR.Read(b[:])
		ready <- n == 1
	}()
	select {
	case ok := <-ready:
		if ok {
			return d, nil
		}
		<-d.done
		if d.err == nil {
			d.err = fmt.Errorf("criu %s exited without becoming ready", c.Args[0])
		}
		return nil, d.err
	case <-ctx.Done():
		d.Kill()
		<-d.done
		return nil, ctx.Err()
	}
}

// Pid is CRIU's process id.
func (d *Daemon) Pid() int { return d.r.cmd.Process.Pid }

// Done is closed when CRIU has exited.
func (d *Daemon) Done() <-chan struct{} { return d.done }

// Wait waits for CRIU to exit and returns its failure, if any.
func (d *Daemon) Wait() error { <-d.done; return d.err }

// Kill ends CRIU at once.
func (d *Daemon) Kill() { _ = d.r.cmd.Process.Kill() }

type running struct {
	cmd    *exec.Cmd
	stderr *strings.Builder
	verb   string
}

// start starts CRIU: straight away, in c.Cgroup if set; or, when
// Started must run first, behind the gate, releasing it after Started.
// The gate is a whole ferry process (~30 ms to start here), so it is
// avoided where it can be: that time is the job's downtime.
func (c Command) start(ctx context.Context) (*running, error) {
	if c.Started == nil {
		return c.startDirect(ctx)
	}
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("finding ferry's own binary for the criu gate: %w", err)
	}
	gateR, gateW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	defer gateW.Close()
	cmd := exec.CommandContext(ctx, self, append([]string{GateArg, c.Path}, c.Args...)...)
	cmd.ExtraFiles = append([]*os.File{gateR}, c.ExtraFiles...)
	cmd.WaitDelay = 5 * time.Second
	r := c.running(cmd)
	err = cmd.Start()
	gateR.Close()
	if err != nil {
		return nil, fmt.Errorf("starting criu: %w", err)
	}
	if c.Started != nil {
		if err := c.Started(cmd.Process.Pid); err != nil {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
			return nil, err
		}
	}
	if _, err := gateW.Write([]byte{1}); err != nil {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		return nil, fmt.Errorf("releasing criu: %w", err)
	}
	return r, nil
}

// startDirect starts CRIU without the gate. ExtraFiles keep the numbers
// ExtraFD gives them: /dev/null stands in at the gate's descriptor.
func (c Command) startDirect(ctx context.Context) (*running, error) {
	null, err := os.Open(os.DevNull)
	if err != nil {
		return nil, err
	}
	defer null.Close()
	cmd := exec.CommandContext(ctx, c.Path, c.Args...)
	cmd.ExtraFiles = append([]*os.File{null}, c.ExtraFiles...)
	cmd.WaitDelay = 5 * time.Second
	if c.Cgroup != "" {
		cg, err := os.Open(c.Cgroup)
		if err != nil {
			return nil, fmt.Errorf("opening cgroup %s for criu: %w", c.Cgroup, err)
		}
		defer cg.Close()
		cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cg.Fd())}
	}
	r := c.running(cmd)
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting criu: %w", err)
	}
	return r, nil
}

// running prepares cmd, which runs c, to be waited for: its stderr is
// kept to explain a failure.
func (c Command) running(cmd *exec.Cmd) *running {
	r := &running{cmd: cmd, stderr: &strings.Builder{}, verb: "criu"}
	if len(c.Args) > 0 {
		r.verb += " " + c.Args[0]
	}
	cmd.Stderr = r.stderr
	return r
}

// wait waits for CRIU and explains its failure.
func (r *running) wait(ctx context.Context) error {
	err := r.cmd.Wait()
	if err == nil {
		return nil
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	var ee *exec.ExitError
	if msg := cleanOutput(r.stderr.String()); msg != "" && errors.As(err, &ee) {
		return fmt.Errorf("%s: %w: %s", r.verb, err, firstLine(msg))
	}
	return fmt.Errorf("%s: %w", r.verb, err)
}
