package restore

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferry-cr/ferry/image"
	"github.com/ferry-cr/ferry/internal/checkpoint"
	"github.com/ferry-cr/ferry/internal/criu"
	pb "github.com/ferry-cr/ferry/proto"
)

// lazyArchive is a stream holding a checkpoint of files (and its
// manifest), as a post-copy source sends it.
func lazyArchive(t *testing.T, files map[string][]byte) *image.Archive {
	t.Helper()
	m := &checkpoint.Manifest{Format: checkpoint.FormatVersion, Job: "j", Files: map[string]int64{}}
	for name, data := range files {
		m.Files[name] = int64(len(data))
	}
	mj, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	w, err := image.NewWriter(&buf, &pb.Manifest{Job: "j"}, image.WriterOptions{})
	if err != nil {
		t.Fatal(err)
	}
	files[checkpoint.ManifestFile] = mj
	for name, data := range files {
		fw, err := w.Create(name)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := fw.Write(data); err != nil {
			t.Fatal(err)
		}
		if err := fw.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	a, err := image.ReadArchive(&buf)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.Close)
	return a
}

// TestEarlyLazy starts a real `criu lazy-pages` daemon on an EarlyLazy
// layout before any image has come: it gets through its start-up and
// waits at its first image (DaemonWaiting), and reads what Fill feeds it
// (here an inventory that is not one, on which it fails, which shows it
// read it). The restore's images land in Images, the daemon's later ones
// are linked into Daemon, and Close leaves nothing.
func TestEarlyLazy(t *testing.T) {
	criuPath := testCriu(t)
	head := &checkpoint.Manifest{Format: checkpoint.FormatVersion, Job: "j", Command: []string{"/bin/job"}, OutputPipe: "pipe:[7]"}
	e, err := NewEarlyLazy(t.TempDir(), head)
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if m, err := checkpoint.LoadManifest(e.Dir); err != nil || m.OutputPipe != "pipe:[7]" || len(m.Files) != 0 {
		t.Fatalf("the early manifest: %+v, %v", m, err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	link, peer := os.NewFile(uintptr(fds[0]), "page link"), os.NewFile(uintptr(fds[1]), "page link peer")
	defer link.Close()
	defer peer.Close()
	started := make(chan error, 1)
	var daemon *LazyPages
	go func() {
		var err error
		// Nothing answers on the page link: the daemon fails before it
		// would use it.
		daemon, err = StartLazyPages(ctx, &criu.Binary{Path: criuPath}, e.Daemon, e.Dir, link, nil)
		started <- err
	}()
	select {
	case <-e.DaemonWaiting():
	case err := <-started:
		t.Fatalf("the daemon ended its start (%v) before it waited for its first image: %s", err, readFile(e.Dir, "lazy-pages.log"))
	case <-time.After(20 * time.Second):
		t.Fatalf("the daemon never opened its first image: %s", readFile(e.Dir, "lazy-pages.log"))
	}
	// Waiting there, not failing: no image has come.
	select {
	case err := <-started:
		t.Fatalf("the daemon ended (%v) with no image fed: %s", err, readFile(e.Dir, "lazy-pages.log"))
	case <-time.After(300 * time.Millisecond):
	}

	m, err := e.Fill(lazyArchive(t, map[string][]byte{
		"inventory.img": []byte("not an inventory"),
		"pstree.img":    []byte("not a pstree"),
		"pagemap-1.img": []byte("pagemap"),
		"mm-1.img":      []byte("mm"),
	}))
	if err != nil {
		t.Fatal(err)
	}
	if len(m.Files) != 4 {
		t.Errorf("Fill's manifest lists %v", m.Files)
	}
	select {
	case err := <-started:
		if err == nil {
			daemon.Kill()
			t.Fatal("the daemon took a bogus inventory")
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the daemon did not go on once fed")
	}
	if log := readFile(e.Dir, "lazy-pages.log"); !strings.Contains(log, "inventory") {
		t.Errorf("the daemon did not fail on the inventory it was fed: %s", log)
	}
	for _, name := range []string{"inventory.img", "pstree.img", "pagemap-1.img", "mm-1.img"} {
		if _, err := os.Stat(filepath.Join(e.Images, name)); err != nil {
			t.Errorf("images: %v", err)
		}
	}
	for _, name := range []string{"pagemap-1.img", "mm-1.img"} {
		if b, err := os.ReadFile(filepath.Join(e.Daemon, name)); err != nil || len(b) == 0 {
			t.Errorf("the daemon's %s: %q, %v", name, b, err)
		}
	}
	e.Close()
	if _, err := os.Stat(e.Dir); !os.IsNotExist(err) {
		t.Errorf("Close left %s: %v", e.Dir, err)
	}
}

// A layout whose daemon never came (it failed to start) closes at once.
func TestEarlyLazyNoDaemon(t *testing.T) {
	e, err := NewEarlyLazy(t.TempDir(), &checkpoint.Manifest{Format: checkpoint.FormatVersion, Job: "j"})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { e.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Close waits for a daemon that never came")
	}
	select {
	case <-e.DaemonWaiting():
		t.Error("DaemonWaiting with no daemon")
	default:
	}
}

func readFile(dir, name string) string {
	b, _ := os.ReadFile(filepath.Join(dir, name))
	return string(b)
}

// The layout goes to the tmpfs when there is one (the images are written
// while the job is stopped), else to the base given; a base too deep for
// the sockets' paths gives way to /run/ferry-serve.
func TestEarlyLazyBase(t *testing.T) {
	var sf unix.Statfs_t
	if unix.Statfs(shmDir, &sf) != nil || sf.Type != unix.TMPFS_MAGIC {
		t.Skipf("%s is not a tmpfs here", shmDir)
	}
	base := t.TempDir()
	e, err := NewEarlyLazy(base, &checkpoint.Manifest{Format: checkpoint.FormatVersion, Job: "j"})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(e.Dir, shmDir+"/.ferry-scratch-lazy-") {
		t.Errorf("Dir %s, want a scratch directory in %s", e.Dir, shmDir)
	}
	e.Close()
	if _, err := os.Stat(e.Dir); !os.IsNotExist(err) {
		t.Errorf("Close left %s", e.Dir)
	}

	earlyTmpfs = base // not a tmpfs
	defer func() { earlyTmpfs = shmDir }()
	if e, err = NewEarlyLazy(base, &checkpoint.Manifest{Format: checkpoint.FormatVersion, Job: "j"}); err != nil {
		t.Fatal(err)
	}
	if filepath.Dir(e.Dir) != base {
		t.Errorf("Dir %s with no tmpfs, want it in %s", e.Dir, base)
	}
	e.Close()

	deep := filepath.Join(t.TempDir(), strings.Repeat("d", 60), strings.Repeat("e", 60))
	e, err = NewEarlyLazy(deep, &checkpoint.Manifest{Format: checkpoint.FormatVersion, Job: "j"})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(e.Dir, shortServeDir+"/") || len(filepath.Join(e.Dir, lazySocket)) >= maxSocketPath {
		t.Errorf("Dir %s", e.Dir)
	}
	e.Close()
	if _, err := os.Stat(e.Dir); !os.IsNotExist(err) {
		t.Errorf("Close left %s", e.Dir)
	}
}
