package freezer

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// procRoot is where procfs is mounted; tests point it at a fake tree.
var procRoot = "/proc"

const (
	// maxInspectedTasks bounds how many tasks a failed Freeze inspects in
	// /proc (three small reads each).
	maxInspectedTasks = 256
	// maxStackFrames is how many frames of /proc/PID/stack a Task keeps;
	// the top frames show where a task is stuck, as in CRIU's
	// log_unfrozen_stacks.
	maxStackFrames = 8
)

// unfrozenTasks lists the tasks of the cgroup dir that do not look frozen.
// It reads thread ids rather than processes (v1 "tasks", v2
// "cgroup.threads", falling back to "cgroup.procs"), because the freezer
// works per thread and one stuck thread keeps the cgroup from freezing.
//
// Whether a task is frozen is a heuristic over /proc/PID/{status,wchan,stack},
// checked on kernel 6.18:
//
//   - v1: a frozen task is reported as "D (disk sleep)". It either sits in
//     __refrigerator, or, since Linux 6.1 (TASK_FROZEN, commit f5d39b020809
//     "freezer,sched: Rewrite core freezer logic"), was frozen in place in a
//     freezable sleep, keeping that sleep's wchan: seen here were
//     hrtimer_nanosleep (sleep), futex_do_wait (a thread blocked on a futex)
//     and do_signal_stop (a SIGSTOPped task). So a task counts as frozen
//     when its wchan or a stack frame is __refrigerator or one of
//     freezableSleeps; a D task anywhere else is listed, since a real
//     uninterruptible wait (a hung disk, a FUSE server) is the usual
//     reason a v1 freeze never completes; its Stack lets a reader judge.
//     Stopped and traced tasks (T, t) never hold a freeze up and count as
//     frozen; R, S and I do not.
//   - v2: a frozen task parks in do_freezer_trap, inlined into get_signal,
//     in state "S (sleeping)"; stopped and traced tasks (T, t) count as
//     frozen for the kernel too. So a task counts as frozen when its state
//     is T or t, or its wchan or top stack frame is do_freezer_trap or
//     get_signal.
//
// Dead tasks (Z, X) count as frozen on both. Without root, wchan and stack
// may be unreadable and every live task is listed: over-reporting is the
// safer mistake in a diagnostic.
func unfrozenTasks(dir string, version int) []Task {
	var ids []int
	for _, name := range tasksFiles(version) {
		data, err := readCgroupFile(dir, name)
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(data)) {
			if id, err := strconv.Atoi(f); err == nil && id > 0 {
				ids = append(ids, id)
			}
		}
		break
	}
	var tasks []Task
	for i, id := range ids {
		if i == maxInspectedTasks {
			break
		}
		t, wchan := inspectTask(id)
		if t.State == "" {
			continue // exited meanwhile
		}
		if !looksFrozen(version, t, wchan) {
			tasks = append(tasks, t)
		}
	}
	return tasks
}

func tasksFiles(version int) []string {
	if version == 1 {
		return []string{"tasks", "cgroup.procs"}
	}
	return []string{"cgroup.threads", "cgroup.procs"}
}

// inspectTask reads a task's state, wchan and stack. State is empty when the
// task is gone.
func inspectTask(id int) (Task, string) {
	t := Task{PID: id}
	base := filepath.Join(procRoot, strconv.Itoa(id))
	status, err := os.ReadFile(filepath.Join(base, "status"))
	if err != nil {
		return t, ""
	}
	for line := range bytes.Lines(status) {
		if v, ok := bytes.CutPrefix(line, []byte("State:")); ok {
			t.State = string(bytes.TrimSpace(v))
			break
		}
	}
	var wchan string
	if data, err := os.ReadFile(filepath.Join(base, "wchan")); err == nil {
		wchan = strings.TrimSpace(string(data))
	}
	if data, err := os.ReadFile(filepath.Join(base, "stack")); err == nil {
		for line := range strings.Lines(string(data)) {
			if len(t.Stack) == maxStackFrames {
				break
			}
			// "[<0>] get_signal+0x3b1/0x8a0"
			frame := strings.TrimSpace(line)
			if _, after, ok := strings.Cut(frame, "] "); ok {
				frame = after
			}
			if frame != "" {
				t.Stack = append(t.Stack, frame)
			}
		}
	}
	return t, wchan
}

// freezableSleeps are the wchan names of sleeps in which the v1 freezer
// (Linux 6.1+) freezes a task in place (TASK_FREEZABLE, or a stopped or
// traced task), under the names kernels from 5.x to 6.18 give them. The
// list is not complete: a frozen task missing from it is listed as not
// frozen, which only adds noise to a failure report.
var freezableSleeps = map[string]bool{
	"__refrigerator":    true,
	"do_nanosleep":      true,
	"hrtimer_nanosleep": true,
	"futex_wait_queue":  true,
	"futex_do_wait":     true,
	"do_signal_stop":    true,
	"ptrace_stop":       true,
}

// looksFrozen applies the heuristic described at unfrozenTasks.
func looksFrozen(version int, t Task, wchan string) bool {
	var letter byte
	if t.State != "" {
		letter = t.State[0]
	}
	switch letter {
	case 'Z', 'X', 'T', 't':
		return true
	}
	funcName := func(frame string) string {
		name, _, _ := strings.Cut(frame, "+")
		return name
	}
	if version == 1 {
		if letter != 'D' {
			return false
		}
		if freezableSleeps[wchan] {
			return true
		}
		for _, f := range t.Stack {
			if fn := funcName(f); fn == "__refrigerator" {
				return true
			}
		}
		return len(t.Stack) > 0 && freezableSleeps[funcName(t.Stack[0])]
	}
	trap := func(fn string) bool { return fn == "do_freezer_trap" || fn == "get_signal" }
	if trap(wchan) {
		return true
	}
	return len(t.Stack) > 0 && trap(funcName(t.Stack[0]))
}
