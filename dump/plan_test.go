package dump

import (
	"errors"
	"strings"
	"testing"
)

func TestMakePlan(t *testing.T) {
	base := func() *Inventory {
		return &Inventory{Root: 10, OwnPidNamespace: true, OwnIpcNamespace: true,
			Tasks: []*Task{{Pid: 10, Sid: 10, Fds: []*FD{{Num: 0, Kind: "device", Target: "/dev/null"}}}}}
	}
	for _, tc := range []struct {
		name    string
		mod     func(*Inventory)
		allow   Allowed
		refused string // substring of the refusal, "" = checkpointable
		check   func(*testing.T, *Plan)
	}{
		{name: "plain tree", mod: func(*Inventory) {}},
		{name: "established TCP needs the flag", mod: func(i *Inventory) {
			i.Sockets = []*Socket{{Pid: 10, Family: "tcp", State: "established", Local: "127.0.0.1:1", Remote: "127.0.0.1:2"}}
		}, refused: "--tcp-established"},
		{name: "established TCP allowed", mod: func(i *Inventory) {
			i.Sockets = []*Socket{{Pid: 10, Family: "tcp", State: "established"}}
		}, allow: Allowed{TCPEstablished: true}, check: func(t *testing.T, p *Plan) {
			if !p.TcpEstablished {
				t.Error("plan does not ask CRIU for tcp-established")
			}
		}},
		{name: "a semaphore eventfd is refused (CRIU drops the flag)", mod: func(i *Inventory) {
			i.Tasks[0].Fds = append(i.Tasks[0].Fds, &FD{Num: 5, Kind: "eventfd", Target: "anon_inode:[eventfd]", Semaphore: true})
		}, refused: "semaphore"},
		{name: "a plain eventfd is fine", mod: func(i *Inventory) {
			i.Tasks[0].Fds = append(i.Tasks[0].Fds, &FD{Num: 5, Kind: "eventfd", Target: "anon_inode:[eventfd]"})
		}},
		{name: "a periodic timerfd is refused (CRIU restores it disarmed)", mod: func(i *Inventory) {
			i.Tasks[0].Fds = append(i.Tasks[0].Fds, &FD{Num: 6, Kind: "timerfd", Target: "anon_inode:[timerfd]", Periodic: true})
		}, refused: "periodic timerfd"},
		{name: "a one-shot timerfd is fine", mod: func(i *Inventory) {
			i.Tasks[0].Fds = append(i.Tasks[0].Fds, &FD{Num: 6, Kind: "timerfd", Target: "anon_inode:[timerfd]"})
		}},
		{name: "a POSIX lock on a file mapped shared is refused", mod: func(i *Inventory) {
			i.Tasks[0].Maps = []*Mapping{{Kind: "shared-file", Path: "/db-shm"}}
			i.Tasks[0].Fds = append(i.Tasks[0].Fds, &FD{Num: 7, Kind: "file", Target: "/db-shm", Locks: []string{"POSIX  ADVISORY  READ 10 00:2a:99 128 128"}})
		}, allow: Allowed{FileLocks: true}, refused: "maps shared"},
		{name: "a lock on a file not mapped is fine", mod: func(i *Inventory) {
			i.Tasks[0].Maps = []*Mapping{{Kind: "shared-file", Path: "/other"}}
			i.Tasks[0].Fds = append(i.Tasks[0].Fds, &FD{Num: 7, Kind: "file", Target: "/db", Locks: []string{"POSIX  ADVISORY  WRITE 10 00:2a:98 0 EOF"}})
		}, allow: Allowed{FileLocks: true}},
		{name: "a traced task is refused", mod: func(i *Inventory) {
			i.Tasks[0].Tracer = 4242
		}, refused: "traced by pid 4242"},
		{name: "listening TCP is fine", mod: func(i *Inventory) {
			i.Sockets = []*Socket{{Pid: 10, Family: "tcp", State: "listen"}}
		}},
		{name: "unix datagram peer outside", mod: func(i *Inventory) {
			i.Sockets = []*Socket{{Pid: 10, Fd: 3, Family: "unix", Type: "dgram", State: "connected", PeerInode: 99}}
		}, refused: "--ext-unix-sk"},
		{name: "unix datagram peer outside allowed", mod: func(i *Inventory) {
			i.Sockets = []*Socket{{Pid: 10, Fd: 3, Family: "unix", Type: "dgram", State: "connected", PeerInode: 99}}
		}, allow: Allowed{ExtUnixSk: true}},
		{name: "unix stream peer outside: no flag helps", mod: func(i *Inventory) {
			i.Sockets = []*Socket{{Pid: 10, Fd: 3, Family: "unix", Type: "stream", State: "connected", PeerInode: 99}}
		}, allow: Allowed{ExtUnixSk: true}, refused: "stream connection"},
		{name: "unix peer inside", mod: func(i *Inventory) {
			i.Sockets = []*Socket{{Pid: 10, Family: "unix", PeerInode: 99, PeerInTree: true}}
		}},
		{name: "file locks", mod: func(i *Inventory) { i.FileLocks = 2 }, refused: "--file-locks"},
		{name: "io_uring", mod: func(i *Inventory) {
			i.Tasks[0].Fds = append(i.Tasks[0].Fds, &FD{Num: 5, Kind: "io_uring", Target: "anon_inode:[io_uring]"})
		}, allow: Allowed{TCPEstablished: true, ExtUnixSk: true, FileLocks: true}, refused: "io_uring"},
		{name: "device", mod: func(i *Inventory) {
			i.Tasks[0].Fds = append(i.Tasks[0].Fds, &FD{Num: 6, Kind: "device", Target: "/dev/kvm"})
		}, refused: "/dev/kvm"},
		{name: "SysV IPC in the host namespace", mod: func(i *Inventory) {
			i.OwnIpcNamespace = false
			i.Ipc = &IPC{Shm: 1}
		}, refused: "IPC namespace"},
		{name: "small deleted file", mod: func(i *Inventory) {
			i.Tasks[0].Fds = append(i.Tasks[0].Fds, &FD{Num: 7, Kind: "deleted", Target: "/tmp/x (deleted)", Size: 4096, Blocks: 4096})
		}, check: func(t *testing.T, p *Plan) {
			if p.GhostLimit != 0 || p.LinkRemap {
				t.Errorf("plan for a small deleted file: %+v", p)
			}
		}},
		{name: "large deleted file raises the ghost limit", mod: func(i *Inventory) {
			i.Tasks[0].Fds = append(i.Tasks[0].Fds, &FD{Num: 7, Kind: "deleted", Target: "/tmp/x (deleted)", Size: 5 << 20, Blocks: 5 << 20})
		}, check: func(t *testing.T, p *Plan) {
			if p.GhostLimit < 5<<20+4096 {
				t.Errorf("ghost limit %d, want room for a 5 MiB file and its last block", p.GhostLimit)
			}
		}},
		{name: "deleted file linked elsewhere", mod: func(i *Inventory) {
			i.Tasks[0].Fds = append(i.Tasks[0].Fds, &FD{Num: 7, Kind: "deleted", Target: "/tmp/x (deleted)", Size: 5 << 20, Blocks: 5 << 20, Links: 1})
		}, check: func(t *testing.T, p *Plan) {
			if !p.LinkRemap {
				t.Error("plan does not ask for link-remap")
			}
		}},
		{name: "huge deleted file", mod: func(i *Inventory) {
			i.Tasks[0].Fds = append(i.Tasks[0].Fds, &FD{Num: 7, Kind: "deleted", Target: "/tmp/x (deleted)", Size: 2 << 30, Blocks: 2 << 30})
		}, refused: "deleted file"},
		{name: "huge sparse deleted file", mod: func(i *Inventory) {
			i.Tasks[0].Fds = append(i.Tasks[0].Fds, &FD{Num: 7, Kind: "deleted", Target: "/tmp/x (deleted)", Size: 2 << 30, Blocks: 16 << 10})
		}, check: func(t *testing.T, p *Plan) {
			if p.GhostLimit != 0 {
				t.Errorf("ghost limit %d for a file taking 16 KiB", p.GhostLimit)
			}
		}},
		{name: "another user's task with CAP_SYS_RESOURCE", mod: func(i *Inventory) {
			i.Tasks[0].Uid, i.Tasks[0].OtherUser = 65534, true
		}},
		{name: "another user's task without CAP_SYS_RESOURCE", mod: func(i *Inventory) {
			i.Tasks[0].Uid, i.Tasks[0].OtherUser = 65534, true
			i.LacksCapSysResource = true
		}, refused: "CAP_SYS_RESOURCE"},
		{name: "fanotify with inode and mount marks", mod: func(i *Inventory) {
			i.Tasks[0].Fds = append(i.Tasks[0].Fds, &FD{Num: 5, Kind: "fanotify", Target: "anon_inode:[fanotify]"})
		}},
		{name: "fanotify with a filesystem mark", mod: func(i *Inventory) {
			i.Tasks[0].Fds = append(i.Tasks[0].Fds, &FD{Num: 5, Kind: "fanotify", Target: "anon_inode:[fanotify]", FsMarks: 1})
		}, allow: Allowed{TCPEstablished: true, ExtUnixSk: true, FileLocks: true}, refused: "FAN_MARK_FILESYSTEM"},
		{name: "SysV IPC in its own namespace", mod: func(i *Inventory) { i.Ipc = &IPC{Shm: 1, Sem: 1, Msg: 1} }},
		{name: "session leader outside a foreign tree", mod: func(i *Inventory) {
			i.OwnPidNamespace = false
			i.Tasks[0].Sid = 3
		}, check: func(t *testing.T, p *Plan) {
			if !p.ShellJob {
				t.Error("plan does not ask for shell-job")
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			inv := base()
			tc.mod(inv)
			p := MakePlan(inv, tc.allow)
			err := Refusal(p)
			if tc.refused == "" && err != nil {
				t.Fatalf("refused: %v", err)
			}
			if tc.refused != "" {
				if !errors.Is(err, ErrNotCheckpointable) || !strings.Contains(err.Error(), tc.refused) {
					t.Fatalf("Refusal = %v, want it to name %q", err, tc.refused)
				}
			}
			if tc.check != nil {
				tc.check(t, p)
			}
		})
	}
}

func TestHexAddr(t *testing.T) {
	for in, want := range map[string]string{
		"0100007F:1F90":                         "127.0.0.1:8080",
		"00000000:0016":                         "0.0.0.0:22",
		"00000000000000000000000001000000:0050": "[::1]:80",
	} {
		if got := hexAddr(in); got != want {
			t.Errorf("hexAddr(%q) = %q, want %q", in, got, want)
		}
	}
}
