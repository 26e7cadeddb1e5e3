package dump

import (
	"bufio"
	"cmp"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/ferry-cr/ferry/internal/proc"
	pb "github.com/ferry-cr/ferry/proto"
)

// The walk's findings are proto messages (proto/image.proto), so that a
// checkpoint's manifest carries them as they are; the walk builds them
// directly.
type (
	// Inventory is what the walk found in a process tree, read from /proc
	// before anything is frozen.
	Inventory = pb.Inventory
	Task      = pb.Task      // one process of the tree
	MemTotals = pb.MemTotals // a task's (or the tree's) memory by kind, in bytes
	Mapping   = pb.Mapping   // one memory map of a task, from /proc/PID/smaps
	FD        = pb.FD        // one open file descriptor
	Socket    = pb.Socket    // a socket held by the tree, with its peer when known
	IPC       = pb.IPC       // the SysV IPC objects of the tree's IPC namespace
)

// Walk inventories the tree rooted at root: root and every descendant.
func Walk(root int) (*Inventory, error) {
	pids, err := tree(root)
	if err != nil {
		return nil, err
	}
	inv := &Inventory{Root: int32(root), Memory: &MemTotals{}}
	inv.OwnPidNamespace = nsDiffers(root, "pid")
	inv.OwnIpcNamespace = nsDiffers(root, "ipc")
	inv.LacksCapSysResource = !proc.HasCapability("CapEff", unix.CAP_SYS_RESOURCE)
	sockInodes := map[uint64]*Socket{}
	for _, pid := range pids {
		t, err := readTask(pid)
		if err != nil {
			continue // exited during the walk
		}
		inv.Tasks = append(inv.Tasks, t)
		addMem(inv.Memory, t.Memory)
		for _, fd := range t.Fds {
			if fd.Kind == "socket" {
				if _, ok := sockInodes[fd.Inode]; !ok {
					s := &Socket{Inode: fd.Inode, Pid: int32(pid), Fd: fd.Num, Family: "other"}
					sockInodes[fd.Inode] = s
				}
			}
		}
	}
	if len(inv.Tasks) == 0 {
		return nil, fmt.Errorf("process %d: %w", root, os.ErrNotExist)
	}
	describeSockets(root, sockInodes)
	for _, s := range sockInodes {
		inv.Sockets = append(inv.Sockets, s)
	}
	slices.SortFunc(inv.Sockets, func(a, b *Socket) int { return cmp.Compare(a.Inode, b.Inode) })
	inv.Ipc = countIPC(root)
	inv.FileLocks = int32(countLocks(pids, inv.Tasks))
	return inv, nil
}

// tree lists root and its descendants, parents first.
func tree(root int) ([]int, error) {
	if _, err := proc.ReadStat(root); err != nil {
		return nil, fmt.Errorf("process %d: %w", root, err)
	}
	out := []int{root}
	for i := 0; i < len(out); i++ {
		kids, err := proc.Children(out[i])
		if err != nil {
			continue
		}
		out = append(out, kids...)
	}
	return out, nil
}

func nsDiffers(pid int, ns string) bool {
	a, err1 := os.Readlink(fmt.Sprintf("/proc/%d/ns/%s", pid, ns))
	b, err2 := os.Readlink(fmt.Sprintf("/proc/%d/ns/%s", os.Getpid(), ns))
	return err1 == nil && err2 == nil && a != b
}

func readTask(pid int) (*Task, error) {
	st, err := proc.ReadStat(pid)
	if err != nil {
		return nil, err
	}
	t := &Task{Pid: int32(pid), Ppid: int32(st.PPID), StartTime: st.StartTime, Stopped: st.State == 'T' || st.State == 't'}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return nil, err
	}
	for line := range strings.SplitSeq(string(status), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		f := strings.Fields(v)
		if len(f) == 0 {
			continue
		}
		switch k {
		case "Threads":
			t.Threads = atoi32(f[0])
		case "Uid", "Gid":
			own := os.Getuid()
			id, _ := strconv.ParseUint(f[0], 10, 32)
			if k == "Uid" {
				t.Uid = uint32(id)
			} else {
				t.Gid = uint32(id)
				own = os.Getgid()
			}
			// real, effective, saved (the fs id the kernel does not ask)
			for _, id := range f[:min(3, len(f))] {
				if id != strconv.Itoa(own) {
					t.OtherUser = true
				}
			}
		case "NSpid":
			t.Nspid = atoi32(f[len(f)-1])
		case "NSpgid":
			t.Pgid = atoi32(f[0])
		case "NSsid":
			t.Sid = atoi32(f[0])
		case "TracerPid":
			t.Tracer = atoi32(f[0])
		}
	}
	if cmd, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); err == nil {
		t.Cmdline = strings.Split(strings.TrimRight(string(cmd), "\x00"), "\x00")
	}
	t.Exe, _ = os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
	t.Cwd, _ = os.Readlink(fmt.Sprintf("/proc/%d/cwd", pid))
	t.Maps, t.Memory = readMaps(pid)
	t.Fds = readFDs(pid)
	return t, nil
}

