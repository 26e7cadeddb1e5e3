package criu

import (
	"bufio"
	"os"
	"strings"
)

// maxQuoted bounds how many lines of CRIU's log an error quotes.
const maxQuoted = 12

// LogErrors returns the lines of a CRIU log that explain a failure: every
// "Error" line with the two lines before it, at most maxQuoted lines, the
// last ones kept. It quotes bytes read from the file, as runc's
// logCriuErrors does. The harmless rlimit complaint of VMs without
// CAP_SYS_RESOURCE is left out.
func LogErrors(path string) []string {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	var window []string
	var out []string
	emitted := -1
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for i := 0; sc.Scan(); i++ {
		line := sc.Text()
		if strings.Contains(line, "RLIMIT_NOFILE") {
			continue // noise on VMs without CAP_SYS_RESOURCE, never the cause
		}
		window = append(window, line)
		if len(window) > 3 {
			window = window[1:]
		}
		if !strings.Contains(line, "Error") {
			continue
		}
		start := i - len(window) + 1
		for j, l := range window {
			if start+j > emitted {
				out = append(out, strings.TrimSpace(l))
			}
		}
		emitted = i
	}
	if len(out) > maxQuoted {
		out = out[len(out)-maxQuoted:]
	}
	return out
}

// hints turn CRIU errors whose cause is known into plain words.
var hints = []struct{ match, say string }{
	{"Can't get rlimit", "a process of the tree runs as another user and CRIU lacks CAP_SYS_RESOURCE here; run the job as root"},
	{"has bad size", "a file the tree has open changed size since the checkpoint; CRIU restores only unchanged files"},
	{"bad size", "a file the tree has open changed since the checkpoint"},
	{"No such file or directory", "a file the tree had open is missing"},
	{"Unexpected rt vDSO area bounds", "this CRIU is too old for this kernel; use CRIU >= 4.2 (make deps)"},
	{"Can't get 1:16 opt", "this CRIU cannot dump TCP sockets on this kernel; use CRIU >= 4.2 (make deps)"},
	{"Connected TCP socket", "the tree has an established TCP connection; pass --tcp-established"},
	{"External socket is used", "a unix socket of the tree is connected outside it; pass --ext-unix-sk"},
	{"Unsupported proto 262", "an MPTCP socket, which CRIU cannot checkpoint (Go >= 1.24 listens with MPTCP by default: run the job with GODEBUG=multipathtcp=0)"},
	{"iptables", "CRIU locks the network of a tree with TCP connections and could not run iptables; ferry uses nftables where the kernel has it"},
	{"Found file lock", "the tree holds file locks; pass --file-locks"},
}

// Error is a CRIU failure with the lines of CRIU's log that explain it.
type Error struct {
	Err   error
	Log   string   // path of CRIU's log
	Lines []string // quoted from the log
}

func (e *Error) Error() string {
	s := e.Err.Error()
	if len(e.Lines) > 0 {
		first := e.Lines[0]
		for _, l := range e.Lines {
			if strings.Contains(l, "Error") {
				first = l
				break
			}
		}
		s += ": " + trimLogPrefix(first)
		for _, h := range hints {
			if strings.Contains(first, h.match) {
				s += " (" + h.say + ")"
				break
			}
		}
	}
	if e.Log != "" {
		s += " [log: " + e.Log + "]"
	}
	return s
}

func (e *Error) Unwrap() error { return e.Err }

// Explain wraps err from a CRIU call with what CRIU's log says.
func Explain(err error, logPath string) error {
	if err == nil {
		return nil
	}
	return &Error{Err: err, Log: logPath, Lines: LogErrors(logPath)}
}

// trimLogPrefix drops the "(00.012345) " timestamp and the "PID: " that
// CRIU puts on log lines.
func trimLogPrefix(l string) string {
	if strings.HasPrefix(l, "(") {
		if i := strings.Index(l, ") "); i > 0 {
			l = l[i+2:]
		}
	}
	l = strings.TrimSpace(l)
	if i := strings.Index(l, ": "); i > 0 && strings.Trim(l[:i], "0123456789") == "" {
		l = l[i+2:]
	}
	return l
}
