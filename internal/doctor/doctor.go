// Package doctor checks whether this host can checkpoint and restore, and
// what it can do beyond that (post-copy, pre-copy, streaming): the checks
// behind `ferry doctor`.
package doctor

import (
	"context"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"text/tabwriter"

	"golang.org/x/sys/unix"

	"github.com/ferry-cr/ferry/internal/cgroup"
	"github.com/ferry-cr/ferry/internal/criu"
	"github.com/ferry-cr/ferry/internal/proc"
)

// Features ferry asks CRIU about, and what each one decides.
var Features = []string{"mem_dirty_track", "uffd", "uffd-noncoop", "pidfd_store", "network_lock_nftables"}

// Options says where to look.
type Options struct {
	Criu       criu.FindOptions
	CgroupRoot string // default /sys/fs/cgroup
}

// Report is the outcome of every check; it is printed as a table or JSON.
type Report struct {
	Ready    bool     `json:"ready"`
	Problems []string `json:"problems,omitempty"`
	Notes    []string `json:"notes,omitempty"`

	Criu struct {
		Path    string `json:"path,omitempty"`
		Source  string `json:"source,omitempty"`
		Version string `json:"version,omitempty"`
		Error   string `json:"error,omitempty"`
		CheckOK bool   `json:"checkOk"`
		Check   string `json:"check,omitempty"`
	} `json:"criu"`
	Features map[string]bool `json:"features"`
	Cgroup   struct {
		Mode      string `json:"mode,omitempty"`
		V2        string `json:"v2,omitempty"`
		V1Freezer string `json:"v1Freezer,omitempty"`
		JobBase   string `json:"jobBase,omitempty"`
		Error     string `json:"error,omitempty"`
	} `json:"cgroup"`
	Namespaces map[string]bool `json:"namespaces"`
	Kernel     string          `json:"kernel"`
	Root       bool            `json:"root"`
	// CapSysResource says ferry's effective capabilities hold
	// CAP_SYS_RESOURCE. Without it (containers often drop it) CRIU cannot
	// read the resource limits of a task of another user, so such trees
	// are refused; everything else works.
	CapSysResource bool `json:"capSysResource"`
}

// Run performs every check.
func Run(ctx context.Context, opts Options) *Report {
	r := &Report{Features: map[string]bool{}, Namespaces: map[string]bool{}}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		r.Kernel = unix.ByteSliceToString(u.Release[:])
	}
	r.Root = os.Geteuid() == 0
	if !r.Root {
		r.Problems = append(r.Problems, "not running as root: ferry needs it for namespaces, cgroups and CRIU")
	}
	r.CapSysResource = proc.HasCapability("CapEff", unix.CAP_SYS_RESOURCE)
	if !r.CapSysResource {
		note := "no CAP_SYS_RESOURCE: a tree with a task of another user (uid or gid not ferry's) cannot be checkpointed here, and is refused"
		if !proc.HasCapability("CapBnd", unix.CAP_SYS_RESOURCE) {
			// Nothing ferry or root does here can give it back: exec
			// grants only what the bounding set holds.
			note += "; the capability bounding set lacks it too, so no process started from here can have it"
		}
		r.Notes = append(r.Notes, note)
	}

	for _, ns := range []string{"pid", "ipc", "mnt", "net"} {
		_, err := os.Stat("/proc/self/ns/" + ns)
		r.Namespaces[ns] = err == nil
	}
	if !r.Namespaces["pid"] || !r.Namespaces["ipc"] {
		r.Problems = append(r.Problems, "kernel lacks PID or IPC namespaces: jobs cannot run in namespaces of their own")
	}

	root := opts.CgroupRoot
	if root == "" {
		root = cgroup.DefaultRoot
	}
	if l, err := cgroup.DetectLayout(root); err != nil {
		r.Cgroup.Error = err.Error()
		r.Problems = append(r.Problems, "cgroups: "+err.Error())
	} else {
		r.Cgroup.Mode, r.Cgroup.V2, r.Cgroup.V1Freezer = string(l.Mode), l.V2, l.V1Freezer
		if base, v, err := l.FreezerBase(); err != nil {
			r.Cgroup.Error = err.Error()
			r.Problems = append(r.Problems, "cgroups: "+err.Error())
		} else {
			r.Cgroup.JobBase = fmt.Sprintf("%s (v%d)", base, v)
		}
	}

	find := opts.Criu
	find.Fresh = true // the doctor asks CRIU itself, and what it hears is remembered for the next commands
	b, err := criu.Find(ctx, find)
	if err != nil {
		r.Criu.Error = err.Error()
		r.Problems = append(r.Problems, err.Error())
	} else {
		r.Criu.Path, r.Criu.Source, r.Criu.Version = b.Path, b.Source, b.Version.String()
		ok, out, err := b.Check(ctx)
		r.Criu.CheckOK, r.Criu.Check = ok, out
		if !ok {
			msg := "criu check failed"
			if err != nil {
				msg += ": " + err.Error()
			} else if out != "" {
				msg += ": " + lastLine(out)
			}
			r.Problems = append(r.Problems, msg)
		}
		r.Features = b.Features(ctx, Features...)
		r.Features["stream"] = b.HasStream(ctx)
		r.notes()
	}
	r.Ready = len(r.Problems) == 0
	return r
}

