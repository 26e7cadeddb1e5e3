package test

import (
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestRestoreTwiceWarns: restoring one checkpoint of a TCP server twice
// (the second with --name, a copy side by side) says so in one line on
// stderr, naming the address and the job already listening there; a copy
// of a tree that listens on nothing restores without a word.
func TestRestoreTwiceWarns(t *testing.T) {
	e := newEnv(t)
	requireCriu(t)
	w := buildWorkload(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	e.must("run", "--name", "srv", "--", w, "serve", addr)
	var c net.Conn
	eventually(t, 10*time.Second, "the server to listen", func() bool {
		c, err = net.Dial("tcp", addr)
		return err == nil
	})
	c.Close()
	ckpt := filepath.Join(t.TempDir(), "srv.ferry")
	e.must("checkpoint", "-o", ckpt, "srv")
	first := e.ferry("restore", ckpt)
	if first.code != 0 || strings.TrimSpace(first.stderr) != "" {
		t.Fatalf("first restore: want exit 0 and nothing on stderr, got %s", first)
	}
	second := e.ferry("restore", "--name", "srv2", ckpt)
	if second.code != 0 {
		t.Fatalf("second restore: %s", second)
	}
	lines := strings.Split(strings.TrimSpace(second.stderr), "\n")
	if len(lines) != 1 || !strings.Contains(lines[0], "warning") || !strings.Contains(lines[0], addr) || !strings.Contains(lines[0], "job srv") {
		t.Errorf("second restore of a listening tree: want one warning line naming %s and job srv, got %s", addr, second)
	}

	e.must("run", "--name", "cnt", "--", "sh", "-c", counter)
	e.waitLines("cnt", "", 3)
	ckpt2 := filepath.Join(t.TempDir(), "cnt.ferry")
	e.must("checkpoint", "--leave-running", "-o", ckpt2, "cnt")
	if r := e.ferry("restore", "--name", "cnt2", ckpt2); r.code != 0 || strings.TrimSpace(r.stderr) != "" {
		t.Errorf("restore of a copy that listens on nothing: want exit 0 and no word, got %s", r)
	}
}
