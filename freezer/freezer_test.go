package freezer

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestFreezeV1Scripted(t *testing.T) {
	for _, tc := range []struct {
		name         string
		freezing     int // reads of FREEZING before FROZEN
		wantThawings int // periodic THAWED writes (every 50th attempt)
	}{
		{name: "frozen at once", freezing: 0},
		{name: "after 2 reads", freezing: 2},
		{name: "after 120 reads", freezing: 120, wantThawings: 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := fakeCgroup(t, 1, v1Files("THAWED"))
			s := newScript(t, dir)
			s.set("freezer.state", after(tc.freezing, "FREEZING\n", "FROZEN\n"))

			if err := Freeze(context.Background(), dir); err != nil {
				t.Fatalf("Freeze: %v", err)
			}
			if got, want := s.count("freezer.state=FROZEN"), tc.freezing+1; got != want {
				t.Errorf("FROZEN written %d times, want %d (once per attempt)", got, want)
			}
			if got := s.count("freezer.state=THAWED"); got != tc.wantThawings {
				t.Errorf("THAWED written %d times, want %d", got, tc.wantThawings)
			}
			if got := s.last(); got != "freezer.state=FROZEN" {
				t.Errorf("last write %q, want FROZEN", got)
			}
		})
	}
}

func TestFreezeV1StuckTimesOut(t *testing.T) {
	dir := fakeCgroup(t, 1, v1Files("THAWED"))
	writeTestFile(t, filepath.Join(dir, "tasks"), "101\n102\n103\n")
	proc := fakeProc(t)
	addTask(t, proc, 101, "D (disk sleep)", "__refrigerator", "__refrigerator+0xac/0xd0", "get_signal+0x604/0x8a0")
	addTask(t, proc, 102, "D (disk sleep)", "folio_wait_bit_common", "folio_wait_bit_common+0x13e/0x330", "filemap_fdatawait_range+0x24/0xa0")
	// 103 has exited: no /proc entry.
	s := newScript(t, dir)
	s.set("freezer.state", s.v1Stuck)

	const timeout = 150 * time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	start := time.Now()
	err := Freeze(ctx, dir)
	elapsed := time.Since(start)

	var fe *FreezeError
	if !errors.As(err, &fe) {
		t.Fatalf("Freeze = %v, want a *FreezeError", err)
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("errors.Is(%v, DeadlineExceeded) = false", err)
	}
	if fe.State != Freezing || fe.Path != dir || !nearTimeout(fe.Timeout, timeout) {
		t.Errorf("FreezeError{State: %q, Path: %q, Timeout: %v}, want {FREEZING, %q, ~%v}", fe.State, fe.Path, fe.Timeout, dir, timeout)
	}
	wantTasks := []Task{{PID: 102, State: "D (disk sleep)", Stack: []string{"folio_wait_bit_common+0x13e/0x330", "filemap_fdatawait_range+0x24/0xa0"}}}
	if !reflect.DeepEqual(fe.Tasks, wantTasks) {
		t.Errorf("Tasks = %+v, want %+v", fe.Tasks, wantTasks)
	}
	wantMsg := `cgroup "` + dir + `" did not freeze within ` + fe.Timeout.String() + `: 1 task not frozen: 102 (D disk sleep)`
	if err.Error() != wantMsg {
		t.Errorf("Error() = %q, want %q", err.Error(), wantMsg)
	}
	if got := s.last(); got != "freezer.state=THAWED" {
		t.Errorf("last write %q, want the thaw", got)
	}
	if got := readTestFile(t, filepath.Join(dir, "freezer.state")); got != "THAWED" {
		t.Errorf("freezer.state = %q after failure, want THAWED", got)
	}
	if n := s.count("freezer.state=THAWED"); n < 2 {
		t.Errorf("THAWED written %d times, want the periodic thaws and the final one", n)
	}
	if elapsed > timeout+time.Second {
		t.Errorf("Freeze took %v with a %v deadline", elapsed, timeout)
	}
}

