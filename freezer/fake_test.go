package freezer

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// This file holds the fake cgroupfs that the unit tests run against. Real
// control files change under the reader (freezer.state goes from FREEZING to
// FROZEN); a plain file cannot, so reads of chosen files are scripted through
// the package's readCgroupFile hook, and writes are recorded through
// writeCgroupFile before reaching the real file.

// fakeCgroup creates <tmp>/parent/job with the given control files, makes
// the package see both directories as cgroupfs of the given version, and
// returns the job directory.
func fakeCgroup(t *testing.T, version int, files map[string]string) string {
	t.Helper()
	parent := filepath.Join(t.TempDir(), "parent")
	dir := filepath.Join(parent, "job")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, content := range files {
		writeTestFile(t, filepath.Join(dir, name), content)
	}
	magic := int64(unix.CGROUP_SUPER_MAGIC)
	if version == 2 {
		magic = unix.CGROUP2_SUPER_MAGIC
	}
	fakeFS(t, map[string]int64{parent: magic, dir: magic})
	return dir
}

// fakeFS makes fsType report the given magic numbers for the given
// directories (and the real answer for any other).
func fakeFS(t *testing.T, magics map[string]int64) {
	t.Helper()
	orig := fsType
	fsType = func(dir string) (int64, error) {
		if m, ok := magics[filepath.Clean(dir)]; ok {
			if _, err := os.Stat(dir); err != nil {
				return 0, err
			}
			return m, nil
		}
		return orig(dir)
	}
	t.Cleanup(func() { fsType = orig })
}

func v1Files(state string) map[string]string {
	return map[string]string{
		"freezer.state":           state + "\n",
		"freezer.self_freezing":   "0\n",
		"freezer.parent_freezing": "0\n",
		"tasks":                   "",
		"cgroup.procs":            "",
	}
}

func v2Files(freeze, frozen string) map[string]string {
	return map[string]string{
		"cgroup.freeze":  freeze + "\n",
		"cgroup.events":  "populated 1\nfrozen " + frozen + "\n",
		"cgroup.threads": "",
		"cgroup.procs":   "",
	}
}

// script scripts reads and records writes of one fake cgroup.
type script struct {
	dir string

	mu     sync.Mutex
	reads  map[string]int                // reads so far, by file name
	replay map[string]func(n int) string // content of the nth read (from 0)
	writes []string                      // "name=value", in order
	fail   func(name, value string) error
}

// newScript installs a script for dir; files without a replay function are
// read from disk.
func newScript(t *testing.T, dir string) *script {
	t.Helper()
	s := &script{dir: dir, reads: map[string]int{}, replay: map[string]func(int) string{}}
	origRead, origWrite := readCgroupFile, writeCgroupFile
	readCgroupFile = func(d, name string) ([]byte, error) {
		s.mu.Lock()
		fn := s.replay[name]
		n := s.reads[name]
		if filepath.Clean(d) == s.dir {
			s.reads[name]++
		}
		s.mu.Unlock()
		if fn != nil && filepath.Clean(d) == s.dir {
			return []byte(fn(n)), nil
		}
		return origRead(d, name)
	}
	writeCgroupFile = func(d, name, value string) error {
		s.mu.Lock()
		fail := s.fail
		if filepath.Clean(d) == s.dir {
			s.writes = append(s.writes, name+"="+value)
		}
		s.mu.Unlock()
		if fail != nil {
			if err := fail(name, value); err != nil {
				return err
			}
		}
		return origWrite(d, name, value)
	}
	t.Cleanup(func() { readCgroupFile, writeCgroupFile = origRead, origWrite })
	return s
}

// after returns a replay function giving before for the first n reads and
// then after.
func after(n int, before, after string) func(int) string {
	return func(i int) string {
		if i < n {
			return before
		}
		return after
	}
}

func (s *script) set(name string, fn func(int) string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.replay[name] = fn
}

func (s *script) readCount(name string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.reads[name]
}

func (s *script) written() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.writes...)
}

func (s *script) count(write string) int {
	n := 0
	for _, w := range s.written() {
		if w == write {
			n++
		}
	}
	return n
}

func (s *script) last() string {
	w := s.written()
	if len(w) == 0 {
		return ""
	}
	return w[len(w)-1]
}

// fakeProc points procRoot at a fresh fake /proc.
func fakeProc(t *testing.T) string {
	t.Helper()
	root := t.TempDir()
	orig := procRoot
	procRoot = root
	t.Cleanup(func() { procRoot = orig })
	return root
}

// addTask adds /proc/<pid>/{status,wchan,stack} to a fake /proc.
func addTask(t *testing.T, root string, pid int, state, wchan string, stack ...string) {
	t.Helper()
	dir := filepath.Join(root, strconv.Itoa(pid))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	writeTestFile(t, filepath.Join(dir, "status"), "Name:\tvictim\nUmask:\t0022\nState:\t"+state+"\nTgid:\t"+strconv.Itoa(pid)+"\n")
	writeTestFile(t, filepath.Join(dir, "wchan"), wchan)
	var b strings.Builder
	for _, f := range stack {
		b.WriteString("[<0>] " + f + "\n")
	}
	writeTestFile(t, filepath.Join(dir, "stack"), b.String())
}

func writeTestFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func readTestFile(t *testing.T, path string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(data))
}

// v1Stuck scripts freezer.state like a cgroup with a task that never reaches
// the refrigerator: FREEZING after FROZEN was written, THAWED after THAWED.
func (s *script) v1Stuck(int) string {
	if s.last() == "freezer.state=THAWED" {
		return "THAWED\n"
	}
	return "FREEZING\n"
}
