package restore

import (
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ferry-cr/ferry/internal/criu"
)

// testCriu is the CRIU the restore tests run: FERRY_CRIU, or the one the
// repository provisions.
func testCriu(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: runs criu restore")
	}
	path := os.Getenv("FERRY_CRIU")
	if path == "" {
		path, _ = filepath.Abs("../.deps/bin/criu")
	}
	if _, err := os.Stat(path); err != nil {
		t.Skipf("no CRIU at %s", path)
	}
	return path
}

// TestLazyRestoreHeld runs a real `criu restore --stream --lazy-pages`
// against heldImages with no lazy-pages daemon listening: CRIU asks for
// its first image before it connects to the daemon (else it would fail at
// once, daemon or not, and holding it would be useless), waits there for
// as long as ferry holds it, and exits non-zero, without hanging, when
// ferry refuses (the daemon failed) or goes away.
func TestLazyRestoreHeld(t *testing.T) {
	criuPath := testCriu(t)

	// held starts CRIU on an empty served directory and returns once
	// CRIU waits at its first image; ready's answer is sent on release.
	held := func(t *testing.T) (srv *criu.Server, release chan<- error, exited <-chan error, refused *error, dir string) {
		t.Helper()
		dir = t.TempDir()
		// Not an inventory: CRIU fails on it, once it is let through.
		if err := os.WriteFile(filepath.Join(dir, "inventory.img"), []byte("not an image"), 0o600); err != nil {
			t.Fatal(err)
		}
		srv, err := criu.ListenServe(dir)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { srv.Close() })
		asked, answer := make(chan struct{}), make(chan error, 1)
		refused = new(error)
		served := make(chan error, 1)
		// As restoreFrom serves a lazySource: the first request waits for
		// ready, whose error refuses it and every later one.
		ready := sync.OnceValue(func() error {
			close(asked)
			return <-answer
		})
		go func() {
			served <- srv.Serve(context.Background(), func(name string) (func(io.Writer) error, bool) {
				if err := ready(); err != nil {
					*refused = err
					return nil, false
				}
				return fileImage(dir, name)
			})
		}()
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		t.Cleanup(cancel)
		cmd := exec.CommandContext(ctx, criuPath, "restore", "--stream", "--lazy-pages", "--images-dir", dir,
			"--work-dir", dir, "--log-file", "restore.log", "-v4", "--restore-detached")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		t.Cleanup(func() {
			cancel()
			answer <- errors.New("test over")
			<-served
		})
		select {
		case <-asked:
		case err := <-done:
			t.Fatalf("criu exited (%v) before asking for an image: %s", err, readLog(dir))
		case <-time.After(15 * time.Second):
			t.Fatal("criu never asked for an image")
		}
		// Held: CRIU has not tried the daemon's socket yet.
		select {
		case err := <-done:
			t.Fatalf("criu exited (%v) while held: %s", err, readLog(dir))
		case <-time.After(300 * time.Millisecond):
		}
		if log := readLog(dir); strings.Contains(log, "lazy-pages.socket") {
			t.Fatalf("criu tried the daemon's socket before its first image: %s", log)
		}
		return srv, answer, done, refused, dir
	}
	exits := func(t *testing.T, exited <-chan error, dir string) {
		t.Helper()
		select {
		case err := <-exited:
			if err == nil {
				t.Fatalf("criu restore passed: %s", readLog(dir))
			}
		case <-time.After(10 * time.Second):
			t.Fatal("criu still runs after it was let go")
		}
	}

	t.Run("the daemon failed: criu exits before it does anything", func(t *testing.T) {
		_, release, exited, refused, dir := held(t)
		release <- errors.New("the lazy-pages daemon failed")
		exits(t, exited, dir)
		if *refused == nil {
			t.Error("the refusal was not kept")
		}
		if log := readLog(dir); !strings.Contains(log, "No inventory.img image") {
			t.Errorf("criu did not fail on its first image: %s", log)
		}
	})

	t.Run("the daemon is ready: criu goes on with its images", func(t *testing.T) {
		_, release, exited, refused, dir := held(t)
		release <- nil
		// No checkpoint here: CRIU reads the served inventory and fails
		// on it, which shows it was let through.
		exits(t, exited, dir)
		if *refused != nil {
			t.Errorf("refused %v", *refused)
		}
		if log := readLog(dir); strings.Contains(log, "No inventory.img image") || !strings.Contains(log, "Magic") {
			t.Errorf("criu did not read the inventory it was served: %s", log)
		}
	})

	t.Run("ferry goes away while criu is held", func(t *testing.T) {
		srv, _, exited, _, dir := held(t)
		srv.Close()
		exits(t, exited, dir)
	})
}

func readLog(dir string) string {
	b, _ := os.ReadFile(filepath.Join(dir, "restore.log"))
	return string(b)
}
