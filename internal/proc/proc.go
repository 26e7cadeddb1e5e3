// Package proc reads the little that ferry needs from /proc: a task's start
// time (to tell a live pid from a reused one), its children, state and
// resident memory.
package proc

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Root is the procfs mount point; tests may point it elsewhere.
var Root = "/proc"

// Stat is the part of /proc/PID/stat that ferry uses.
type Stat struct {
	PID       int
	Comm      string
	State     byte // R, S, D, T, t, Z, X, I ...
	PPID      int
	Flags     uint64 // PF_* flags
	StartTime uint64 // in clock ticks since boot: with PID, a task's identity
}

// PFKthread is the task flag of kernel threads.
const PFKthread = 0x00200000

// ReadStat parses /proc/PID/stat. The command name may contain spaces and
// parentheses, so the fields are split after the last ')'.
func ReadStat(pid int) (*Stat, error) {
	data, err := os.ReadFile(fmt.Sprintf("%s/%d/stat", Root, pid))
	if err != nil {
		return nil, err
	}
	return parseStat(pid, data)
}

func parseStat(pid int, data []byte) (*Stat, error) {
	open := bytes.IndexByte(data, '(')
	end := bytes.LastIndexByte(data, ')')
	if open < 0 || end < open {
		return nil, fmt.Errorf("parsing /proc/%d/stat: no command name", pid)
	}
	fields := strings.Fields(string(data[end+1:]))
	// fields[0] is field 3 (state); start time is field 22.
	if len(fields) < 20 {
		return nil, fmt.Errorf("parsing /proc/%d/stat: %d fields", pid, len(fields)+2)
	}
	st := &Stat{PID: pid, Comm: string(data[open+1 : end]), State: fields[0][0]}
	var err error
	if st.PPID, err = strconv.Atoi(fields[1]); err != nil {
		return nil, fmt.Errorf("parsing /proc/%d/stat ppid: %w", pid, err)
	}
	if st.Flags, err = strconv.ParseUint(fields[6], 10, 64); err != nil {
		return nil, fmt.Errorf("parsing /proc/%d/stat flags: %w", pid, err)
	}
	if st.StartTime, err = strconv.ParseUint(fields[19], 10, 64); err != nil {
		return nil, fmt.Errorf("parsing /proc/%d/stat start time: %w", pid, err)
	}
	return st, nil
}

// Alive reports whether pid is still the task that started at start (a
// value from ReadStat) and has not exited. A zombie counts as gone.
func Alive(pid int, start uint64) bool {
	if pid <= 0 {
		return false
	}
	st, err := ReadStat(pid)
	if err != nil {
		return false
	}
	return st.StartTime == start && st.State != 'Z' && st.State != 'X'
}

// Children lists the children of process pid: of all its threads, since a
// multi-threaded parent (ferry's init is a Go program) may fork from any.
func Children(pid int) ([]int, error) {
	tasks, err := os.ReadDir(fmt.Sprintf("%s/%d/task", Root, pid))
	if err != nil {
		return nil, err
	}
	var kids []int
	for _, t := range tasks {
		data, err := os.ReadFile(fmt.Sprintf("%s/%d/task/%s/children", Root, pid, t.Name()))
		if err != nil {
			continue // the thread exited meanwhile
		}
		for _, f := range strings.Fields(string(data)) {
			n, err := strconv.Atoi(f)
			if err != nil {
				return nil, fmt.Errorf("parsing children of %d: %w", pid, err)
			}
			kids = append(kids, n)
		}
	}
	slices.Sort(kids)
	return kids, nil
}

// RSS returns the resident set size of pid in bytes (VmRSS). Kernel
// threads and zombies have none and report 0.
func RSS(pid int) (int64, error) {
	return kbField(fmt.Sprintf("%s/%d/status", Root, pid), "VmRSS:")
}

// MemAvailable is the memory the kernel estimates is available for new
// work without swapping (MemAvailable of /proc/meminfo), in bytes; 0
// where it cannot say.
func MemAvailable() int64 {
	n, _ := kbField(Root+"/meminfo", "MemAvailable:")
	return n
}

// kbField reads the "key N kB" line of a /proc file, in bytes; 0 if the
// file has no such line.
func kbField(path, key string) (int64, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	for line := range strings.SplitSeq(string(data), "\n") {
		rest, ok := strings.CutPrefix(line, key)
		if !ok {
			continue
		}
		f := strings.Fields(rest)
		if len(f) < 1 {
			break
		}
		kb, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("parsing %s of %s: %w", strings.TrimSuffix(key, ":"), path, err)
		}
		return kb * 1024, nil
	}
	return 0, nil
}

// NSpid returns the pids of pid in each PID namespace it belongs to, the
// host's first and its own namespace's last (the NSpid line of status).
func NSpid(pid int) ([]int, error) {
	data, err := os.ReadFile(fmt.Sprintf("%s/%d/status", Root, pid))
	if err != nil {
		return nil, err
	}
	for line := range strings.SplitSeq(string(data), "\n") {
		rest, ok := strings.CutPrefix(line, "NSpid:")
		if !ok {
			continue
		}
		var pids []int
		for _, f := range strings.Fields(rest) {
			n, err := strconv.Atoi(f)
			if err != nil {
				return nil, fmt.Errorf("parsing NSpid of %d: %w", pid, err)
			}
			pids = append(pids, n)
		}
		return pids, nil
	}
	return nil, errors.New("no NSpid line in status")
}

// TracerPID is the pid of the process that traces pid by ptrace (0: none,
// or pid is gone).
func TracerPID(pid int) int {
	data, err := os.ReadFile(fmt.Sprintf("%s/%d/status", Root, pid))
	if err != nil {
		return 0
	}
	for line := range strings.SplitSeq(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "TracerPid:"); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(v))
			return n
		}
	}
	return 0
}

// Tracers is the set of processes tracing any of pids, by pid.
func Tracers(pids []int) map[int]bool {
	out := map[int]bool{}
	for _, pid := range pids {
		if t := TracerPID(pid); t != 0 {
			out[t] = true
		}
	}
	return out
}

// WaitGone waits until none of pids runs any more (gone or a zombie), or
// until d has passed; it says whether they all went.
func WaitGone(pids map[int]bool, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for {
		left := false
		for pid := range pids {
			if st, err := ReadStat(pid); err == nil && st.State != 'Z' && st.State != 'X' {
				left = true
			}
		}
		if !left {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// HasCapability says whether this process holds capability cap in set
// (CapEff, CapBnd, ... of /proc/self/status).
func HasCapability(set string, cap int) bool {
	data, err := os.ReadFile(Root + "/self/status")
	if err != nil {
		return false
	}
	for line := range strings.SplitSeq(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, set+":"); ok {
			bits, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			return err == nil && bits&(1<<cap) != 0
		}
	}
	return false
}