func TestFreezeV1Errors(t *testing.T) {
	for _, tc := range []struct {
		name      string
		state     string
		fail      error // returned by writes of FROZEN
		wantIs    error
		wantState State
	}{
		{name: "unexpected state", state: "THAWED\n", wantState: Thawed},
		{name: "cgroup removed", fail: &os.PathError{Op: "write", Path: "freezer.state", Err: unix.ENODEV}, wantIs: ErrNotExist},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := fakeCgroup(t, 1, v1Files("THAWED"))
			s := newScript(t, dir)
			if tc.state != "" {
				s.set("freezer.state", after(0, "", tc.state))
			}
			if tc.fail != nil {
				s.fail = func(_, value string) error {
					if value == "FROZEN" {
						return tc.fail
					}
					return nil
				}
			}
			err := Freeze(context.Background(), dir)
			var fe *FreezeError
			if !errors.As(err, &fe) {
				t.Fatalf("Freeze = %v, want a *FreezeError", err)
			}
			if tc.wantIs != nil && !errors.Is(err, tc.wantIs) {
				t.Errorf("errors.Is(%v, %v) = false", err, tc.wantIs)
			}
			if fe.State != tc.wantState || fe.Timeout != 0 || len(fe.Tasks) != 0 {
				t.Errorf("FreezeError = %+v", fe)
			}
			if got := s.last(); got != "freezer.state=THAWED" {
				t.Errorf("last write %q, want the thaw", got)
			}
		})
	}
}

func TestFreezeV2Scripted(t *testing.T) {
	for _, n := range []int{0, 1, 5} {
		t.Run(fmt.Sprintf("frozen after %d reads", n), func(t *testing.T) {
			dir := fakeCgroup(t, 2, v2Files("0", "0"))
			s := newScript(t, dir)
			s.set("cgroup.events", after(n, "populated 1\nfrozen 0\n", "populated 1\nfrozen 1\n"))

			if err := Freeze(context.Background(), dir); err != nil {
				t.Fatalf("Freeze: %v", err)
			}
			if got := s.written(); !reflect.DeepEqual(got, []string{"cgroup.freeze=1"}) {
				t.Errorf("writes %q, want only cgroup.freeze=1", got)
			}
			if got := s.readCount("cgroup.events"); got != n+1 {
				t.Errorf("cgroup.events read %d times, want %d", got, n+1)
			}
		})
	}
}

