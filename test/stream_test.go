package test

import (
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestStreamCheckpoint: the single-file checkpoint, through a file and
// through a pipe, with inspect and verify, and damaged files refused.
func TestStreamCheckpoint(t *testing.T) {
	e := newEnv(t)
	requireCriu(t)
	w := buildWorkload(t)
	e.must("run", "--name", "mem", "--", w, "memory", "64")
	e.waitLines("mem", "sum ", 1)
	sum := e.lines("mem", "sum ")[0]

	file := filepath.Join(t.TempDir(), "mem.ferry")
	// Not on a terminal: no progress, nothing on stderr.
	if r := e.ferry("checkpoint", "--leave-running", "-o", file, "mem"); r.code != 0 || r.stderr != "" {
		t.Fatalf("checkpoint: %s", r)
	}
	st, err := os.Stat(file)
	if err != nil || !st.Mode().IsRegular() || st.Mode().Perm() != 0o600 {
		t.Fatalf("checkpoint file: %v %v, want a 0600 file", err, st)
	}
	if !strings.Contains(e.must("verify", file), "ok") {
		t.Fatal("verify of a good checkpoint did not say ok")
	}
	var info struct {
		Manifest struct {
			Job       string          `json:"job"`
			Processes int             `json:"processes"`
			Inventory json.RawMessage `json:"inventory"`
		} `json:"manifest"`
		RawBytes    uint64 `json:"rawBytes"`
		StoredBytes uint64 `json:"storedBytes"`
	}
	if err := json.Unmarshal([]byte(e.must("inspect", "--json", file)), &info); err != nil {
		t.Fatal(err)
	}
	if info.Manifest.Job != "mem" || info.Manifest.Processes < 2 || len(info.Manifest.Inventory) == 0 {
		t.Errorf("inspect: %+v", info.Manifest)
	}
	// Half the workload is text: zstd must shrink the stream well below raw.
	if info.StoredBytes == 0 || info.StoredBytes > info.RawBytes*3/4 {
		t.Errorf("stored %d of %d raw bytes: not compressed", info.StoredBytes, info.RawBytes)
	}
	if text := e.must("inspect", file); !strings.Contains(text, "job mem") || !strings.Contains(text, "pages-") {
		t.Errorf("inspect output:\n%s", text)
	}

	// Restore from the file: memory intact, and progress as JSON lines
	// counts what was served to CRIU (the pages at least).
	r := e.ferry("restore", "--progress=json", "--name", "fromfile", file)
	if r.code != 0 {
		t.Fatalf("restore: %s", r)
	}
	if last := lastProgress(t, r.stderr); last.Op != "restore" || last.Bytes < 64<<20 || uint64(last.Bytes) > info.RawBytes || last.Total != int64(info.RawBytes) {
		t.Errorf("restore progress %+v, raw bytes %d", last, info.RawBytes)
	}
	e.waitLines("fromfile", "verify ", len(e.lines("fromfile", "verify "))+1)
	for _, l := range e.lines("fromfile", "verify ") {
		if !strings.HasSuffix(l, sum) {
			t.Fatalf("restored from file: %q, want sum %s", l, sum)
		}
	}

	// Through a pipe: ferry checkpoint -o - | ferry restore -.
	pipe := exec.Command("sh", "-c", `"$0" --root "$1" checkpoint --leave-running -o - mem | "$0" --root "$1" restore --name frompipe -`, ferryBin, e.root)
	if out, err := pipe.CombinedOutput(); err != nil || !strings.Contains(string(out), "frompipe") {
		t.Fatalf("checkpoint | restore: %v\n%s", err, out)
	}
	e.waitLines("frompipe", "verify ", len(e.lines("frompipe", "verify "))+1)
	for _, l := range e.lines("frompipe", "verify ") {
		if !strings.HasSuffix(l, sum) {
			t.Fatalf("restored through a pipe: %q, want sum %s", l, sum)
		}
	}

	// Damaged copies: a flipped byte in the middle (inside the memory
	// pages), a truncated tail. verify refuses both; restore refuses the
	// truncated one before anything runs (the index is missing) and aborts
	// the flipped one when it reaches the bad chunk, leaving nothing.
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	flipped := filepath.Join(t.TempDir(), "flipped.ferry")
	bad := append([]byte(nil), data...)
	bad[len(bad)/2] ^= 0x01
	if err := os.WriteFile(flipped, bad, 0o600); err != nil {
		t.Fatal(err)
	}
	truncated := filepath.Join(t.TempDir(), "truncated.ferry")
	if err := os.WriteFile(truncated, data[:len(data)*2/3], 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ name, path, want string }{
		{"flipped", flipped, "corrupt"},
		{"truncated", truncated, "truncated"},
	} {
		if r := e.ferry("verify", tc.path); r.code != 14 || !strings.Contains(r.stderr, tc.want) {
			t.Errorf("verify %s: %s", tc.name, r)
		}
		before, _ := os.ReadFile(tc.path)
		if r := e.ferry("restore", "--name", "bad-"+tc.name, tc.path); r.code != 14 || !strings.Contains(r.stderr, tc.want) {
			t.Errorf("restore %s: %s", tc.name, r)
		}
		if after, _ := os.ReadFile(tc.path); string(after) != string(before) {
			t.Errorf("restore changed the %s checkpoint", tc.name)
		}
		if _, ok := e.list()["bad-"+tc.name]; ok {
			t.Errorf("refused restore of %s left a job", tc.name)
		}
		// Through a pipe the whole stream is checked before CRIU starts.
		pipe := exec.Command("sh", "-c", `"$0" --root "$1" restore --name "$2" - < "$3"`, ferryBin, e.root, "bad-pipe-"+tc.name, tc.path)
		out, err := pipe.CombinedOutput()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 14 || !strings.Contains(string(out), tc.want) {
			t.Errorf("restore - < %s: %v: %s", tc.name, err, out)
		}
		if _, ok := e.list()["bad-pipe-"+tc.name]; ok {
			t.Errorf("refused restore of %s from a pipe left a job", tc.name)
		}
	}
	assertNoStrays(t, e)
	// Without --leave-running the images stream straight from CRIU into
	// the file (no scratch copy); the job ends once the file is durable.
	direct := filepath.Join(t.TempDir(), "direct.ferry")
	r = e.ferry("checkpoint", "--progress", "json", "-o", direct, "mem")
	if r.code != 0 {
		t.Fatalf("checkpoint: %s", r)
	}
	if st, err := os.Stat(direct); err != nil || lastProgress(t, r.stderr).Bytes != st.Size() {
		t.Errorf("checkpoint progress %+v, file %v %v", lastProgress(t, r.stderr), st, err)
	}
	if v := e.job("mem"); v.State != "exited" {
		t.Fatalf("job after a streamed checkpoint: %s", v.State)
	}
	e.must("verify", direct)
	e.must("restore", direct)
	n := len(e.lines("mem", "verify "))
	e.waitLines("mem", "verify ", n+1)
	for _, l := range e.lines("mem", "verify ")[n:] {
		if !strings.HasSuffix(l, sum) {
			t.Fatalf("restored from a streamed checkpoint: %q, want sum %s", l, sum)
		}
	}

	assertNoStrays(t, e)

	// A stream to standard output is refused for a directory format.
	if r := e.ferry("checkpoint", "--format", "dir", "-o", "-", "mem"); r.code != 2 {
		t.Errorf("--format dir -o -: %s", r)
	}
}

// assertNoStrays checks that no restore left its serve directory behind
// and that no process of a refused restore survives in a job cgroup.
func assertNoStrays(t *testing.T, e *env) {
	t.Helper()
	for _, dir := range []string{filepath.Join(e.root, "serve"), "/run/ferry-serve"} {
		if entries, _ := os.ReadDir(dir); len(entries) != 0 {
			t.Errorf("restores left serve directories in %s: %v", dir, entries)
		}
	}
}

type progressLine struct {
	Op    string `json:"op"`
	Phase string `json:"phase"`
	Bytes int64  `json:"bytes"`
	Total int64  `json:"total"`
	Done  bool   `json:"done"`
	Error string `json:"error"`
}

// lastProgress checks that every line of stderr is a progress object and
// returns the last, which must say done.
func lastProgress(t *testing.T, stderr string) progressLine {
	t.Helper()
	var last progressLine
	lines := strings.Split(strings.TrimSpace(stderr), "\n")
	for i, l := range lines {
		var p progressLine
		if err := json.Unmarshal([]byte(l), &p); err != nil {
			t.Fatalf("progress line %q: %v", l, err)
		}
		if p.Bytes < last.Bytes || p.Done != (i == len(lines)-1) {
			t.Fatalf("progress lines out of order:\n%s", stderr)
		}
		last = p
	}
	if last.Error != "" {
		t.Fatalf("progress reports an error: %s", last.Error)
	}
	return last
}
