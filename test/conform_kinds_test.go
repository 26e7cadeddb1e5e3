package test

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestFanotifyCarried: fanotify marks on a directory and on a mount are
// carried by CRIU, so ferry checkpoints them and the restored job gets
// the events of a file written after the restore; a mark on a whole
// filesystem CRIU drops on restore, so ferry refuses it up front (16).
func TestFanotifyCarried(t *testing.T) {
	e := newEnv(t)
	requireCriu(t)
	w := buildWorkload(t)
	for _, how := range []string{"inode", "mount"} {
		t.Run(how, func(t *testing.T) {
			dir := t.TempDir()
			name := "fan-" + how
			e.must("run", "--name", name, "--", w, "fanotify", dir, how)
			e.waitLines(name, "fan ", 1)
			if err := os.WriteFile(filepath.Join(dir, "before-"+how), []byte("x"), 0o600); err != nil {
				t.Fatal(err)
			}
			eventually(t, 10*time.Second, "the event before the checkpoint", func() bool {
				return strings.Contains(e.must("logs", name), "before-"+how)
			})
			e.checkpointRestore(name, "fan ")
			if err := os.WriteFile(filepath.Join(dir, "after-"+how), []byte("x"), 0o600); err != nil {
				t.Fatal(err)
			}
			eventually(t, 10*time.Second, "the restored job to see a file written after the restore", func() bool {
				return strings.Contains(e.must("logs", name), "after-"+how)
			})
			e.noErrors(name)
		})
	}
	t.Run("fs", func(t *testing.T) {
		dir := t.TempDir()
		e.must("run", "--name", "fan-fs", "--", w, "fanotify", dir, "fs")
		e.waitLines("fan-fs", "fan ", 1)
		ckpt := filepath.Join(t.TempDir(), "fan-fs.ferry")
		r := e.ferry("checkpoint", "-o", ckpt, "fan-fs")
		if r.code != 16 || !strings.Contains(r.stderr, "FAN_MARK_FILESYSTEM") {
			t.Fatalf("checkpoint of a filesystem-wide fanotify mark: want 16 naming FAN_MARK_FILESYSTEM, got %s", r)
		}
		if v := e.job("fan-fs"); v.State != "running" {
			t.Fatalf("refused job is %s", v.State)
		}
	})
}

// TestSparseDeletedFileCarried: a deleted file of 2 GiB apparent size
// that takes a few KiB on disk is carried (CRIU dumps the blocks, not the
// holes), and the restored job reads back its pattern and its size.
func TestSparseDeletedFileCarried(t *testing.T) {
	e := newEnv(t)
	requireCriu(t)
	w := buildWorkload(t)
	path := filepath.Join(t.TempDir(), "sparse")
	e.must("run", "--name", "sparse", "--", w, "sparse", path, "2")
	e.waitLines("sparse", "sparse ", 3)
	ckpt := filepath.Join(t.TempDir(), "sparse.ferry")
	e.must("checkpoint", "-o", ckpt, "sparse")
	st, err := os.Stat(ckpt)
	if err != nil {
		t.Fatal(err)
	}
	if st.Size() > 64<<20 {
		t.Errorf("checkpoint of a sparse file is %d bytes: the holes travelled", st.Size())
	}
	at := len(e.lines("sparse", "sparse "))
	e.must("restore", ckpt)
	e.waitLines("sparse", "sparse ", at+5)
	e.noErrors("sparse")
	ls := e.lines("sparse", "sparse ")
	for i := 1; i < len(ls); i++ {
		a, _ := strconv.Atoi(strings.Fields(ls[i-1])[0])
		b, _ := strconv.Atoi(strings.Fields(ls[i])[0])
		if b != a+1 {
			t.Fatalf("sparse count jumps from %d to %d", a, b)
		}
	}
}