// TestFreezeV2Inotify changes cgroup.events in place, as the kernel does,
// and checks that the change is seen (through the inotify watch, or the
// 10 ms poll if inotify is unavailable).
func TestFreezeV2Inotify(t *testing.T) {
	dir := fakeCgroup(t, 2, v2Files("0", "0"))
	events := filepath.Join(dir, "cgroup.events")
	done := make(chan error, 1)
	go func() {
		time.Sleep(50 * time.Millisecond)
		f, err := os.OpenFile(events, os.O_WRONLY, 0)
		if err != nil {
			done <- err
			return
		}
		// One byte in place: a reader never sees a half-written file.
		_, err = f.WriteAt([]byte("1"), int64(len("populated 1\nfrozen ")))
		done <- errors.Join(err, f.Close())
	}()
	start := time.Now()
	if err := Freeze(context.Background(), dir); err != nil {
		t.Fatalf("Freeze: %v", err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d < 50*time.Millisecond || d > 2*time.Second {
		t.Errorf("Freeze returned after %v, want soon after the 50 ms change", d)
	}
	if got := readTestFile(t, filepath.Join(dir, "cgroup.freeze")); got != "1" {
		t.Errorf("cgroup.freeze = %q, want 1", got)
	}
}

func TestFreezeV2NeverFreezes(t *testing.T) {
	dir := fakeCgroup(t, 2, v2Files("0", "0"))
	writeTestFile(t, filepath.Join(dir, "cgroup.threads"), "201\n202\n203\n204\n")
	proc := fakeProc(t)
	addTask(t, proc, 201, "S (sleeping)", "get_signal", "get_signal+0x3b1/0x8a0", "arch_do_signal_or_restart+0x71/0x2a0")
	addTask(t, proc, 202, "R (running)", "0")
	addTask(t, proc, 203, "T (stopped)", "do_signal_stop", "do_signal_stop+0x10f/0x240")
	addTask(t, proc, 204, "D (disk sleep)", "fuse_wait_answer", "request_wait_answer+0xd1/0x2a0")
	s := newScript(t, dir)

	const timeout = 100 * time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	err := Freeze(ctx, dir)
	var fe *FreezeError
	if !errors.As(err, &fe) {
		t.Fatalf("Freeze = %v, want a *FreezeError", err)
	}
	if !errors.Is(err, context.DeadlineExceeded) || fe.State != Freezing || !nearTimeout(fe.Timeout, timeout) {
		t.Errorf("FreezeError = %+v, want State FREEZING, Timeout %v, DeadlineExceeded", fe, timeout)
	}
	var pids []int
	for _, task := range fe.Tasks {
		pids = append(pids, task.PID)
	}
	if !reflect.DeepEqual(pids, []int{202, 204}) {
		t.Errorf("tasks not frozen %v, want [202 204]", pids)
	}
	if !strings.HasSuffix(err.Error(), "within "+fe.Timeout.String()+": 2 tasks not frozen: 202 (R running), 204 (D disk sleep)") {
		t.Errorf("Error() = %q", err)
	}
	if got := readTestFile(t, filepath.Join(dir, "cgroup.freeze")); got != "0" {
		t.Errorf("cgroup.freeze = %q after failure, want 0 (thawed)", got)
	}
	if got := s.written(); !reflect.DeepEqual(got, []string{"cgroup.freeze=1", "cgroup.freeze=0"}) {
		t.Errorf("writes %q, want freeze then thaw", got)
	}
}

func TestFreezeCancelled(t *testing.T) {
	for _, tc := range []struct {
		version  int
		files    map[string]string
		scripted string
		content  string
		thawed   string
	}{
		{version: 1, files: v1Files("THAWED"), scripted: "freezer.state", content: "FREEZING\n", thawed: "freezer.state=THAWED"},
		{version: 2, files: v2Files("0", "0"), scripted: "cgroup.events", content: "populated 1\nfrozen 0\n", thawed: "cgroup.freeze=0"},
	} {
		t.Run(fmt.Sprintf("v%d", tc.version), func(t *testing.T) {
			dir := fakeCgroup(t, tc.version, tc.files)
			s := newScript(t, dir)
			if tc.version == 1 {
				s.set(tc.scripted, s.v1Stuck)
			} else {
				// Thawing waits for "frozen 0": let the thaw see it.
				s.set(tc.scripted, func(int) string {
					if strings.HasSuffix(s.last(), "=0") {
						return "populated 1\nfrozen 0\n"
					}
					return tc.content
				})
			}
			ctx, cancel := context.WithCancel(context.Background())
			time.AfterFunc(30*time.Millisecond, cancel)
			start := time.Now()
			err := Freeze(ctx, dir)
			var fe *FreezeError
			if !errors.As(err, &fe) || !errors.Is(err, context.Canceled) {
				t.Fatalf("Freeze = %v, want a *FreezeError wrapping context.Canceled", err)
			}
			if fe.Timeout != 0 {
				t.Errorf("Timeout = %v on cancellation, want 0", fe.Timeout)
			}
			if d := time.Since(start); d > 2*time.Second {
				t.Errorf("Freeze took %v to notice cancellation", d)
			}
			if got := s.last(); got != tc.thawed {
				t.Errorf("last write %q, want %q: the thaw must run despite the cancelled context", got, tc.thawed)
			}
		})
	}
}

func TestFreezeMissingOrUnsupported(t *testing.T) {
	plain := t.TempDir() // not cgroupfs
	writeTestFile(t, filepath.Join(plain, "freezer.state"), "THAWED\n")
	noFreezer := fakeCgroup(t, 2, map[string]string{"cgroup.procs": ""})
	for _, tc := range []struct {
		name string
		dir  string
		want error
	}{
		{name: "missing", dir: filepath.Join(t.TempDir(), "gone"), want: ErrNotExist},
		{name: "not cgroupfs", dir: plain, want: ErrNotSupported},
		{name: "no cgroup.freeze", dir: noFreezer, want: ErrNotSupported},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := Freeze(context.Background(), tc.dir)
			var fe *FreezeError
			if !errors.As(err, &fe) || !errors.Is(err, tc.want) {
				t.Errorf("Freeze = %v, want a *FreezeError wrapping %v", err, tc.want)
			}
			if err := Thaw(context.Background(), tc.dir); !errors.Is(err, tc.want) {
				t.Errorf("Thaw = %v, want %v", err, tc.want)
			}
			if _, err := GetState(tc.dir); !errors.Is(err, tc.want) {
				t.Errorf("GetState = %v, want %v", err, tc.want)
			}
		})
	}
	if got := readTestFile(t, filepath.Join(plain, "freezer.state")); got != "THAWED" {
		t.Errorf("a file outside cgroupfs was written: %q", got)
	}
}

