package criu

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/checkpoint-restore/go-criu/v7/rpc"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"
)

// maxRPCMessage bounds one CRIU RPC reply; real ones are a few hundred bytes.
const maxRPCMessage = 1 << 20

// Call is one request to a `criu swrk` process of its own. ferry drives
// swrk itself, as runc does, rather than through go-criu's client: that
// client cannot hand CRIU file descriptors at fixed numbers (needed for
// InheritFd), drops the restored pid and swallows some notifications.
type Call struct {
	Type rpc.CriuReqType
	Opts *rpc.CriuOpts
	// Wrapper is put before CRIU's command line, e.g. nsenter to run CRIU
	// inside a job's namespaces.
	Wrapper []string
	// ExtraFiles are inherited by CRIU at fds 4, 5, ... (fd 3 is the RPC
	// socket); InheritFd entries refer to them by those numbers.
	ExtraFiles []*os.File
	// Started runs once CRIU is running and before the request is sent,
	// for example to move CRIU into the cgroup a restored tree must land in.
	Started func(pid int) error
	// Notify answers CRIU's action-script notifications (pre-dump,
	// post-dump, post-restore with the restored pid, ...). An error makes
	// CRIU abort the operation.
	Notify func(script string, pid int32) error
}

// ExtraFD is the descriptor number at which CRIU sees c.ExtraFiles[i].
func ExtraFD(i int) int32 { return int32(4 + i) }

// RPCError is CRIU's own failure report.
type RPCError struct {
	Type   rpc.CriuReqType
	Errno  int32
	Msg    string
	Reason error // a notification handler's error, when that made CRIU abort
}

func (e *RPCError) Error() string {
	s := "criu " + e.Type.String()
	if e.Msg != "" {
		s += ": " + e.Msg
	}
	if e.Errno != 0 {
		s += ": " + unix.Errno(e.Errno).Error()
	}
	if e.Reason != nil {
		s += ": " + e.Reason.Error()
	}
	return s
}

func (e *RPCError) Unwrap() error { return e.Reason }

// Do runs c through a fresh `criu swrk` at path and returns CRIU's final
// response. A cancelled ctx kills CRIU.
func Do(ctx context.Context, path string, c Call) (*rpc.CriuResp, error) {
	fds, err := unix.Socketpair(unix.AF_LOCAL, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, os.NewSyscallError("socketpair", err)
	}
	client := os.NewFile(uintptr(fds[0]), "criu-client")
	server := os.NewFile(uintptr(fds[1]), "criu-server")
	defer client.Close()
	conn, err := net.FileConn(client)
	if err != nil {
		server.Close()
		return nil, fmt.Errorf("criu socket: %w", err)
	}
	defer conn.Close()
	uconn := conn.(*net.UnixConn)

	argv := append(append([]string{}, c.Wrapper...), path, "swrk", "3")
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.ExtraFiles = append([]*os.File{server}, c.ExtraFiles...)
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Start(); err != nil {
		server.Close()
		return nil, fmt.Errorf("starting criu: %w", err)
	}
	server.Close()
	waited := false
	defer func() {
		if !waited {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		}
	}()
	if c.Started != nil {
		if err := c.Started(cmd.Process.Pid); err != nil {
			return nil, err
		}
	}
	stop := context.AfterFunc(ctx, func() { _ = uconn.SetDeadline(time.Now()) })
	defer stop()

	req, err := proto.Marshal(&rpc.CriuReq{Type: c.Type.Enum(), Opts: c.Opts})
	if err != nil {
		return nil, fmt.Errorf("encoding criu request: %w", err)
	}
	if _, err := uconn.Write(req); err != nil {
		return nil, fmt.Errorf("sending criu request: %w", err)
	}
	buf := make([]byte, maxRPCMessage)
	oob := make([]byte, unix.CmsgSpace(4*16))
	var notifyErr error
	for {
		n, oobn, _, _, err := uconn.ReadMsgUnix(buf, oob)
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			werr := cmd.Wait()
			waited = true
			return nil, fmt.Errorf("criu exited without an answer (%w): %w", werr, err)
		}
		closeReceivedFDs(oob[:oobn])
		if n == 0 {
			werr := cmd.Wait()
			waited = true
			return nil, fmt.Errorf("criu closed the connection (%v)", werr)
		}
		resp := &rpc.CriuResp{}
		if err := proto.Unmarshal(buf[:n], resp); err != nil {
			return nil, fmt.Errorf("decoding criu response: %w", err)
		}
		if resp.GetType() != rpc.CriuReqType_NOTIFY {
			_ = conn.Close()
			_ = cmd.Wait() // swrk exits once the socket closes; its status adds nothing
			waited = true
			if !resp.GetSuccess() {
				msg := resp.GetCrErrmsg()
				if strings.Contains(msg, "RLIMIT_NOFILE") {
					// CRIU reports its first logged error, which on VMs
					// without CAP_SYS_RESOURCE is this harmless one.
					msg = ""
				}
				return resp, &RPCError{Type: c.Type, Errno: resp.GetCrErrno(), Msg: strings.TrimSpace(msg), Reason: notifyErr}
			}
			return resp, nil
		}
		nt := resp.GetNotify()
		ok := true
		if c.Notify != nil && notifyErr == nil {
			if err := c.Notify(nt.GetScript(), nt.GetPid()); err != nil {
				notifyErr = err
				ok = false
			}
		}
		ack, _ := proto.Marshal(&rpc.CriuReq{Type: rpc.CriuReqType_NOTIFY.Enum(), NotifySuccess: proto.Bool(ok)})
		if _, err := uconn.Write(ack); err != nil {
			return nil, fmt.Errorf("answering criu notification %q: %w", nt.GetScript(), err)
		}
	}
}

// closeReceivedFDs closes descriptors CRIU passed with a notification
// (orphan-pts-master); ferry has no use for them yet.
func closeReceivedFDs(oob []byte) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return
	}
	for _, m := range msgs {
		fds, err := unix.ParseUnixRights(&m)
		if err != nil {
			continue
		}
		for _, fd := range fds {
			unix.Close(fd)
		}
	}
}
