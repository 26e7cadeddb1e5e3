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

	"golang.org/x/sys/unix"
)

// CRIU's action scripts, bridged to ferry: CRIU runs `--action-script
// PATH` at fixed points of a dump (pre-dump, network-lock, post-dump, ...)
// with the point's name in CRTOOLS_SCRIPT_ACTION, and waits for it. Two of
// them matter to a migration.
//
// post-dump: every image is written, the tree is still seized and its TCP
// connections are still locked, and the script's exit status decides what
// CRIU does next: 0 lets CRIU finish as asked (kill the tree, with its
// sockets still in repair mode, so peers see neither a FIN nor a RST),
// anything else rolls back (unlock, let the tree go). That is the moment a
// migration source must wait for the destination's verdict. CRIU gives the
// script no arguments, so the script runs the ferry binary itself, told by
// ActionSocketEnv (which CRIU passes on) where the waiting ferry listens;
// the hook sends the action's name and exits with the status ferry answers.
//
// pre-dump: CRIU has started and probed the kernel (kerndat, tens of
// milliseconds when /run/criu.kdat is not cached) and has not yet touched
// the tree. A migration freezes the job's cgroup here rather than before
// starting CRIU, so CRIU's start-up is not the job's downtime; CRIU then
// finds the cgroup frozen and leaves it frozen, as when ferry froze first.
// Starting ferry here would cost what the late freeze saves, so the script
// asks with shell builtins only, through two FIFOs ferry made in the
// directory: it writes "pre-dump" into one and reads the verdict from the
// other. A "no" (ferry could not freeze) fails the script, and CRIU gives
// up before it touches the tree.

// Actions CRIU's script can bridge to Serve.
const (
	ActionPreDump  = "pre-dump"
	ActionPostDump = "post-dump"
)

// ActionSocketEnv names the environment variable that makes a ferry
// started by CRIU act as its action script.
const ActionSocketEnv = "FERRY_CRIU_ACTION_SOCKET"

// actionEnv is CRIU's variable with the action's name.
const actionEnv = "CRTOOLS_SCRIPT_ACTION"

// ActionSocket is the socket name, in the images directory.
const ActionSocket = "ferry-action.sock"

// The pre-dump FIFOs, in the same directory: the script writes the
// action's name into the first and reads ferry's verdict from the second.
const (
	PreDumpAsk    = "ferry-pre-dump.ask"
	PreDumpAnswer = "ferry-pre-dump.answer"
)

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
	if action != ActionPostDump {
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

// Actions answers the actions of CRIU's script that are bridged to ferry.
type Actions struct {
	dir  string
	ln   *net.UnixListener // post-dump; nil when not bridged
	path string
	// ask and answer are ferry's ends of the pre-dump FIFOs (nil when
	// not bridged), both opened read-write and non-blocking, so that
	// ferry's opens never wait for the script. Ferry's is the only write
	// end of answer that lasts (the script holds one only while it opens
	// its read end): a script waiting for a verdict reads EOF, and fails,
	// once ferry has closed it or died.
	ask, answer *os.File

	mu     sync.Mutex
	closed bool
	wg     sync.WaitGroup // answers in progress
}

// ActionScript is the script CRIU runs, in the images directory: it
// passes every action that is not bridged at once, asks ferry through
// the FIFOs at pre-dump and runs ferry only at post-dump. A shell that
// exits costs a few milliseconds where starting ferry costs tens, and
// from pre-dump on they are the job's downtime.
const ActionScript = "ferry-action.sh"

// ListenActions listens on dir's action socket: the script asks ferry at
// post-dump.
func ListenActions(dir string) (*Actions, error) {
	return BridgeActions(dir, ActionPostDump)
}

// BridgeActions prepares dir so that CRIU's action script (see HookArgs)
// asks Serve at each of actions (ActionPreDump, ActionPostDump) and
// passes every other action at once.
func BridgeActions(dir string, actions ...string) (_ *Actions, err error) {
	a := &Actions{dir: dir}
	defer func() {
		if err != nil {
			_ = a.Close()
		}
	}()
	for _, act := range actions {
		switch act {
		case ActionPostDump:
			if a.ln, err = listenIn(dir, ActionSocket, "criu's action hook"); err != nil {
				return nil, err
			}
			a.path = a.ln.Addr().String()
		case ActionPreDump:
			if a.ask, err = makeFIFO(filepath.Join(dir, PreDumpAsk)); err != nil {
				return nil, err
			}
			if a.answer, err = makeFIFO(filepath.Join(dir, PreDumpAnswer)); err != nil {
				return nil, err
			}
		default:
			return nil, fmt.Errorf("criu action %q cannot be bridged", act)
		}
	}
	return a, nil
}

// makeFIFO creates a FIFO and opens it read-write and non-blocking (an
// open that waits for no peer), pollable: a read blocked on it ends when
// the file is closed.
func makeFIFO(path string) (*os.File, error) {
	if err := unix.Mkfifo(path, 0o600); err != nil {
		return nil, fmt.Errorf("creating %s for criu's action hook: %w", path, err)
	}
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		os.Remove(path)
		return nil, fmt.Errorf("opening %s: %w", path, err)
	}
	return os.NewFile(uintptr(fd), path), nil
}

