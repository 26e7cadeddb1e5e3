package test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// oneLine checks that a failure said one line, "ferry: ...", and nothing
// else (no help text).
func oneLine(t *testing.T, what string, r result, want string) {
	t.Helper()
	lines := strings.Split(strings.TrimSpace(r.stderr), "\n")
	if len(lines) != 1 || !strings.HasPrefix(lines[0], "ferry: ") || !strings.Contains(lines[0], want) || r.stdout != "" {
		t.Errorf("%s: want one line on stderr naming %q and nothing on stdout, got %s", what, want, r)
	}
}

// TestExitUnwritableOutput: an output directory that exists but takes no
// files (/proc) is a bad output (17), found before the job is touched.
func TestExitUnwritableOutput(t *testing.T) {
	e := newEnv(t)
	requireCriu(t)
	e.must("run", "--name", "w", "--", "sh", "-c", counter)
	for _, args := range [][]string{
		{"checkpoint", "-o", "/proc/x.ferry", "w"},
		{"checkpoint", "--format", "dir", "-o", "/proc/xdir", "w"},
	} {
		r := e.ferry(args...)
		if r.code != 17 {
			t.Errorf("ferry %v: want exit 17, got %s", args, r)
		}
		oneLine(t, strings.Join(args, " "), r, "/proc")
	}
	if v := e.job("w"); v.State != "running" {
		t.Fatalf("job after the refused checkpoints: %s", v.State)
	}
	before := e.logLines("w")
	eventually(t, 10*time.Second, "the job to go on counting", func() bool { return e.logLines("w") > before+3 })
}

// TestExitRestoreDevice: a device is not a checkpoint (14).
func TestExitRestoreDevice(t *testing.T) {
	e := newEnv(t)
	r := e.ferry("restore", "/dev/zero")
	if r.code != 14 {
		t.Errorf("restore /dev/zero: want exit 14, got %s", r)
	}
	oneLine(t, "restore /dev/zero", r, "not a ferry checkpoint")
	if len(e.list()) != 0 {
		t.Errorf("restore of /dev/zero left a job: %v", e.list())
	}
}

// TestExitServeUsage: a listen address that does not parse, and a missing
// required flag, are usage errors (2) said in one line.
func TestExitServeUsage(t *testing.T) {
	e := newEnv(t)
	tok := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tok, []byte("0123456789abcdef0123456789abcdef\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	r := e.ferry("serve", "--listen", "nonsense", "--token-file", tok)
	if r.code != 2 {
		t.Errorf("serve --listen nonsense: want exit 2, got %s", r)
	}
	oneLine(t, "serve --listen nonsense", r, "nonsense")
	r = e.ferry("serve", "--listen", "127.0.0.1:0")
	if r.code != 2 {
		t.Errorf("serve without --token-file: want exit 2, got %s", r)
	}
	oneLine(t, "serve without --token-file", r, "--token-file")
	r = e.ferry("migrate", "nojob")
	if r.code != 2 {
		t.Errorf("migrate without --to and --token-file: want exit 2, got %s", r)
	}
	oneLine(t, "migrate without --to", r, "--to")
}