func TestThaw(t *testing.T) {
	for _, tc := range []struct {
		name       string
		version    int
		files      map[string]string
		script     map[string]func(int) string
		parent     map[string]string // files of the parent cgroup
		timeout    time.Duration
		want       error
		wantWrites []string
	}{
		{
			name: "v1", version: 1, files: v1Files("FROZEN"),
			script:     map[string]func(int) string{"freezer.state": after(2, "FROZEN\n", "THAWED\n")},
			wantWrites: []string{"freezer.state=THAWED", "freezer.state=THAWED", "freezer.state=THAWED"},
		},
		{
			name: "v1 frozen by ancestor", version: 1,
			files:  map[string]string{"freezer.state": "FROZEN\n", "freezer.parent_freezing": "1\n"},
			script: map[string]func(int) string{"freezer.state": after(0, "", "FROZEN\n")},
			want:   ErrFrozenByAncestor, wantWrites: []string{"freezer.state=THAWED"},
		},
		{
			name: "v1 stuck", version: 1, files: v1Files("FROZEN"),
			script:  map[string]func(int) string{"freezer.state": after(0, "", "FROZEN\n")},
			timeout: 30 * time.Millisecond, want: context.DeadlineExceeded,
		},
		{
			name: "v2", version: 2, files: v2Files("1", "1"),
			script:     map[string]func(int) string{"cgroup.events": after(3, "populated 1\nfrozen 1\n", "populated 1\nfrozen 0\n")},
			wantWrites: []string{"cgroup.freeze=0"},
		},
		{
			name: "v2 frozen by ancestor", version: 2, files: v2Files("1", "1"),
			parent: map[string]string{"cgroup.events": "populated 1\nfrozen 1\n"},
			want:   ErrFrozenByAncestor, wantWrites: []string{"cgroup.freeze=0"},
		},
		{
			name: "v2 never thaws", version: 2, files: v2Files("1", "1"),
			timeout: 50 * time.Millisecond, want: context.DeadlineExceeded, wantWrites: []string{"cgroup.freeze=0"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := fakeCgroup(t, tc.version, tc.files)
			for name, content := range tc.parent {
				writeTestFile(t, filepath.Join(filepath.Dir(dir), name), content)
			}
			s := newScript(t, dir)
			for name, fn := range tc.script {
				s.set(name, fn)
			}
			ctx := context.Background()
			if tc.timeout > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, tc.timeout)
				defer cancel()
			}
			err := Thaw(ctx, dir)
			if tc.want == nil && err != nil || !errors.Is(err, tc.want) {
				t.Fatalf("Thaw = %v, want %v", err, tc.want)
			}
			if tc.wantWrites != nil {
				if got := s.written(); !reflect.DeepEqual(got, tc.wantWrites) {
					t.Errorf("writes %q, want %q", got, tc.wantWrites)
				}
			}
		})
	}
}

func TestGetState(t *testing.T) {
	for _, tc := range []struct {
		name    string
		version int
		files   map[string]string
		want    State
		wantErr bool
	}{
		{name: "v1 thawed", version: 1, files: v1Files("THAWED"), want: Thawed},
		{name: "v1 freezing", version: 1, files: v1Files("FREEZING"), want: Freezing},
		{name: "v1 frozen", version: 1, files: v1Files("FROZEN"), want: Frozen},
		{
			name: "v1 frozen by ancestor", version: 1, want: Frozen,
			files: map[string]string{"freezer.state": "FROZEN\n", "freezer.self_freezing": "0\n", "freezer.parent_freezing": "1\n"},
		},
		{name: "v1 garbage", version: 1, files: v1Files("MELTING"), wantErr: true},
		{name: "v2 thawed", version: 2, files: v2Files("0", "0"), want: Thawed},
		{name: "v2 freezing", version: 2, files: v2Files("1", "0"), want: Freezing},
		{name: "v2 frozen", version: 2, files: v2Files("1", "1"), want: Frozen},
		{name: "v2 frozen by ancestor", version: 2, files: v2Files("0", "1"), want: Frozen},
		{
			name: "v2 no frozen key", version: 2, wantErr: true,
			files: map[string]string{"cgroup.freeze": "0\n", "cgroup.events": "populated 0\n"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := fakeCgroup(t, tc.version, tc.files)
			got, err := GetState(dir)
			if (err != nil) != tc.wantErr {
				t.Fatalf("GetState = %q, %v", got, err)
			}
			if got != tc.want {
				t.Errorf("GetState = %q, want %q", got, tc.want)
			}
		})
	}
}