// atoi32 is a decimal field of /proc, 0 when it is not one.
func atoi32(s string) int32 {
	n, _ := strconv.ParseInt(s, 10, 32)
	return int32(n)
}

func addMem(dst *MemTotals, m *MemTotals) {
	dst.Size += m.GetSize()
	dst.Rss += m.GetRss()
	dst.Anonymous += m.GetAnonymous()
	dst.FileRss += m.GetFileRss()
	dst.ShmemRss += m.GetShmemRss()
}

// readMaps parses /proc/PID/smaps into mappings and totals.
func readMaps(pid int) ([]*Mapping, *MemTotals) {
	tot := &MemTotals{}
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		return nil, tot
	}
	defer f.Close()
	var maps []*Mapping
	var cur *Mapping
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		fields := strings.Fields(line)
		if len(fields) >= 5 && strings.Contains(fields[0], "-") && !strings.HasSuffix(fields[0], ":") {
			lo, hi, _ := strings.Cut(fields[0], "-")
			s, _ := strconv.ParseUint(lo, 16, 64)
			e, _ := strconv.ParseUint(hi, 16, 64)
			m := &Mapping{Start: s, End: e, Perms: fields[1]}
			if len(fields) >= 6 {
				m.Path = strings.Join(fields[5:], " ")
			}
			m.Kind = mapKind(m)
			maps = append(maps, m)
			cur = m
			tot.Size += int64(e - s)
			continue
		}
		if cur == nil || len(fields) < 2 {
			continue
		}
		kb, _ := strconv.ParseInt(fields[1], 10, 64)
		switch fields[0] {
		case "Rss:":
			cur.Rss = kb << 10
			tot.Rss += kb << 10
			switch {
			case strings.HasPrefix(cur.Kind, "shared"):
				tot.ShmemRss += kb << 10
			case cur.Kind == "file" || cur.Kind == "deleted":
				tot.FileRss += kb << 10
			}
		case "Anonymous:":
			tot.Anonymous += kb << 10
		}
	}
	return maps, tot
}

func mapKind(m *Mapping) string {
	shared := len(m.Perms) == 4 && m.Perms[3] == 's'
	switch {
	case strings.HasSuffix(m.Path, " (deleted)"):
		return "deleted"
	case strings.HasPrefix(m.Path, "/dev/zero") || strings.HasPrefix(m.Path, "/SYSV"):
		return "shared-anon"
	case strings.HasPrefix(m.Path, "/memfd:"):
		return "memfd"
	case strings.HasPrefix(m.Path, "["):
		return strings.Trim(m.Path, "[]")
	case m.Path == "" && shared:
		return "shared-anon"
	case m.Path == "":
		return "anon"
	case shared:
		return "shared-file"
	}
	return "file"
}

