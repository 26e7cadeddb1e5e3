package proc

import (
	"os"
	"os/exec"
	"slices"
	"syscall"
	"testing"
	"time"
)

func TestParseStat(t *testing.T) {
	tests := []struct {
		name  string
		in    string
		comm  string
		state byte
		ppid  int
		start uint64
		bad   bool
	}{
		{name: "plain", in: "42 (sleep) S 1 42 42 0 -1 4194560 95 0 0 0 0 0 0 0 20 0 1 0 12345 2162688 128 18446744073709551615", comm: "sleep", state: 'S', ppid: 1, start: 12345},
		{name: "parens and spaces in comm", in: "7 (a) b (c)) R 3 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 99 0 0 0", comm: "a) b (c)", state: 'R', ppid: 3, start: 99},
		{name: "truncated", in: "7 (x) R 3 7", bad: true},
		{name: "no comm", in: "7 x R", bad: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			st, err := parseStat(7, []byte(tc.in))
			if tc.bad {
				if err == nil {
					t.Fatalf("parseStat(%q) = %+v, want error", tc.in, st)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if st.Comm != tc.comm || st.State != tc.state || st.PPID != tc.ppid || st.StartTime != tc.start {
				t.Fatalf("parseStat(%q) = %+v", tc.in, st)
			}
		})
	}
}

func TestSelf(t *testing.T) {
	st, err := ReadStat(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if !Alive(os.Getpid(), st.StartTime) {
		t.Fatal("Alive(self) = false")
	}
	if Alive(os.Getpid(), st.StartTime+1) {
		t.Fatal("Alive(self, wrong start time) = true: pid reuse would go unnoticed")
	}
	rss, err := RSS(os.Getpid())
	if err != nil || rss <= 0 {
		t.Fatalf("RSS(self) = %d, %v", rss, err)
	}
	ns, err := NSpid(os.Getpid())
	if err != nil || len(ns) == 0 || ns[0] != os.Getpid() {
		t.Fatalf("NSpid(self) = %v, %v", ns, err)
	}
}

func TestChildrenOfAnyThread(t *testing.T) {
	cmd := exec.Command("sleep", "10")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	kids, err := Children(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(kids, cmd.Process.Pid) {
		t.Fatalf("Children(self) = %v, want it to include %d", kids, cmd.Process.Pid)
	}
}

// HasCapability reads the named set of /proc/self/status as hex bits.
func TestHasCapability(t *testing.T) {
	old := Root
	t.Cleanup(func() { Root = old })
	Root = t.TempDir()
	if err := os.MkdirAll(Root+"/self", 0o755); err != nil {
		t.Fatal(err)
	}
	// CAP_SYS_RESOURCE (24) in the bounding set, not the effective one.
	status := "Name:\tferry\nCapEff:\t00000000a80425fb\nCapBnd:\t000001ffffffffff\n"
	if err := os.WriteFile(Root+"/self/status", []byte(status), 0o644); err != nil {
		t.Fatal(err)
	}
	if HasCapability("CapEff", 24) || !HasCapability("CapBnd", 24) || !HasCapability("CapEff", 0) || HasCapability("CapAmb", 0) {
		t.Fatal("HasCapability misread the sets")
	}
}

func TestMemAvailable(t *testing.T) {
	n := MemAvailable()
	var si syscall.Sysinfo_t
	if err := syscall.Sysinfo(&si); err != nil {
		t.Fatal(err)
	}
	total := int64(si.Totalram) * int64(si.Unit)
	if n <= 0 || n > total {
		t.Fatalf("MemAvailable = %d, want between 0 and the machine's %d", n, total)
	}
}

// Gone hears a task's exit (here a child this test starts and kills),
// not before, and takes a pid whose start time differs as gone at once.
func TestGone(t *testing.T) {
	cmd, start := sleeper(t)
	if wrong, stop := Gone(cmd.Process.Pid, start+1); !closed(wrong, time.Second) {
		t.Error("a pid whose start time differs was not gone at once")
	} else {
		stop()
	}
	gone, stop := Gone(cmd.Process.Pid, start)
	defer stop()
	if closed(gone, 300*time.Millisecond) {
		t.Fatal("gone while the task runs")
	}
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	if !closed(gone, 5*time.Second) {
		t.Fatal("the task's exit was not heard within 5s")
	}
	// A watch stopped before the exit ends, and its stop returns.
	other, ostart := sleeper(t)
	_, ostop := Gone(other.Process.Pid, ostart)
	time.Sleep(20 * time.Millisecond) // the watch is in its poll
	t0 := time.Now()
	ostop()
	// It returns at once: a shim's restore stops its watch on the way
	// to a migration's downtime (a stop that waited out the poll cost
	// every migration up to 100 ms).
	if d := time.Since(t0); d > 10*time.Millisecond {
		t.Errorf("stop took %s", d)
	}
	ostop() // twice is harmless
}

// sleeper starts a child that sleeps, ended with the test, and returns
// it with its start time.
func sleeper(t *testing.T) (*exec.Cmd, uint64) {
	t.Helper()
	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	st, err := ReadStat(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	return cmd, st.StartTime
}

func closed(ch <-chan struct{}, within time.Duration) bool {
	select {
	case <-ch:
		return true
	case <-time.After(within):
		return false
	}
}
