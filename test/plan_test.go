package test

import (
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

type dryRun struct {
	Inventory struct {
		Root  int `json:"root"`
		Tasks []struct {
			PID   int `json:"pid"`
			NSPID int `json:"nspid"`
			FDs   []struct {
				Kind string `json:"kind"`
			} `json:"fds"`
		} `json:"tasks"`
		Sockets []struct {
			Family     string `json:"family"`
			State      string `json:"state"`
			PeerInTree bool   `json:"peerInTree"`
		} `json:"sockets"`
		IPC    struct{ Shm, Sem, Msg int } `json:"ipc"`
		OwnIPC bool                        `json:"ownIpcNamespace"`
	} `json:"inventory"`
	Plan struct {
		TCPEstablished bool `json:"tcpEstablished"`
		Needs          []struct {
			Flag string `json:"flag"`
		} `json:"needs"`
	} `json:"plan"`
}

func (e *env) dryRun(name string, flags ...string) dryRun {
	e.t.Helper()
	var d dryRun
	out := e.must(append(append([]string{"checkpoint", "--dry-run", "--json"}, flags...), name)...)
	if err := json.Unmarshal([]byte(out), &d); err != nil {
		e.t.Fatalf("decoding dry run: %v\n%s", err, out)
	}
	return d
}

func TestDryRunAndPlan(t *testing.T) {
	e := newEnv(t)
	requireCriu(t)
	w := buildWorkload(t)

	// An established TCP connection inside the tree needs --tcp-established:
	// refused without it, before anything is frozen.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
	ln.Close()
	e.must("run", "--name", "tcp", "--", w, "tcp", port)
	e.waitLines("tcp", "echo ", 3)
	d := e.dryRun("tcp")
	established := 0
	for _, s := range d.Inventory.Sockets {
		if strings.HasPrefix(s.Family, "tcp") && s.State == "established" {
			established++
			if !s.PeerInTree {
				t.Errorf("loopback connection inside the tree reported with its peer outside")
			}
		}
	}
	if established != 2 {
		t.Errorf("dry run found %d established TCP sockets, want 2 (client and server side)", established)
	}
	if len(d.Plan.Needs) == 0 || d.Plan.Needs[0].Flag != "--tcp-established" {
		t.Errorf("plan needs %+v, want --tcp-established", d.Plan.Needs)
	}
	if d := e.dryRun("tcp", "--tcp-established"); len(d.Plan.Needs) != 0 || !d.Plan.TCPEstablished {
		t.Errorf("plan with --tcp-established: %+v", d.Plan)
	}
	text := e.must("checkpoint", "--dry-run", "tcp")
	for _, want := range []string{"checkpointable: no", "--tcp-established", "tcp established"} {
		if !strings.Contains(text, want) {
			t.Errorf("dry run output lacks %q:\n%s", want, text)
		}
	}
	before := len(e.lines("tcp", "echo "))
	out := filepath.Join(t.TempDir(), "tcp.ckpt")
	r := e.ferry("checkpoint", "-o", out, "tcp")
	if r.code != 16 || !strings.Contains(r.stderr, "--tcp-established") {
		t.Fatalf("checkpoint without --tcp-established: %s", r)
	}
	if _, err := os.Stat(out); !os.IsNotExist(err) {
		t.Errorf("refused checkpoint left %s", out)
	}
	if v := e.job("tcp"); v.State != "running" {
		t.Fatalf("job after refused checkpoint: %s", v.State)
	}
	e.waitLines("tcp", "echo ", before+3)

	// SysV IPC objects of the job's own IPC namespace are counted.
	e.must("run", "--name", "ipc", "--", w, "sysv")
	e.waitLines("ipc", "sysv ok ", 1)
	d = e.dryRun("ipc")
	if d.Inventory.IPC.Shm != 1 || d.Inventory.IPC.Sem != 1 || d.Inventory.IPC.Msg != 1 || !d.Inventory.OwnIPC {
		t.Errorf("IPC inventory %+v own=%v, want one of each in the job's own namespace", d.Inventory.IPC, d.Inventory.OwnIPC)
	}
	if len(d.Inventory.Tasks) != 2 || d.Inventory.Tasks[0].NSPID != 1 || d.Inventory.Tasks[1].NSPID <= 1 {
		t.Errorf("tasks %+v, want init (1) and the workload", d.Inventory.Tasks)
	}
}
