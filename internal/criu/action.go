package criu

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// CRIU's action scripts, bridged to ferry: CRIU runs `--action-script
// PATH` at fixed points of a dump (pre-dump, network-lock, post-dump, ...)
// with the point's name in CRTOOLS_SCRIPT_ACTION, and waits for it. The
// one that matters is post-dump: every image is written, the tree is still
// seized and its TCP connections are still locked, and the script's exit
// status decides what CRIU does next: 0 lets CRIU finish as asked (kill
// the tree, with its sockets still in repair mode, so peers see neither a
// FIN nor a RST), anything else rolls back (unlock, let the tree go).
//
// That is the moment a migration source must wait for the destination's
// verdict. CRIU gives the script no arguments, so the script is the ferry
// binary itself, told by ActionSocketEnv (which CRIU passes on) where the
// waiting ferry listens; the hook sends the action's name and exits with
// the status ferry answers.

// ActionSocketEnv names the environment variable that makes a ferry
// started by CRIU act as its action script.
const ActionSocketEnv = "FERRY_CRIU_ACTION_SOCKET"

// actionEnv is CRIU's variable with the action's name.
const actionEnv = "CRTOOLS_SCRIPT_ACTION"

// ActionSocket is the socket name, in the images directory.
const ActionSocket = "ferry-action.sock"

// IsActionHook reports whether this process was started by CRIU as
// ferry's action script.
func IsActionHook() bool {
	return os.Getenv(ActionSocketEnv) != "" && os.Getenv(actionEnv) != ""
}

// ActionHookMain is the body of the action script: it forwards the action
// to the ferry listening on ActionSocketEnv and exits with its answer.
// Actions other than post-dump need no answer and pass at once.
func ActionHookMain() {
	action := os.Getenv(actionEnv)
	if action != "post-dump" {
		os.Exit(0)
	}
	c, err := net.Dial("unix", os.Getenv(ActionSocketEnv))
	if err != nil {
		fmt.Fprintf(os.Stderr, "ferry action hook: %v\n", err)
		os.Exit(1)
	}
	if _, err := fmt.Fprintf(c, "%s\n", action); err != nil {
		os.Exit(1)
	}
	// No deadline: the verdict may wait for a whole restore on another
	// host. If ferry dies, the connection closes and CRIU rolls back.
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil || strings.TrimSpace(line) != "ok" {
		os.Exit(1)
	}
	os.Exit(0)
}

// Actions listens for ferry's action hook.
type Actions struct {
	ln   *net.UnixListener
	path string
	dir  string
	wg   sync.WaitGroup
}

// ActionScript is the script CRIU runs, in the images directory: it
// passes every action but post-dump at once and runs ferry for that one.
// CRIU runs its action script at each point, pre-dump included, which
// comes after the freeze: a shell that exits costs a few milliseconds
// where starting ferry costs tens, and they are the job's downtime.
const ActionScript = "ferry-action.sh"

// ListenActions listens on dir's action socket.
func ListenActions(dir string) (*Actions, error) {
	ln, err := listenIn(dir, ActionSocket, "criu's action hook")
	if err != nil {
		return nil, err
	}
	return &Actions{ln: ln, path: ln.Addr().String(), dir: dir}, nil
}

// HookArgs are the criu arguments and environment that install the hook
// (and write its script).
func (a *Actions) HookArgs() (args, env []string, err error) {
	self, err := os.Executable()
	if err != nil {
		return nil, nil, fmt.Errorf("finding ferry's own binary for criu's action hook: %w", err)
	}
	script := filepath.Join(a.dir, ActionScript)
	body := fmt.Sprintf("#!/bin/sh\n# ferry's CRIU action hook: only post-dump needs ferry.\n[ \"$%s\" = post-dump ] || exit 0\nexec %s\n",
		actionEnv, shellQuote(self))
	if err := os.WriteFile(script, []byte(body), 0o700); err != nil {
		return nil, nil, fmt.Errorf("writing criu's action script: %w", err)
	}
	return []string{"--action-script", script}, []string{ActionSocketEnv + "=" + a.path}, nil
}

// shellQuote quotes s for sh.
func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// Serve answers every action with handle's verdict (nil is "go on") until
// ctx ends or Close.
func (a *Actions) Serve(ctx context.Context, handle func(action string) error) {
	stop := context.AfterFunc(ctx, func() { _ = a.ln.Close() })
	defer stop()
	for {
		c, err := a.ln.AcceptUnix()
		if err != nil {
			return
		}
		a.wg.Go(func() {
			defer c.Close()
			_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
			line, err := bufio.NewReader(c).ReadString('\n')
			if err != nil {
				return
			}
			_ = c.SetReadDeadline(time.Time{})
			verdict := "no"
			if handle(strings.TrimSpace(line)) == nil {
				verdict = "ok"
			}
			_, _ = fmt.Fprintf(c, "%s\n", verdict)
		})
	}
}

// Close stops listening and waits for answers in progress.
func (a *Actions) Close() error {
	err := a.ln.Close()
	a.wg.Wait()
	if errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}