// readFDs classifies every fd of pid by what its /proc link points to.
func readFDs(pid int) []*FD {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil
	}
	var fds []*FD
	for _, e := range entries {
		n, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		target, err := os.Readlink(filepath.Join(dir, e.Name()))
		if err != nil {
			continue
		}
		fd := &FD{Num: int32(n), Target: target, Kind: fdKind(target)}
		if info, err := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%d", pid, n)); err == nil {
			for line := range strings.SplitSeq(string(info), "\n") {
				k, v, _ := strings.Cut(line, ":")
				v = strings.TrimSpace(v)
				switch k {
				case "pos":
					fd.Pos, _ = strconv.ParseInt(v, 10, 64)
				case "flags":
					fd.Flags = v
				case "ino":
					fd.Inode, _ = strconv.ParseUint(v, 10, 64)
				case "lock":
					fd.Locks = append(fd.Locks, lockKey(v))
				case "fanotify sdev":
					fd.FsMarks++
				case "eventfd-semaphore":
					fd.Semaphore = v == "1"
				case "it_interval":
					fd.Periodic = v != "(0, 0)"
				}
			}
		}
		if fd.Kind == "file" || fd.Kind == "dir" || fd.Kind == "fifo" || fd.Kind == "device" || fd.Kind == "tty" || fd.Kind == "deleted" {
			var st unix.Stat_t
			if unix.Stat(filepath.Join(dir, e.Name()), &st) == nil {
				fd.Size = st.Size
				fd.Blocks = st.Blocks * 512
				if fd.Kind == "deleted" {
					fd.Links = st.Nlink
				}
				switch st.Mode & unix.S_IFMT {
				case unix.S_IFIFO:
					fd.Kind = "fifo"
				case unix.S_IFDIR:
					fd.Kind = "dir"
				case unix.S_IFCHR, unix.S_IFBLK:
					if fd.Kind != "tty" {
						fd.Kind = "device"
					}
				}
			}
		}
		if i := strings.Index(target, ":["); i > 0 && strings.HasSuffix(target, "]") {
			fd.Inode, _ = strconv.ParseUint(target[i+2:len(target)-1], 10, 64)
		}
		fds = append(fds, fd)
	}
	return fds
}

func fdKind(target string) string {
	switch {
	case strings.HasPrefix(target, "socket:"):
		return "socket"
	case strings.HasPrefix(target, "pipe:"):
		return "pipe"
	case strings.HasPrefix(target, "anon_inode:"):
		k := strings.Trim(strings.TrimPrefix(target, "anon_inode:"), "[]")
		switch k {
		case "eventfd", "eventpoll", "signalfd", "timerfd", "inotify", "io_uring", "pidfd", "bpf-map", "bpf-prog", "perf_event", "userfaultfd", "fanotify":
			if k == "eventpoll" {
				return "epoll"
			}
			return k
		}
		return "anon"
	case strings.HasPrefix(target, "/memfd:"):
		return "memfd"
	case strings.HasSuffix(target, " (deleted)"):
		return "deleted"
	case strings.HasPrefix(target, "/dev/pts/") || strings.HasPrefix(target, "/dev/tty") || target == "/dev/console" || target == "/dev/ptmx":
		return "tty"
	case strings.HasPrefix(target, "/dev/"):
		return "device"
	case strings.HasPrefix(target, "/"):
		return "file"
	}
	return "anon"
}

