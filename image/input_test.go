package image

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// A FIFO with no writer: OpenInput waits, and ends with the context.
func TestOpenInputFIFONoWriter(t *testing.T) {
	fifo := filepath.Join(t.TempDir(), "f")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Skip("mkfifo:", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		in, err := OpenInput(ctx, fifo)
		if in != nil {
			in.Close()
		}
		done <- err
	}()
	select {
	case err := <-done:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("OpenInput of a FIFO without a writer: %v, want the context's deadline", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("OpenInput of a FIFO without a writer ignored its context")
	}
}

// A pipe given as a file (standard input): read through, then a writer
// that stalls is cut short by the context with its cause.
func TestNewInputPipeStalls(t *testing.T) {
	// A blocking pipe, as a shell gives standard input (os.Pipe's are
	// non-blocking already).
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	pr, pw := os.NewFile(uintptr(fds[0]), "r"), os.NewFile(uintptr(fds[1]), "w")
	defer pr.Close()
	defer pw.Close()
	cause := errors.New("test over")
	ctx, cancel := context.WithCancelCause(context.Background())
	in, err := NewInput(ctx, pr)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	if _, err := pw.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 5)
	if _, err := io.ReadFull(in, b); err != nil || string(b) != "hello" {
		t.Fatalf("read %q, %v", b, err)
	}
	time.AfterFunc(200*time.Millisecond, func() { cancel(cause) })
	done := make(chan error, 1)
	go func() { _, err := in.Read(b); done <- err }()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) || !errors.Is(err, cause) {
			t.Fatalf("read of a stalled pipe after cancel: %v, want context.Canceled and its cause", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("read of a stalled pipe ignored its context")
	}
	// pr's own description is untouched: still blocking.
	if fl, err := unix.FcntlInt(uintptr(fds[0]), unix.F_GETFL, 0); err != nil || fl&unix.O_NONBLOCK != 0 {
		t.Errorf("the caller's pipe was made non-blocking (%v)", err)
	}
}

// A writer that closes: the reader sees the data, then the end.
func TestNewInputPipeEOF(t *testing.T) {
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	in, err := NewInput(context.Background(), pr)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	go func() { pw.Write([]byte("all of it")); pw.Close() }()
	b, err := io.ReadAll(in)
	if err != nil || string(b) != "all of it" {
		t.Fatalf("ReadAll: %q, %v", b, err)
	}
}
