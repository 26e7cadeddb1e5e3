package criu

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestLogErrorsAndExplain(t *testing.T) {
	log := `(00.000100) Version: 4.2.1
(00.000200) Error (criu/util.c:1533): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted
(00.001000) Dumping task 42
(00.002000) Opening /srv/data
(00.003000) Error (criu/files-reg.c:2063): File /srv/log has bad size 1019 (expect 965)
(00.004000) Error (criu/files.c:1213): Unable to open fd=1 id=0x5
(00.005000) Restore failed
`
	path := filepath.Join(t.TempDir(), "restore.log")
	if err := os.WriteFile(path, []byte(log), 0o600); err != nil {
		t.Fatal(err)
	}
	lines := LogErrors(path)
	if len(lines) == 0 || strings.Contains(strings.Join(lines, "\n"), "RLIMIT_NOFILE") {
		t.Fatalf("LogErrors = %q: want the real errors, not the rlimit noise", lines)
	}
	if !strings.Contains(lines[0], "Dumping task 42") {
		t.Errorf("LogErrors does not quote the lines before the first error: %q", lines)
	}
	base := errors.New("criu RESTORE")
	err := Explain(base, path)
	if !errors.Is(err, base) {
		t.Fatal("Explain does not wrap the original error")
	}
	msg := err.Error()
	for _, want := range []string{"File /srv/log has bad size 1019 (expect 965)", "changed size since the checkpoint", path} {
		if !strings.Contains(msg, want) {
			t.Errorf("Explain message %q lacks %q", msg, want)
		}
	}
	if strings.Contains(msg, "\n") {
		t.Errorf("Explain message spans lines: %q", msg)
	}
	if Explain(nil, path) != nil {
		t.Error("Explain(nil) != nil")
	}
	if got := Explain(base, filepath.Join(t.TempDir(), "missing.log")).Error(); !strings.HasPrefix(got, "criu RESTORE") {
		t.Errorf("Explain with no log = %q", got)
	}
}