// describeSockets fills in family, state and addresses from the tree's
// network namespace (/proc/ROOT/net/*), and unix peers from sock_diag.
func describeSockets(root int, socks map[uint64]*Socket) {
	for _, fam := range []string{"tcp", "tcp6", "udp", "udp6"} {
		f, err := os.Open(fmt.Sprintf("/proc/%d/net/%s", root, fam))
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(f)
		sc.Scan() // header
		for sc.Scan() {
			fl := strings.Fields(sc.Text())
			if len(fl) < 10 {
				continue
			}
			ino, _ := strconv.ParseUint(fl[9], 10, 64)
			s, ok := socks[ino]
			if !ok {
				continue
			}
			s.Family = fam
			s.Local = hexAddr(fl[1])
			s.Remote = hexAddr(fl[2])
			st, _ := strconv.ParseUint(fl[3], 16, 8)
			s.State = tcpState(fam, int(st))
		}
		f.Close()
	}
	if f, err := os.Open(fmt.Sprintf("/proc/%d/net/unix", root)); err == nil {
		sc := bufio.NewScanner(f)
		sc.Scan()
		for sc.Scan() {
			fl := strings.Fields(sc.Text())
			if len(fl) < 7 {
				continue
			}
			ino, _ := strconv.ParseUint(fl[6], 10, 64)
			s, ok := socks[ino]
			if !ok {
				continue
			}
			s.Family = "unix"
			s.Type = map[string]string{"0001": "stream", "0002": "dgram", "0005": "seqpacket"}[fl[4]]
			st, _ := strconv.ParseUint(fl[5], 16, 8)
			s.State = map[uint64]string{1: "unconnected", 2: "connecting", 3: "connected", 4: "disconnecting"}[st]
			if fl[4] == "0001" && st == 1 {
				s.State = "listening"
			}
			if len(fl) >= 8 {
				s.Local = fl[7]
			}
		}
		f.Close()
	}
	if f, err := os.Open(fmt.Sprintf("/proc/%d/net/netlink", root)); err == nil {
		sc := bufio.NewScanner(f)
		sc.Scan()
		for sc.Scan() {
			fl := strings.Fields(sc.Text())
			if len(fl) < 10 {
				continue
			}
			ino, _ := strconv.ParseUint(fl[len(fl)-1], 10, 64)
			if s, ok := socks[ino]; ok {
				s.Family, s.State = "netlink", "protocol "+fl[1]
			}
		}
		f.Close()
	}
	for ino, peer := range unixPeers(root) {
		if s, ok := socks[ino]; ok && peer != 0 {
			s.PeerInode = peer
		}
	}
	// Peers: a unix socket whose peer inode the tree holds; a TCP socket
	// whose reversed address pair is another socket of the tree.
	byPair := map[string]bool{}
	for _, s := range socks {
		if strings.HasPrefix(s.Family, "tcp") {
			byPair[s.Local+"|"+s.Remote] = true
		}
	}
	for _, s := range socks {
		switch {
		case s.Family == "unix" && s.PeerInode != 0:
			_, s.PeerInTree = socks[s.PeerInode]
		case strings.HasPrefix(s.Family, "tcp") && s.State == "established":
			s.PeerInTree = byPair[s.Remote+"|"+s.Local]
		}
	}
}

func hexAddr(s string) string {
	h, p, ok := strings.Cut(s, ":")
	if !ok {
		return s
	}
	b, err := hex.DecodeString(h)
	if err != nil {
		return s
	}
	port, _ := strconv.ParseUint(p, 16, 16)
	// /proc/net prints addresses as host-order 32-bit words.
	for i := 0; i+4 <= len(b); i += 4 {
		binary.BigEndian.PutUint32(b[i:], binary.LittleEndian.Uint32(b[i:]))
	}
	return net.JoinHostPort(net.IP(b).String(), strconv.Itoa(int(port)))
}

func tcpState(fam string, st int) string {
	if strings.HasPrefix(fam, "udp") {
		if st == 1 {
			return "connected"
		}
		return "unconnected"
	}
	names := []string{"", "established", "syn-sent", "syn-recv", "fin-wait1", "fin-wait2", "time-wait", "close", "close-wait", "last-ack", "listen", "closing"}
	if st < len(names) {
		return names[st]
	}
	return strconv.Itoa(st)
}

// unixPeers asks sock_diag (in the tree's network namespace) for the peer
// inode of every unix socket.
func unixPeers(root int) map[uint64]uint64 {
	peers := map[uint64]uint64{}
	_ = inNetns(root, func() error {
		fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		const udiagShowPeer = 0x4
		const unixDiagPeer = 2
		req := make([]byte, 16+24)
		binary.LittleEndian.PutUint32(req[0:], uint32(len(req)))
		binary.LittleEndian.PutUint16(req[4:], 20) // SOCK_DIAG_BY_FAMILY
		binary.LittleEndian.PutUint16(req[6:], unix.NLM_F_REQUEST|unix.NLM_F_DUMP)
		req[16] = unix.AF_UNIX
		binary.LittleEndian.PutUint32(req[20:], 0xffffffff) // all states
		binary.LittleEndian.PutUint32(req[28:], udiagShowPeer)
		binary.LittleEndian.PutUint32(req[32:], 0xffffffff) // cookie
		binary.LittleEndian.PutUint32(req[36:], 0xffffffff)
		if err := unix.Sendto(fd, req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
			return err
		}
		buf := make([]byte, 64<<10)
		for range 10000 {
			n, _, err := unix.Recvfrom(fd, buf, 0)
			if err != nil {
				return err
			}
			msgs, err := syscallParseNetlink(buf[:n])
			if err != nil {
				return err
			}
			for _, m := range msgs {
				if m.typ == unix.NLMSG_DONE || m.typ == unix.NLMSG_ERROR {
					return nil
				}
				// struct unix_diag_msg: family, type, state, pad, ino u32, cookie[2]
				if len(m.data) < 16 {
					continue
				}
				ino := uint64(binary.LittleEndian.Uint32(m.data[4:]))
				attrs := m.data[16:]
				for len(attrs) >= 4 {
					l := int(binary.LittleEndian.Uint16(attrs[0:]))
					t := binary.LittleEndian.Uint16(attrs[2:])
					if l < 4 || l > len(attrs) {
						break
					}
					if t == unixDiagPeer && l >= 8 {
						peers[ino] = uint64(binary.LittleEndian.Uint32(attrs[4:]))
					}
					attrs = attrs[(l+3)&^3:]
				}
			}
		}
		return nil
	})
	return peers
}