func (r *Report) notes() {
	f := r.Features
	if f["mem_dirty_track"] {
		r.Notes = append(r.Notes, "pre-copy migration available (kernel tracks dirty memory)")
	} else {
		r.Notes = append(r.Notes, "pre-copy migration unavailable: kernel has no soft-dirty memory tracking (mem_dirty_track)")
	}
	if f["uffd"] && f["uffd-noncoop"] {
		r.Notes = append(r.Notes, "post-copy migration available (userfaultfd)")
	} else {
		r.Notes = append(r.Notes, "post-copy migration unavailable: kernel lacks userfaultfd (uffd, uffd-noncoop)")
	}
	if !f["stream"] {
		r.Notes = append(r.Notes, "this CRIU was built without --stream: streamed checkpoints unavailable")
	}
	if !f["network_lock_nftables"] {
		r.Notes = append(r.Notes, "no nftables network locking: CRIU falls back to iptables for TCP connections")
	}
	if !runIsTmpfs() {
		r.Notes = append(r.Notes, "/run is not a tmpfs: CRIU keeps no cache of its kernel probe there (/run/criu.kdat), so every CRIU run probes the kernel afresh (50-70 ms each on a small VM, counted in every checkpoint, restore and migration)")
	}
}

// runIsTmpfs says whether /run is a tmpfs, the only place CRIU keeps
// its kernel probe's results (it refuses a cache that could outlive a
// reboot).
func runIsTmpfs() bool {
	var st unix.Statfs_t
	return unix.Statfs("/run", &st) == nil && st.Type == unix.TMPFS_MAGIC
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}

// WriteTable prints the report for people.
func (r *Report) WriteTable(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	mark := func(ok bool) string {
		if ok {
			return "ok"
		}
		return "--"
	}
	row := func(ok bool, what, detail string) { fmt.Fprintf(tw, "%s\t%s\t%s\n", mark(ok), what, detail) }
	row(r.Root, "root", fmt.Sprintf("euid %d", os.Geteuid()))
	row(r.Kernel != "", "kernel", r.Kernel)
	if r.CapSysResource {
		row(true, "CAP_SYS_RESOURCE", "tasks of other users can be checkpointed")
	} else {
		row(false, "CAP_SYS_RESOURCE", "missing: tasks of other users cannot be checkpointed")
	}
	if r.Criu.Error != "" {
		row(false, "criu", r.Criu.Error)
	} else {
		row(true, "criu", fmt.Sprintf("%s %s (%s)", r.Criu.Version, r.Criu.Path, r.Criu.Source))
		row(r.Criu.CheckOK, "criu check", firstLine(r.Criu.Check))
	}
	names := make([]string, 0, len(r.Features))
	for n := range r.Features {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		detail := "supported"
		if !r.Features[n] {
			detail = "not supported"
		}
		row(r.Features[n], "feature "+n, detail)
	}
	if r.Cgroup.Error != "" {
		row(false, "cgroups", r.Cgroup.Error)
	} else {
		detail := r.Cgroup.Mode
		if r.Cgroup.V2 != "" {
			detail += ", v2 at " + r.Cgroup.V2
		}
		if r.Cgroup.V1Freezer != "" {
			detail += ", v1 freezer at " + r.Cgroup.V1Freezer
		}
		row(true, "cgroups", detail)
		row(true, "job cgroups", r.Cgroup.JobBase)
	}
	for _, ns := range []string{"pid", "ipc", "mnt", "net"} {
		row(r.Namespaces[ns], ns+" namespace", "")
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, p := range r.Problems {
		fmt.Fprintf(w, "problem: %s\n", p)
	}
	for _, n := range r.Notes {
		fmt.Fprintf(w, "note: %s\n", n)
	}
	if r.Ready {
		fmt.Fprintln(w, "ready: checkpoint and restore can work here")
	} else {
		fmt.Fprintln(w, "not ready")
	}
	return nil
}

func firstLine(s string) string {
	l, _, _ := strings.Cut(strings.TrimSpace(s), "\n")
	return l
}
