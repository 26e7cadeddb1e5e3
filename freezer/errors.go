package freezer

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

var (
	// ErrNotExist means the cgroup directory does not exist, or was removed
	// while an operation was under way (ENOENT on open, ENODEV on read or
	// write).
	ErrNotExist = errors.New("cgroup does not exist")
	// ErrNotSupported means the directory has no freezer: no freezer.state
	// (v1), no cgroup.freeze (v2: the root cgroup, or a kernel before 5.2),
	// or it is not a cgroup directory at all.
	ErrNotSupported = errors.New("cgroup has no freezer")
	// ErrFrozenByAncestor means Thaw undid the cgroup's own freeze, but the
	// cgroup stays frozen because an ancestor is frozen (v1
	// freezer.parent_freezing is 1; v2 the parent's cgroup.events says
	// "frozen 1").
	ErrFrozenByAncestor = errors.New("cgroup frozen by an ancestor")
	// errUnableToFreeze is the cause of a FreezeError when the v1 retry
	// budget ran out before the context's deadline.
	errUnableToFreeze = errors.New("unable to freeze")
)

// maxTasksInMessage limits how many tasks FreezeError.Error names.
const maxTasksInMessage = 8

// FreezeError is returned by Freeze when the cgroup could not be frozen. The
// cgroup has been thawed again when the caller sees it (Freeze joins any thaw
// error to it with errors.Join).
type FreezeError struct {
	// Path is the cgroup directory.
	Path string
	// State is the last state read before giving up, usually Freezing;
	// Undefined when the failure came before any read.
	State State
	// Tasks lists the tasks that had not frozen, as far as /proc tells (see
	// Task); it is empty when the failure was not a timeout or when every
	// task looked frozen.
	Tasks []Task
	// Timeout is the time budget that ran out, or 0 if Err is not a
	// timeout.
	Timeout time.Duration
	// Err is the cause: context.DeadlineExceeded, context.Canceled, an I/O
	// error (wrapping ErrNotExist when the cgroup went away), or the
	// package's "unable to freeze" when the v1 retry budget ran out.
	Err error
}

// Task describes a task (thread) that was still not frozen when Freeze gave
// up.
type Task struct {
	// PID is the task's id (a thread id for threads other than the leader).
	PID int
	// State is the state from /proc/PID/status, such as "D (disk sleep)".
	State string
	// Stack holds the first frames of /proc/PID/stack, when readable (root
	// only), without the "[<0>] " prefix, such as "get_signal+0x3b1/0x8a0".
	Stack []string
}

// Error gives one line, for example:
//
//	cgroup "/sys/fs/cgroup/unified/x" did not freeze within 10s: 2 tasks not frozen: 1234 (D disk sleep), 1240 (R running)
func (e *FreezeError) Error() string {
	var b strings.Builder
	if e.Timeout > 0 {
		fmt.Fprintf(&b, "cgroup %q did not freeze within %s", e.Path, e.Timeout)
	} else {
		fmt.Fprintf(&b, "freezing cgroup %q", e.Path)
		if e.Err != nil {
			b.WriteString(": ")
			b.WriteString(e.Err.Error())
		}
	}
	if len(e.Tasks) == 0 {
		return b.String()
	}
	fmt.Fprintf(&b, ": %d %s not frozen: ", len(e.Tasks), plural(len(e.Tasks), "task", "tasks"))
	unparen := strings.NewReplacer("(", "", ")", "")
	for i, t := range e.Tasks {
		if i == maxTasksInMessage {
			fmt.Fprintf(&b, ", and %d more", len(e.Tasks)-i)
			break
		}
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(strconv.Itoa(t.PID))
		if t.State != "" {
			b.WriteString(" (")
			b.WriteString(unparen.Replace(t.State))
			b.WriteString(")")
		}
	}
	return b.String()
}

// Unwrap returns the cause.
func (e *FreezeError) Unwrap() error { return e.Err }

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}
