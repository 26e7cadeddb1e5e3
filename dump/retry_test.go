package dump

import (
	"os"
	"path/filepath"
	"testing"
)

// The failures worth a second try are told from CRIU's log.
func TestRetryableFailures(t *testing.T) {
	log := filepath.Join(t.TempDir(), "dump.log")
	for _, tc := range []struct {
		line               string
		stuck, parasitical bool
	}{
		{"(00.5) Error (criu/cr-dump.c:1655): Timeout reached. Try to interrupt: 0", true, false},
		{"Error (compel/src/lib/infect.c:1): Unseizable non-zombie 42 found, state D, err 0/0", true, false},
		{"pie: 1: Error (criu/pie/parasite.c:634): Can't create a directory (-17)", false, true},
		{"Error (criu/cr-dump.c:1): simulated failure", false, false},
	} {
		if err := os.WriteFile(log, []byte(tc.line+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		if got := seizeStuck(log); got != tc.stuck {
			t.Errorf("seizeStuck(%q) = %v", tc.line, got)
		}
		if got := parasiteCollided(log); got != tc.parasitical {
			t.Errorf("parasiteCollided(%q) = %v", tc.line, got)
		}
	}
}
