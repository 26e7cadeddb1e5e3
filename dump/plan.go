package dump

import (
	"fmt"
	"slices"
	"strings"

	pb "github.com/ferry-cr/ferry/proto"
)

// Plan is what the walk concludes: the CRIU options the tree needs and
// what stands in the way of checkpointing it (a proto message, carried as
// it is in the checkpoint's manifest).
type Plan = pb.Plan

// Finding is one thing in the tree that a checkpoint must know about.
type Finding = pb.Finding

// FindingString is f for people: "pid N: what: why (allow with --flag)".
func FindingString(f *Finding) string {
	s := fmt.Sprintf("pid %d: %s: %s", f.Pid, f.What, f.Reason)
	if f.Flag != "" {
		s += " (allow with " + f.Flag + ")"
	}
	return s
}

// Allowed are the permissions the user gave on the command line.
type Allowed struct {
	TCPEstablished bool
	ExtUnixSk      bool
	FileLocks      bool
}

// harmlessDevices are character devices CRIU reopens by path without
// trouble.
var harmlessDevices = map[string]bool{"/dev/null": true, "/dev/zero": true, "/dev/urandom": true, "/dev/random": true, "/dev/full": true}

// MakePlan derives the plan for inv given what the user allowed.
func MakePlan(inv *Inventory, allow Allowed) *Plan {
	p := &Plan{TcpEstablished: allow.TCPEstablished, ExtUnixSk: allow.ExtUnixSk, FileLocks: allow.FileLocks}
	need := func(f *Finding, allowed bool) {
		if !allowed {
			p.Needs = append(p.Needs, f)
		}
	}
	for _, s := range inv.Sockets {
		switch {
		case strings.HasPrefix(s.Family, "tcp") && s.State == "established":
			peer := "a peer outside the tree"
			if s.PeerInTree {
				peer = "a peer inside the tree"
			}
			need(&Finding{Pid: s.Pid, What: fmt.Sprintf("TCP connection %s -> %s", s.Local, s.Remote),
				Reason: "established TCP connection to " + peer, Flag: "--tcp-established"}, allow.TCPEstablished)
			p.TcpEstablished = p.TcpEstablished || allow.TCPEstablished
		case s.Family == "unix" && s.PeerInode != 0 && !s.PeerInTree && s.Type == "dgram":
			need(&Finding{Pid: s.Pid, What: fmt.Sprintf("unix socket fd %d", s.Fd),
				Reason: "a datagram socket connected to a process outside the tree (restored connected to the same address)", Flag: "--ext-unix-sk"}, allow.ExtUnixSk)
		case s.Family == "unix" && s.PeerInode != 0 && !s.PeerInTree:
			// CRIU carries only both ends of a stream connection: with
			// --ext-unix-sk it fails ("Can't dump half of stream unix
			// connection"), so no flag is named.
			kind := s.Type
			if kind == "" {
				kind = "stream"
			}
			p.Blockers = append(p.Blockers, &Finding{Pid: s.Pid, What: fmt.Sprintf("unix socket fd %d (%s)", s.Fd, kind),
				Reason: "a " + kind + " connection to a process outside the tree, whose end CRIU cannot carry: have the peer disconnect first (or checkpoint it with the tree)"})
		case s.Family == "netlink" || s.Family == "other":
			// CRIU carries netlink sockets of common protocols; nothing to ask.
		}
	}
	if inv.FileLocks > 0 {
		need(&Finding{Pid: inv.Root, What: fmt.Sprintf("%d file locks", inv.FileLocks),
			Reason: "the tree holds file locks, safe only if nothing outside it uses those files", Flag: "--file-locks"}, allow.FileLocks)
	}
	if ipc := inv.GetIpc(); (ipc.GetShm()+ipc.GetSem()+ipc.GetMsg()) > 0 && !inv.OwnIpcNamespace {
		p.Blockers = append(p.Blockers, &Finding{Pid: inv.Root, What: "SysV IPC objects",
			Reason: "the tree uses the host's IPC namespace, whose objects CRIU does not carry; start it under ferry run"})
	}
	rootSID := int32(0)
	for _, t := range inv.Tasks {
		if t.Pid == inv.Root {
			rootSID = t.Sid
		}
	}
	for _, t := range inv.Tasks {
		shared := map[string]bool{}
		for _, m := range t.Maps {
			if m.Kind == "shared-file" && m.Path != "" {
				shared[m.Path] = true
			}
		}
		for _, fd := range t.Fds {
			if shared[fd.Target] && slices.ContainsFunc(fd.Locks, func(l string) bool { return strings.HasPrefix(l, "POSIX") }) {
				p.Blockers = append(p.Blockers, &Finding{Pid: t.Pid, What: fmt.Sprintf("fd %d (%s)", fd.Num, fd.Target),
					Reason: "a POSIX lock on a file the task also maps shared (SQLite's WAL index, say), which CRIU 4.2 loses on restore (it closes the mapping's descriptor, and that drops the lock); SQLite's exclusive locking mode avoids it"})
			}
			switch fd.Kind {
			case "io_uring", "bpf-map", "bpf-prog", "perf_event", "userfaultfd":
				p.Blockers = append(p.Blockers, &Finding{Pid: t.Pid, What: fmt.Sprintf("fd %d (%s)", fd.Num, fd.Target),
					Reason: fd.Kind + " cannot be checkpointed by CRIU"})
			case "device":
				if !harmlessDevices[fd.Target] {
					p.Blockers = append(p.Blockers, &Finding{Pid: t.Pid, What: fmt.Sprintf("fd %d (%s)", fd.Num, fd.Target),
						Reason: "device files other than null, zero, random and full hold kernel state CRIU cannot carry"})
				}
			case "fanotify":
				if fd.FsMarks > 0 {
					p.Blockers = append(p.Blockers, &Finding{Pid: t.Pid, What: fmt.Sprintf("fd %d (%s)", fd.Num, fd.Target),
						Reason: "a fanotify mark on a whole filesystem (FAN_MARK_FILESYSTEM), which CRIU does not carry (marks on files, directories and mounts it does)"})
				}
			case "eventfd":
				if fd.Semaphore {
					p.Blockers = append(p.Blockers, &Finding{Pid: t.Pid, What: fmt.Sprintf("fd %d (%s)", fd.Num, fd.Target),
						Reason: "an eventfd in semaphore mode (EFD_SEMAPHORE), which CRIU 4.2 restores without the flag: each read would then take the whole count"})
				}
			case "timerfd":
				if fd.Periodic {
					p.Blockers = append(p.Blockers, &Finding{Pid: t.Pid, What: fmt.Sprintf("fd %d (%s)", fd.Num, fd.Target),
						Reason: "a periodic timerfd, which CRIU 4.2 restores disarmed: it would never fire again"})
				}
			case "deleted":
				deletedFile(p, t.Pid, fd)
			case "tty":
				p.Notes = append(p.Notes, fmt.Sprintf("pid %d fd %d is a terminal (%s); the restored tree gets it back only if it exists", t.Pid, fd.Num, fd.Target))
			}
		}
		if t.Tracer != 0 {
			p.Blockers = append(p.Blockers, &Finding{Pid: t.Pid, What: fmt.Sprintf("a task traced by pid %d", t.Tracer),
				Reason: "CRIU seizes every task with ptrace and cannot take one that another tracer holds (a debugger, strace); detach the tracer first"})
		}
		if t.OtherUser && inv.LacksCapSysResource {
			p.Blockers = append(p.Blockers, &Finding{Pid: t.Pid, What: fmt.Sprintf("a task running as uid %d gid %d", t.Uid, t.Gid),
				Reason: "CRIU must read its resource limits, which the kernel allows for another user's task only with CAP_SYS_RESOURCE, and ferry runs here without it (see ferry doctor); run the tree's tasks as ferry's user or give ferry CAP_SYS_RESOURCE"})
		}
	}
	if rootSID != 0 && rootSID != inv.Root {
		// A ferry job's init leads its own session; a foreign tree
		// started from a shell usually does not.
		p.ShellJob = true
		p.Notes = append(p.Notes, "the tree's session leader is outside it: checkpointing as a shell job")
	}
	return p
}

