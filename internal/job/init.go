package job

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// initRestoreArg makes the init restore a foreign tree instead of
// starting a command: __init --restore CRIU CHECKPOINT WORKDIR STOPPED.
const initRestoreArg = "--restore"

// initRestoreTimeout bounds the init's CRIU restore.
const initRestoreTimeout = 10 * time.Minute

// initRestore prepares the init's mount namespace (private, with a /proc
// of the job's PID namespace, which CRIU needs to restore pids there) and
// has restorer bring the tree back as the init's child.
func initRestore(args []string, restorer InitRestorer) (int, error) {
	if len(args) != 4 || restorer == nil {
		return 0, errors.New("init: bad restore request")
	}
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return 0, fmt.Errorf("making the job's mounts private: %w", err)
	}
	if err := unix.Mount("proc", "/proc", "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return 0, fmt.Errorf("mounting /proc for the job: %w", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), initRestoreTimeout)
	defer cancel()
	return restorer(ctx, InitRestoreRequest{Criu: args[0], Checkpoint: args[1], WorkDir: args[2], Stopped: args[3] == "true", Output: os.Stdout})
}

// forwarded are the signals ferry's init passes on to the job's main
// process; everything else that reaches pid 1 of the namespace is ignored
// by the kernel unless a handler is installed.
var forwarded = []os.Signal{unix.SIGTERM, unix.SIGINT, unix.SIGHUP, unix.SIGUSR1, unix.SIGUSR2}

// InitMain is the body of `ferry-init __init PATH ARGV...`, pid 1 and
// session leader of the job's PID namespace. It waits on fd 3 until the
// shim has put it into the job's cgroup, starts the command, tells the shim
// on fd 4, forwards signals to the command, reaps every orphan of the
// namespace and exits with the command's status (128+signal when the
// command was killed by one). It never returns.
func InitMain(args []string, restorer InitRestorer) {
	if len(args) < 1 {
		fmt.Fprintln(os.Stderr, "ferry-init: no command")
		os.Exit(127)
	}
	// The job starts with fds 0, 1 and 2 only: anything else the init
	// inherited would be dumped with it (a lock held by the caller makes
	// every checkpoint fail), and the ok pipe must not reach the command.
	closeInherited(5)
	unix.CloseOnExec(4)
	goPipe := os.NewFile(3, "go")
	okPipe := os.NewFile(4, "ok")
	line, _ := bufio.NewReader(goPipe).ReadString('\n')
	goPipe.Close()
	if strings.TrimSpace(line) != "go" {
		os.Exit(127)
	}
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, forwarded...)

	var pid int
	if args[0] == initRestoreArg {
		var err error
		if pid, err = initRestore(args[1:], restorer); err != nil {
			fmt.Fprintf(okPipe, "error: %s\n", strings.ReplaceAll(err.Error(), "\n", " "))
			os.Exit(127)
		}
	} else {
		argv := args
		var err error
		pid, err = syscall.ForkExec(argv[0], argv, &syscall.ProcAttr{
			Env:   os.Environ(),
			Files: []uintptr{0, 1, 2},
		})
		if err != nil {
			fmt.Fprintf(okPipe, "error: exec: %q: %s\n", argv[0], err)
			os.Exit(127)
		}
	}
	fmt.Fprintln(okPipe, "ok")
	okPipe.Close()

	go func() {
		for sig := range sigs {
			_ = unix.Kill(pid, sig.(unix.Signal))
		}
	}()
	for {
		var ws unix.WaitStatus
		wpid, err := unix.Wait4(-1, &ws, 0, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			// ECHILD: nothing left to wait for, which cannot happen
			// before the main process has been reaped.
			fmt.Fprintf(os.Stderr, "ferry-init: wait: %s\n", err)
			os.Exit(127)
		}
		if wpid != pid {
			continue // an orphan of the namespace, reaped
		}
		if ws.Signaled() {
			os.Exit(128 + int(ws.Signal()))
		}
		os.Exit(ws.ExitStatus())
	}
}

// cloexecInherited marks every descriptor from 3 on close-on-exec. Go
// opens its own that way, so this touches only those the process
// inherited without the flag; ferry passes descriptors to its children
// only through ExtraFiles, which are unaffected.
func cloexecInherited() {
	if err := unix.CloseRange(3, ^uint(0), unix.CLOSE_RANGE_CLOEXEC); err == nil {
		return
	}
	for _, fd := range openFDs(3) {
		unix.CloseOnExec(fd)
	}
}

// closeInherited closes every descriptor from lo on that lacks
// close-on-exec: in a Go process only inherited ones do (the runtime's
// own and os.Open's carry the flag), so none of the runtime's is touched.
func closeInherited(lo int) {
	for _, fd := range openFDs(lo) {
		if flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err == nil && flags&unix.FD_CLOEXEC == 0 {
			unix.Close(fd)
		}
	}
}

// openFDs lists this process's open descriptors from lo on.
func openFDs(lo int) []int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return nil
	}
	var fds []int
	for _, e := range ents {
		if fd, err := strconv.Atoi(e.Name()); err == nil && fd >= lo {
			fds = append(fds, fd)
		}
	}
	return fds
}
