package criu

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func TestParseVersion(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Version
		bad  bool
	}{
		{"Version: 4.2.1\n", Version{4, 2, 1}, false},
		{"Version: 4.2\nGitID: v4.2-22-g2cf8f13ca\n", Version{4, 2, 0}, false},
		{"Version: 3.17.1\n", Version{3, 17, 1}, false},
		{"criu: command not found", Version{}, true},
		{"", Version{}, true},
	} {
		got, err := ParseVersion(tc.in)
		if (err != nil) != tc.bad || got != tc.want {
			t.Errorf("ParseVersion(%q) = %v, %v", tc.in, got, err)
		}
	}
	if !(Version{4, 2, 0}).AtLeast(MinVersion) || (Version{4, 1, 9}).AtLeast(MinVersion) || !(Version{5, 0, 0}).AtLeast(MinVersion) {
		t.Error("AtLeast is wrong")
	}
}

func fake(t *testing.T, dir, version string) string {
	t.Helper()
	p := filepath.Join(dir, "criu")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte("#!/bin/sh\necho 'Version: "+version+"'\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestFind(t *testing.T) {
	ctx := context.Background()
	tmp := t.TempDir()
	good := fake(t, filepath.Join(tmp, "good"), "4.2.1")
	old := fake(t, filepath.Join(tmp, "old"), "4.1.1")
	prov := fake(t, filepath.Join(tmp, "prov"), "4.3.0")
	pathDir := filepath.Join(tmp, "path")
	fake(t, pathDir, "4.2.0")
	t.Setenv("PATH", pathDir)

	for _, tc := range []struct {
		name    string
		opts    FindOptions
		source  string
		version Version
		err     error
	}{
		{"flag first", FindOptions{Flag: good, Env: old, ProvisionedDirs: []string{prov}}, "--criu", Version{4, 2, 1}, nil},
		{"env second", FindOptions{Env: good, ProvisionedDirs: []string{prov}}, "$FERRY_CRIU", Version{4, 2, 1}, nil},
		{"provisioned third", FindOptions{ProvisionedDirs: []string{filepath.Join(tmp, "none"), prov}}, "provisioned", Version{4, 3, 0}, nil},
		{"PATH last", FindOptions{ProvisionedDirs: []string{filepath.Join(tmp, "none")}}, "PATH", Version{4, 2, 0}, nil},
		{"too old", FindOptions{Flag: old}, "", Version{}, ErrTooOld},
		{"flag to a missing file does not fall through", FindOptions{Flag: filepath.Join(tmp, "missing"), ProvisionedDirs: []string{prov}}, "", Version{}, ErrNotFound},
		{"not criu", FindOptions{Flag: "/bin/true"}, "", Version{}, ErrNotFound},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, err := Find(ctx, tc.opts)
			if tc.err != nil {
				if !errors.Is(err, tc.err) {
					t.Fatalf("Find = %v, want %v", err, tc.err)
				}
				return
			}
			if err != nil || b.Source != tc.source || b.Version != tc.version {
				t.Fatalf("Find = %+v, %v; want %s %v", b, err, tc.source, tc.version)
			}
		})
	}
	t.Setenv("PATH", filepath.Join(tmp, "empty"))
	if _, err := Find(ctx, FindOptions{}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Find with nothing anywhere = %v, want ErrNotFound", err)
	}
}

// TestRealCriu checks the provisioned CRIU when it is there: version,
// `criu check`, and that feature answers match CRIU's own exit status.
func TestRealCriu(t *testing.T) {
	wd, _ := os.Getwd()
	path := filepath.Join(wd, "..", "..", ".deps", "bin", "criu")
	if _, err := os.Stat(path); err != nil {
		t.Skip("no provisioned CRIU (run make deps)")
	}
	if os.Geteuid() != 0 {
		t.Skip("criu check needs root")
	}
	ctx := context.Background()
	b, err := Find(ctx, FindOptions{Flag: path})
	if err != nil {
		t.Fatal(err)
	}
	if ok, out, err := b.Check(ctx); !ok || err != nil {
		t.Fatalf("criu check: %v %v %s", ok, err, out)
	}
	if _, err := b.HasFeature(ctx, "no_such_feature"); err == nil {
		t.Error("HasFeature of an unknown feature succeeded")
	}
	if ok, err := b.HasFeature(ctx, "uffd"); err != nil {
		t.Errorf("HasFeature(uffd) = %v, %v", ok, err)
	}
	if !b.HasStream(ctx) {
		t.Error("the provisioned CRIU (Debian's) is built with --stream")
	}
}
