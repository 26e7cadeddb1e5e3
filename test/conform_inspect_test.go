package test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestInspectSaysWhatItChecked: ferry inspect reads a checkpoint's header
// and index only; of a checkpoint with a corrupt chunk it must not read as
// a clean bill of health: it says what it checked and points to ferry
// verify, which finds the corruption (14).
func TestInspectSaysWhatItChecked(t *testing.T) {
	e := newEnv(t)
	requireCriu(t)
	e.must("run", "--name", "ins", "--", "sh", "-c", counter)
	e.waitLines("ins", "", 5)
	ckpt := filepath.Join(t.TempDir(), "ins.ferry")
	e.must("checkpoint", "--leave-running", "-o", ckpt, "ins")
	data, err := os.ReadFile(ckpt)
	if err != nil {
		t.Fatal(err)
	}
	data[len(data)/3] ^= 0xff
	if err := os.WriteFile(ckpt, data, 0o600); err != nil {
		t.Fatal(err)
	}
	out := e.must("inspect", ckpt)
	if strings.Contains(out, "checkpointable: yes") {
		t.Errorf("inspect of a corrupt checkpoint says checkpointable: yes:\n%s", out)
	}
	if !strings.Contains(out, "checked: the header and the index only") || !strings.Contains(out, "ferry verify "+ckpt) {
		t.Errorf("inspect does not say what it checked and that ferry verify checks the chunks:\n%s", out)
	}
	if r := e.ferry("verify", ckpt); r.code != 14 {
		t.Errorf("verify of the corrupt checkpoint: want 14, got %s", r)
	}

	dir := filepath.Join(t.TempDir(), "ins.ckpt")
	e.must("checkpoint", "--leave-running", "--format", "dir", "-o", dir, "ins")
	if out := e.must("inspect", dir); !strings.Contains(out, "checked: the manifest only") {
		t.Errorf("inspect of a directory does not say what it checked:\n%s", out)
	}
}