// defaultGhostLimit is CRIU's own limit on deleted files it carries in
// the images; maxGhostLimit is how far ferry raises it on its own.
const (
	defaultGhostLimit = 1 << 20
	maxGhostLimit     = 1 << 30
)

// deletedFile plans for an open file whose path was removed: CRIU carries
// its content in the checkpoint (a "ghost" file) up to the ghost limit, or
// relinks it when it still has links elsewhere (link-remap).
func deletedFile(p *Plan, pid int32, fd *FD) {
	switch {
	case fd.Links > 0:
		p.LinkRemap = true
		p.Notes = append(p.Notes, fmt.Sprintf("pid %d fd %d (%s) was unlinked but has other links: CRIU relinks it (link-remap)", pid, fd.Num, fd.Target))
	case fd.Blocks > maxGhostLimit:
		p.Blockers = append(p.Blockers, &Finding{Pid: pid, What: fmt.Sprintf("fd %d (%s)", fd.Num, fd.Target),
			Reason: fmt.Sprintf("a deleted file taking %d bytes on disk; ferry carries deleted files of up to %d bytes in a checkpoint", fd.Blocks, maxGhostLimit)})
	case fd.Blocks > defaultGhostLimit:
		// CRIU compares the space the file takes (its blocks, not its
		// apparent size: a sparse file's holes cost nothing and travel
		// as holes) with the limit: leave a MiB of room, in whole MiB.
		p.GhostLimit = max(p.GhostLimit, uint32((fd.Blocks+2<<20-1)&^(1<<20-1)))
		p.Notes = append(p.Notes, fmt.Sprintf("pid %d fd %d (%s) is a deleted file taking %d bytes on disk: it travels inside the checkpoint", pid, fd.Num, fd.Target, fd.Blocks))
	}
}

// Refusal says why a checkpoint the plan p stands for is refused before
// anything is frozen; nil when it is not.
func Refusal(p *Plan) error {
	if len(p.Blockers) == 0 && len(p.Needs) == 0 {
		return nil
	}
	var parts []string
	for _, f := range p.Blockers {
		parts = append(parts, FindingString(f))
	}
	for _, f := range p.Needs {
		parts = append(parts, FindingString(f))
	}
	return fmt.Errorf("%w: %s", ErrNotCheckpointable, strings.Join(parts, "; "))
}
