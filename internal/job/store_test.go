package job

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestValidateName(t *testing.T) {
	for _, tc := range []struct {
		name string
		ok   bool
	}{
		{"t1", true}, {"my-job_2.v3", true}, {strings.Repeat("a", 63), true},
		{"", false}, {"../x", false}, {".hidden", false}, {"-x", false}, {"a/b", false},
		{strings.Repeat("a", 64), false}, {"sp ace", false},
	} {
		err := ValidateName(tc.name)
		if (err == nil) != tc.ok {
			t.Errorf("ValidateName(%q) = %v, want ok=%v", tc.name, err, tc.ok)
		}
		if err != nil && !errors.Is(err, ErrInvalidName) {
			t.Errorf("ValidateName(%q) error %v does not match ErrInvalidName", tc.name, err)
		}
	}
	for _, cmd := range []string{"/usr/bin/sh", "python3", "weird name!", strings.Repeat("x", 40)} {
		if n := GenerateName(cmd); ValidateName(n) != nil {
			t.Errorf("GenerateName(%q) = %q, not a valid name", cmd, n)
		}
	}
}

func TestStoreRecords(t *testing.T) {
	s, err := OpenRegistry(filepath.Join(t.TempDir(), "root"))
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(s.Root)
	if err != nil || st.Mode().Perm() != 0o700 {
		t.Fatalf("state directory mode %v, %v; want 0700", st.Mode(), err)
	}
	rec := &Record{Name: "a", ID: NewID(), Command: []string{"/bin/true"}, Created: time.Now().UTC(), Status: Starting}
	if err := s.Create(rec); err != nil {
		t.Fatal(err)
	}
	if err := s.Create(&Record{Name: "a"}); !errors.Is(err, ErrExists) {
		t.Fatalf("second Create = %v, want ErrExists", err)
	}
	if _, err := s.Load("nope"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Load(nope) = %v, want ErrNotFound", err)
	}
	if _, err := s.Load("../../etc"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Load of a path = %v, want ErrNotFound", err)
	}
	// Concurrent updates under the lock lose nothing.
	var wg sync.WaitGroup
	for range 20 {
		wg.Go(func() {
			if _, err := s.Update("a", func(r *Record) error { r.InitPID++; return nil }); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	got, err := s.Load("a")
	if err != nil || got.InitPID != 20 {
		t.Fatalf("after 20 concurrent updates InitPID = %d, %v", got.InitPID, err)
	}
	// Records are replaced atomically: no temporary files remain.
	entries, _ := os.ReadDir(s.Dir("a"))
	for _, e := range entries {
		if strings.Contains(e.Name(), ".tmp-") {
			t.Errorf("temporary file %s left in job directory", e.Name())
		}
	}
	if fi, err := os.Stat(filepath.Join(s.Dir("a"), recordFile)); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("record mode %v, %v; want 0600", fi.Mode(), err)
	}
	// A corrupt record is an error, not a crash, and List skips it.
	if err := os.WriteFile(filepath.Join(s.Dir("a"), recordFile), []byte("{garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Load("a"); err == nil {
		t.Error("Load of a corrupt record succeeded")
	}
	if recs, err := s.List(); err != nil || len(recs) != 0 {
		t.Errorf("List with a corrupt record = %v, %v", recs, err)
	}
	if err := s.Remove("a"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(s.Dir("a")); !os.IsNotExist(err) {
		t.Error("Remove left the job directory")
	}
}

func TestExitStatusString(t *testing.T) {
	for _, tc := range []struct {
		e    *ExitStatus
		want string
	}{
		{nil, ""},
		{&ExitStatus{Code: 3}, "status 3"},
		{&ExitStatus{Code: 137, Signal: "SIGKILL"}, "killed by SIGKILL"},
		{&ExitStatus{Code: 143, Reason: "killed"}, "killed, status 143"},
		{&ExitStatus{Code: 137, Signal: "SIGKILL", Reason: "checkpointed"}, "checkpointed"},
	} {
		if got := tc.e.String(); got != tc.want {
			t.Errorf("%+v.String() = %q, want %q", tc.e, got, tc.want)
		}
	}
}

// An update that changes nothing writes nothing (the record keeps its
// inode: a replacement is made beside it, so its inode would differ);
// concurrent UpdateLive calls under the lock lose nothing, like Update's.
func TestUpdateWritesOnlyChanges(t *testing.T) {
	s, err := OpenRegistry(filepath.Join(t.TempDir(), "root"))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Create(&Record{Name: "b", ID: NewID(), Created: time.Now().UTC(), Status: Running}); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(s.Dir("b"), recordFile)
	inode := func() uint64 {
		var st unix.Stat_t
		if err := unix.Stat(path, &st); err != nil {
			t.Fatal(err)
		}
		return st.Ino
	}
	was := inode()
	if _, err := s.Update("b", func(r *Record) error { r.Status = Running; return nil }); err != nil {
		t.Fatal(err)
	}
	if inode() != was {
		t.Error("an update that changed nothing replaced the record")
	}
	var wg sync.WaitGroup
	for range 10 {
		wg.Go(func() {
			if _, err := s.UpdateLive("b", func(r *Record) error { r.Operation += "x"; return nil }); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	if got, err := s.Load("b"); err != nil || got.Operation != "xxxxxxxxxx" {
		t.Fatalf("after 10 live updates: %+v, %v", got, err)
	}
}
