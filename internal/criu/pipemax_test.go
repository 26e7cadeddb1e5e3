package criu

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Two lazy dumps at once share the raise: the second does not wait for
// the first to end (it did: an exclusive lock taken on the state file
// waited for the first's shared one, for its whole migration), and the
// value goes back only when the last lets go. (flock locks belong to an
// open file, so two raisers in one process stand for two processes.)
func TestRaisePipeMaxShared(t *testing.T) {
	dir := t.TempDir()
	oldPath, oldState, oldLock := pipeMaxPath, pipeMaxState, pipeMaxLock
	pipeMaxPath, pipeMaxState, pipeMaxLock = filepath.Join(dir, "pipe-max-size"), filepath.Join(dir, "state"), filepath.Join(dir, "lock")
	t.Cleanup(func() { pipeMaxPath, pipeMaxState, pipeMaxLock = oldPath, oldState, oldLock })
	if err := os.WriteFile(pipeMaxPath, []byte("1048576\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	value := func() string {
		b, err := os.ReadFile(pipeMaxPath)
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(string(b))
	}
	release1, err := RaisePipeMax(LazyPipeSize)
	if err != nil {
		t.Fatal(err)
	}
	if v := value(); v != "4194304" {
		t.Fatalf("raised to %s, want 4194304", v)
	}
	second := make(chan func(), 1)
	go func() {
		r, err := RaisePipeMax(LazyPipeSize)
		if err != nil {
			t.Error(err)
		}
		second <- r
	}()
	var release2 func()
	select {
	case release2 = <-second:
	case <-time.After(10 * time.Second):
		t.Fatal("a second raise waited for the first to be released")
	}
	release1()
	if v := value(); v != "4194304" {
		t.Fatalf("the first release put %s back while the second still needs the raise", v)
	}
	release2()
	if v := value(); v != "1048576" {
		t.Fatalf("after the last release the value is %s, want 1048576 back", v)
	}
	// And again from the start: nothing of the first round is left over.
	r, err := RaisePipeMax(LazyPipeSize)
	if err != nil || value() != "4194304" {
		t.Fatalf("a later raise: %v, value %s", err, value())
	}
	r()
	if v := value(); v != "1048576" {
		t.Fatalf("after a later round the value is %s", v)
	}
}
