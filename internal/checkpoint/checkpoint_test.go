package checkpoint

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"google.golang.org/protobuf/proto"
)

func write(t *testing.T, dir string, m *Manifest, files map[string]string) {
	t.Helper()
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	data, err := Encode(m)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, ManifestFile), data, 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestLoad(t *testing.T) {
	good := func() *Manifest {
		return &Manifest{Format: FormatVersion, Job: "j", Files: map[string]int64{"core-1.img": 4, "pages-1.img": 8}}
	}
	files := map[string]string{"core-1.img": "core", "pages-1.img": "pagesabc"}
	for _, tc := range []struct {
		name  string
		setup func(t *testing.T, dir string)
		want  error
	}{
		{"good", func(t *testing.T, dir string) { write(t, dir, good(), files) }, nil},
		{"no manifest", func(t *testing.T, dir string) {}, ErrNotCheckpoint},
		{"garbage manifest", func(t *testing.T, dir string) {
			os.WriteFile(filepath.Join(dir, ManifestFile), []byte("{not json"), 0o600)
		}, ErrNotCheckpoint},
		{"future version", func(t *testing.T, dir string) {
			os.WriteFile(filepath.Join(dir, ManifestFile), []byte(`{"format": 99, "job": "j"}`), 0o600)
		}, ErrUnsupportedVersion},
		{"missing image", func(t *testing.T, dir string) {
			write(t, dir, good(), map[string]string{"core-1.img": "core"})
		}, ErrIncomplete},
		{"truncated image", func(t *testing.T, dir string) {
			write(t, dir, good(), map[string]string{"core-1.img": "core", "pages-1.img": "page"})
		}, ErrIncomplete},
		{"no images listed", func(t *testing.T, dir string) {
			m := good()
			m.Files = nil
			write(t, dir, m, nil)
		}, ErrIncomplete},
		{"path in file name", func(t *testing.T, dir string) {
			m := good()
			m.Files = map[string]int64{"../etc/passwd": 1}
			write(t, dir, m, nil)
		}, ErrNotCheckpoint},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			tc.setup(t, dir)
			m, err := Load(dir)
			if tc.want == nil {
				if err != nil || m.Job != "j" {
					t.Fatalf("Load = %+v, %v", m, err)
				}
				return
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("Load = %v, want %v", err, tc.want)
			}
		})
	}
}

// SameRestore compares what a restore's command line is made of, and
// nothing else (a stream's final manifest adds sizes and statistics to
// its first record).
func TestSameRestore(t *testing.T) {
	base := &Manifest{Format: FormatVersion, Job: "j", Command: []string{"/bin/job"}, OutputPipe: "pipe:[1]", NetworkLock: "nftables"}
	later := proto.CloneOf(base)
	later.Files, later.Processes, later.MemoryBytes = map[string]int64{"inventory.img": 10}, 3, 1<<20
	if !SameRestore(base, later) {
		t.Error("sizes and statistics made a difference")
	}
	for name, change := range map[string]func(m *Manifest){
		"output pipe":     func(m *Manifest) { m.OutputPipe = "pipe:[2]" },
		"tcp":             func(m *Manifest) { m.TcpEstablished = true },
		"network lock":    func(m *Manifest) { m.NetworkLock = "iptables" },
		"file locks":      func(m *Manifest) { m.FileLocks = true },
		"shell job":       func(m *Manifest) { m.ShellJob = true },
		"external pid ns": func(m *Manifest) { m.ExternalPidNs = true },
		"command":         func(m *Manifest) { m.Command = []string{"/bin/other"} },
	} {
		other := proto.CloneOf(base)
		change(other)
		if SameRestore(base, other) {
			t.Errorf("%s: no difference", name)
		}
	}
}