func TestVersion(t *testing.T) {
	v1 := fakeCgroup(t, 1, v1Files("THAWED"))
	v2 := fakeCgroup(t, 2, v2Files("0", "0"))
	v1NoFreezer := fakeCgroup(t, 1, map[string]string{"cpu.shares": "1024\n"})
	for _, tc := range []struct {
		name string
		dir  string
		want int
		err  error
	}{
		{name: "v1", dir: v1, want: 1},
		{name: "v2", dir: v2, want: 2},
		{name: "v1 without freezer", dir: v1NoFreezer, err: ErrNotSupported},
		{name: "plain directory", dir: t.TempDir(), err: ErrNotSupported},
		{name: "missing", dir: filepath.Join(v2, "nope"), err: ErrNotExist},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Version(tc.dir)
			if !errors.Is(err, tc.err) || got != tc.want {
				t.Errorf("Version = %d, %v; want %d, %v", got, err, tc.want, tc.err)
			}
		})
	}
}

func TestOpenCgroupFile(t *testing.T) {
	dir := t.TempDir()
	writeTestFile(t, filepath.Join(dir, "cgroup.procs"), "1\n")
	outside := filepath.Join(t.TempDir(), "secret")
	writeTestFile(t, outside, "secret\n")
	if err := os.Symlink(outside, filepath.Join(dir, "link")); err != nil {
		t.Fatal(err)
	}
	for _, fallback := range []bool{false, true} {
		name := "openat2"
		if fallback {
			name = "fallback"
		}
		t.Run(name, func(t *testing.T) {
			orig := openat2Missing.Load()
			openat2Missing.Store(fallback)
			t.Cleanup(func() { openat2Missing.Store(orig) })

			f, err := openCgroupFile(dir, "cgroup.procs", unix.O_RDONLY)
			if err != nil {
				t.Fatalf("opening a control file: %v", err)
			}
			f.Close()
			for _, bad := range []string{"", ".", "..", "../secret", "a/b", "link"} {
				if f, err := openCgroupFile(dir, bad, unix.O_RDONLY); err == nil {
					f.Close()
					t.Errorf("openCgroupFile(%q) succeeded, want an error", bad)
				}
			}
			if _, err := openCgroupFile(filepath.Join(dir, "gone"), "x", unix.O_RDONLY); !gone(err) {
				t.Errorf("missing directory gave %v, want ENOENT", err)
			}
		})
	}
}

func TestFreezeErrorMessage(t *testing.T) {
	tasks := func(n int) []Task {
		var ts []Task
		for i := range n {
			ts = append(ts, Task{PID: 100 + i, State: "R (running)"})
		}
		return ts
	}
	for _, tc := range []struct {
		name string
		err  *FreezeError
		want string
	}{
		{
			name: "timeout",
			err:  &FreezeError{Path: "/x", Timeout: 10 * time.Second, Err: context.DeadlineExceeded, Tasks: []Task{{PID: 1234, State: "D (disk sleep)"}, {PID: 1240, State: "R (running)"}}},
			want: `cgroup "/x" did not freeze within 10s: 2 tasks not frozen: 1234 (D disk sleep), 1240 (R running)`,
		},
		{
			name: "many tasks",
			err:  &FreezeError{Path: "/x", Timeout: time.Second, Err: context.DeadlineExceeded, Tasks: tasks(10)},
			want: `cgroup "/x" did not freeze within 1s: 10 tasks not frozen: 100 (R running), 101 (R running), 102 (R running), 103 (R running), 104 (R running), 105 (R running), 106 (R running), 107 (R running), and 2 more`,
		},
		{
			name: "cancelled",
			err:  &FreezeError{Path: "/x", Err: context.Canceled, Tasks: []Task{{PID: 7}}},
			want: `freezing cgroup "/x": context canceled: 1 task not frozen: 7`,
		},
		{
			name: "io error",
			err:  &FreezeError{Path: "/x", Err: ErrNotExist},
			want: `freezing cgroup "/x": cgroup does not exist`,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.err.Error(); got != tc.want {
				t.Errorf("Error() =\n%s\nwant\n%s", got, tc.want)
			}
		})
	}
}