type nlMsg struct {
	typ  uint16
	data []byte
}

func syscallParseNetlink(b []byte) ([]nlMsg, error) {
	var out []nlMsg
	for len(b) >= 16 {
		l := int(binary.LittleEndian.Uint32(b[0:]))
		if l < 16 || l > len(b) {
			return out, fmt.Errorf("netlink message of %d bytes in %d", l, len(b))
		}
		out = append(out, nlMsg{typ: binary.LittleEndian.Uint16(b[4:]), data: b[16:l]})
		b = b[(l+3)&^3:]
	}
	return out, nil
}

// inNetns runs fn on a thread that has joined pid's network namespace
// when it differs from ours. The thread is discarded afterwards.
func inNetns(pid int, fn func() error) error {
	if !nsDiffers(pid, "net") {
		return fn()
	}
	return inNamespace(pid, "net", unix.CLONE_NEWNET, fn)
}

// inNamespace runs fn on a locked OS thread that joined pid's namespace
// ns; the thread is never unlocked, so the Go runtime retires it.
func inNamespace(pid int, ns string, flag int, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		f, err := os.Open(fmt.Sprintf("/proc/%d/ns/%s", pid, ns))
		if err != nil {
			errc <- err
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), flag); err != nil {
			errc <- os.NewSyscallError("setns", err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// countIPC counts the SysV IPC objects in the tree's IPC namespace.
func countIPC(root int) *IPC {
	c := &IPC{}
	count := func() error {
		for name, dst := range map[string]*int32{"shm": &c.Shm, "sem": &c.Sem, "msg": &c.Msg} {
			data, err := os.ReadFile("/proc/sysvipc/" + name)
			if err != nil {
				continue
			}
			*dst = int32(max(0, strings.Count(string(data), "\n")-1))
		}
		return nil
	}
	if nsDiffers(root, "ipc") {
		_ = inNamespace(root, "ipc", unix.CLONE_NEWIPC, count)
	} else {
		_ = count()
	}
	return c
}

// countLocks counts the POSIX, OFD and flock locks the tree holds: those
// its fds show (which include a flock lock inherited from a parent outside
// the tree, whose /proc/locks line names that parent) and those
// /proc/locks gives to one of its pids.
func countLocks(pids []int, tasks []*Task) int {
	seen := map[string]bool{}
	for _, t := range tasks {
		for _, fd := range t.Fds {
			for _, l := range fd.Locks {
				seen[l] = true
			}
		}
	}
	if data, err := os.ReadFile("/proc/locks"); err == nil {
		in := map[string]bool{}
		for _, p := range pids {
			in[strconv.Itoa(p)] = true
		}
		for line := range strings.SplitSeq(string(data), "\n") {
			f := strings.Fields(line)
			// "1: POSIX  ADVISORY  WRITE 1234 08:01:1234 0 EOF"; blocked
			// waiters have a "->" field first.
			if len(f) >= 5 && f[1] != "->" && in[f[4]] {
				seen[lockKey(line)] = true
			}
		}
	}
	return len(seen)
}

// lockKey is a lock line of /proc/locks or of an fdinfo without its
// ordinal, with single spaces: the same lock reads the same from both.
func lockKey(line string) string {
	f := strings.Fields(line)
	if len(f) > 0 && strings.HasSuffix(f[0], ":") {
		f = f[1:]
	}
	return strings.Join(f, " ")
}
