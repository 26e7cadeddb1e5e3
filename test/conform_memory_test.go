package test

import (
	"encoding/json"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestForeignRestoredMemoryFigure: a checkpoint of a job restored from a
// --pid checkpoint (CRIU run inside the job's namespaces) reports the
// memory CRIU wrote, in its summary and in its manifest, not 0B.
func TestForeignRestoredMemoryFigure(t *testing.T) {
	e := newEnv(t)
	requireCriu(t)
	pid, read := foreignTree(t)
	eventually(t, 10*time.Second, "foreign counter", func() bool { return len(read()) >= 5 })
	first := filepath.Join(t.TempDir(), "first.ferry")
	e.must("checkpoint", "--pid", strconv.Itoa(pid), "-o", first)
	name := strings.TrimSpace(e.must("restore", first))
	e.waitLines(name, "", 3)
	for _, c := range []struct{ what, out string }{
		{"streamed, left running", filepath.Join(t.TempDir(), "second.ferry")},
		{"directory, left running", filepath.Join(t.TempDir(), "second.ckpt")},
	} {
		out := e.must("checkpoint", "--leave-running", "-o", c.out, name)
		m := regexp.MustCompile(`, ([0-9.]+)([KMG]i)?B memory`).FindStringSubmatch(out)
		if m == nil {
			t.Fatalf("%s: no memory figure in %q", c.what, out)
		}
		if v, _ := strconv.ParseFloat(m[1], 64); v == 0 {
			t.Errorf("%s: summary says %sB memory: %s", c.what, m[1]+m[2], out)
		}
		var info struct {
			Manifest struct {
				MemoryBytes int64 `json:"memoryBytes"`
			} `json:"manifest"`
		}
		if err := json.Unmarshal([]byte(e.must("inspect", "--json", c.out)), &info); err != nil {
			t.Fatal(err)
		}
		if info.Manifest.MemoryBytes <= 0 {
			t.Errorf("%s: manifest says %d bytes of memory", c.what, info.Manifest.MemoryBytes)
		}
	}
}