// HookArgs are the criu arguments and environment that install the hook
// (and write its script).
func (a *Actions) HookArgs() (args, env []string, err error) {
	var b strings.Builder
	fmt.Fprintf(&b, "#!/bin/sh\n# ferry's CRIU action hook (internal/criu/action.go): only post-dump runs ferry.\ncase \"$%s\" in\n", actionEnv)
	if a.ask != nil {
		// fd 3 is answer opened for reading only. Opening it read-only
		// would wait for a writer (forever if ferry is gone), so the
		// script first holds it read-write (fd 4, an open that never
		// waits), opens fd 3 and drops fd 4: ferry is then answer's only
		// writer, and read gets EOF once ferry closed it. fd 3 is open
		// before the question is asked, so the verdict cannot be lost.
		answer, ask := shellQuote(filepath.Join(a.dir, PreDumpAnswer)), shellQuote(filepath.Join(a.dir, PreDumpAsk))
		fmt.Fprintf(&b, "%s)\n\texec 4<>%s 3<%s 4>&-\n\techo %s 1<>%s || exit 1\n\tread -r verdict <&3 || exit 1\n\t[ \"$verdict\" = ok ]\n\texit ;;\n",
			ActionPreDump, answer, answer, ActionPreDump, ask)
	}
	if a.ln != nil {
		self, err := os.Executable()
		if err != nil {
			return nil, nil, fmt.Errorf("finding ferry's own binary for criu's action hook: %w", err)
		}
		fmt.Fprintf(&b, "%s)\n\texec %s ;;\nesac\nexit 0\n", ActionPostDump, shellQuote(self))
		env = []string{ActionSocketEnv + "=" + a.path}
	} else {
		b.WriteString("esac\nexit 0\n")
	}
	script := filepath.Join(a.dir, ActionScript)
	if err := os.WriteFile(script, []byte(b.String()), 0o700); err != nil {
		return nil, nil, fmt.Errorf("writing criu's action script: %w", err)
	}
	return []string{"--action-script", script}, env, nil
}

// shellQuote quotes s for sh.
func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// Serve answers every bridged action with handle's verdict (nil is "go
// on") until ctx ends or Close. Actions come one at a time from CRIU, but
// pre-dump and post-dump are answered on goroutines of their own.
func (a *Actions) Serve(ctx context.Context, handle func(action string) error) {
	stop := context.AfterFunc(ctx, a.stopListening)
	defer stop()
	var wg sync.WaitGroup
	if a.ask != nil {
		wg.Go(func() { a.servePreDump(handle) })
	}
	if a.ln != nil {
		wg.Go(func() { a.serveSocket(handle) })
	}
	wg.Wait()
}

// servePreDump answers each question on the ask FIFO on the answer FIFO.
func (a *Actions) servePreDump(handle func(action string) error) {
	r := bufio.NewReader(a.ask)
	for {
		// ferry holds a write end of ask itself: no EOF, the read ends
		// with Close.
		line, err := r.ReadString('\n')
		if err != nil || !a.begin() {
			return
		}
		verdict := "no"
		if handle(strings.TrimSpace(line)) == nil {
			verdict = "ok"
		}
		_, _ = fmt.Fprintf(a.answer, "%s\n", verdict)
		a.wg.Done()
	}
}

// serveSocket answers each connection of ferry's post-dump hook.
func (a *Actions) serveSocket(handle func(action string) error) {
	for {
		c, err := a.ln.AcceptUnix()
		if err != nil {
			return
		}
		if !a.begin() {
			c.Close()
			return
		}
		go func() {
			defer a.wg.Done()
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
		}()
	}
}

// begin counts an answer in progress, unless Close has begun: Close waits
// only for answers that began before it.
func (a *Actions) begin() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed {
		return false
	}
	a.wg.Add(1)
	return true
}

// stopListening stops taking questions; answers in progress go on.
func (a *Actions) stopListening() {
	if a.ln != nil {
		_ = a.ln.Close()
	}
	if a.ask != nil {
		_ = a.ask.Close()
	}
}

// Close stops listening, waits for answers in progress and then closes
// the answer FIFO, so a pre-dump script still waiting fails. Closing
// twice is harmless.
func (a *Actions) Close() error {
	a.mu.Lock()
	a.closed = true
	a.mu.Unlock()
	var err error
	if a.ln != nil {
		if err = a.ln.Close(); errors.Is(err, net.ErrClosed) {
			err = nil
		}
	}
	if a.ask != nil {
		_ = a.ask.Close()
	}
	a.wg.Wait()
	if a.answer != nil {
		_ = a.answer.Close()
	}
	if a.ask != nil {
		_ = os.Remove(filepath.Join(a.dir, PreDumpAsk))
		_ = os.Remove(filepath.Join(a.dir, PreDumpAnswer))
	}
	return err
}