func TestLooksFrozen(t *testing.T) {
	for _, tc := range []struct {
		name    string
		version int
		state   string
		wchan   string
		stack   []string
		want    bool
	}{
		{name: "v1 refrigerator", version: 1, state: "D (disk sleep)", wchan: "__refrigerator", want: true},
		{name: "v1 refrigerator in stack", version: 1, state: "D (disk sleep)", wchan: "0", stack: []string{"__refrigerator+0xac/0xd0"}, want: true},
		{name: "v1 frozen in nanosleep", version: 1, state: "D (disk sleep)", wchan: "hrtimer_nanosleep", want: true},
		{name: "v1 frozen in futex", version: 1, state: "D (disk sleep)", wchan: "futex_do_wait", want: true},
		{name: "v1 frozen while stopped", version: 1, state: "D (disk sleep)", wchan: "do_signal_stop", want: true},
		{name: "v1 stuck on disk", version: 1, state: "D (disk sleep)", wchan: "folio_wait_bit_common", want: false},
		{name: "v1 stuck on fuse", version: 1, state: "D (disk sleep)", wchan: "0", stack: []string{"request_wait_answer+0xd1/0x2a0"}, want: false},
		{name: "v1 sleeping with refrigerator wchan", version: 1, state: "S (sleeping)", wchan: "__refrigerator", want: false},
		{name: "v1 running", version: 1, state: "R (running)", wchan: "0", want: false},
		{name: "v1 stopped", version: 1, state: "T (stopped)", wchan: "do_signal_stop", want: true},
		{name: "v1 zombie", version: 1, state: "Z (zombie)", want: true},
		{name: "v2 trapped", version: 2, state: "S (sleeping)", wchan: "get_signal", want: true},
		{name: "v2 trap in stack", version: 2, state: "S (sleeping)", stack: []string{"do_freezer_trap+0x10/0x50"}, want: true},
		{name: "v2 stopped", version: 2, state: "T (stopped)", wchan: "do_signal_stop", want: true},
		{name: "v2 traced", version: 2, state: "t (tracing stop)", want: true},
		{name: "v2 sleeping elsewhere", version: 2, state: "S (sleeping)", wchan: "do_epoll_wait", want: false},
		{name: "v2 running", version: 2, state: "R (running)", wchan: "0", want: false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			task := Task{PID: 1, State: tc.state, Stack: tc.stack}
			if got := looksFrozen(tc.version, task, tc.wchan); got != tc.want {
				t.Errorf("looksFrozen = %v, want %v", got, tc.want)
			}
		})
	}
}

func TestInspectTaskTrimsStack(t *testing.T) {
	proc := fakeProc(t)
	var frames []string
	for i := range maxStackFrames + 4 {
		frames = append(frames, "frame"+string(rune('a'+i))+"+0x1/0x2")
	}
	addTask(t, proc, 42, "S (sleeping)", "frame_a", frames...)
	task, wchan := inspectTask(42)
	if task.State != "S (sleeping)" || wchan != "frame_a" {
		t.Errorf("inspectTask = %+v, %q", task, wchan)
	}
	if !reflect.DeepEqual(task.Stack, frames[:maxStackFrames]) {
		t.Errorf("Stack = %q, want the first %d frames", task.Stack, maxStackFrames)
	}
	if task, _ := inspectTask(43); task.State != "" {
		t.Errorf("missing task gave %+v", task)
	}
}

// TestEventsWatchWakes checks that the inotify watch ends a wait as soon as
// cgroup.events is modified, long before the poll timeout.
func TestEventsWatchWakes(t *testing.T) {
	dir := t.TempDir()
	events := filepath.Join(dir, "cgroup.events")
	writeTestFile(t, events, "populated 1\nfrozen 0\n")
	w := watchEvents(dir)
	defer w.close()
	if w.fd < 0 {
		t.Skip("inotify unavailable: waitFrozen polls")
	}
	time.AfterFunc(20*time.Millisecond, func() { _ = os.WriteFile(events, []byte("populated 1\nfrozen 1\n"), 0o644) })
	start := time.Now()
	w.wait(context.Background(), 5*time.Second)
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("wait returned after %v, want soon after the 20 ms write", d)
	}
}

// nearTimeout reports whether got, the budget a FreezeError reports, matches
// a context deadline of want set up just before the call: Freeze measures
// what is left of it when it starts.
func nearTimeout(got, want time.Duration) bool {
	return got <= want && got >= want-50*time.Millisecond
}
