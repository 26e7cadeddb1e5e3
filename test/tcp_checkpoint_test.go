package test

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

// TestCheckpointKeepsTCPConnection: `checkpoint --tcp-established` ends
// the job without a word to its peers (CRIU ends the tree while its
// connections are still locked), so a client's connection survives the
// checkpoint and the restore: the next request on it is answered with
// the count the job had. Both a .ferry file and a directory, with the
// job's cgroup under cgroup v2 and under v1.
func TestCheckpointKeepsTCPConnection(t *testing.T) {
	requireCriu(t)
	w := buildWorkload(t)
	h := newHosts(t)
	envs := map[string]func(*testing.T) *env{"v2": newEnv, "v1": newEnvV1}
	for j, cg := range []string{"v2", "v1"} {
		t.Run(cg, func(t *testing.T) {
			e := envs[cg](t)
			for i, format := range []string{"stream", "dir"} {
				t.Run(format, func(t *testing.T) {
					keepsTCPConnection(t, e, h, w, format, 7131+2*j+i, 2-j)
				})
			}
		})
	}
}

// keepsTCPConnection is TestCheckpointKeepsTCPConnection for one env and
// one checkpoint format.
func keepsTCPConnection(t *testing.T, e *env, h *hosts, w, format string, port, cgroupVersion int) {
	name := "tc" + format
	addr := net.JoinHostPort(h.addrA, strconv.Itoa(port))
	if r := e.ferryIn(h.a, "run", "--name", name, "--", w, "serve", addr); r.code != 0 {
		t.Fatalf("run: %s", r)
	}
	switch v := e.job(name).CgroupVersion; {
	case v == cgroupVersion:
	case cgroupVersion == 2:
		t.Skipf("this host gives jobs cgroup v%d, not v2", v)
	default:
		t.Fatalf("the job's cgroup is v%d, want v%d", v, cgroupVersion)
	}
	eventually(t, 10*time.Second, "the job to listen", func() bool {
		return inNetns(t, h.a, func() error {
			c, err := net.DialTimeout("tcp", addr, time.Second)
			if err == nil {
				c.Close()
			}
			return err
		}) == nil
	})
	p := dialPinger(t, h.a, addr)
	for want := 1; want <= 3; want++ {
		if got := p.ping(t); got != want {
			t.Fatalf("pong %d, want %d", got, want)
		}
	}
	out := filepath.Join(t.TempDir(), name+map[string]string{"stream": ".ferry", "dir": ".ckpt"}[format])
	if r := e.ferryIn(h.a, "checkpoint", "--tcp-established", "--format", format, "-o", out, name); r.code != 0 {
		t.Fatalf("checkpoint: %s", r)
	}
	// No FIN: the client's connection reads nothing, not an end.
	_ = p.c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if _, err := p.r.ReadByte(); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("the client's connection after the checkpoint: %v, want nothing (the peer must see no FIN)", err)
	}
	if r := e.ferryIn(h.a, "restore", out); r.code != 0 {
		t.Fatalf("restore: %s", r)
	}
	if got := p.ping(t); got != 4 {
		t.Fatalf("after the restore the established connection got pong %d, want 4", got)
	}
}
