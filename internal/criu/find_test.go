package criu

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
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
	t.Setenv(FactsDirEnv, "off")
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
	t.Setenv(FactsDirEnv, "off")
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

// TestFactsRemembered: what a CRIU answered (version, --stream, a feature
// check) is asked once per binary and boot: a second Find of the same
// binary runs nothing, a missing feature is asked again later, a changed
// binary is asked again, Fresh always asks, and an entry another user
// could have written is not trusted.
func TestFactsRemembered(t *testing.T) {
	t.Setenv(FactsDirEnv, filepath.Join(t.TempDir(), "facts"))
	dir := t.TempDir()
	calls := filepath.Join(dir, "calls")
	path := filepath.Join(dir, "criu")
	script := func(version string) {
		body := "#!/bin/sh\necho \"$*\" >> " + calls + "\n" +
			"case \"$1\" in\n" +
			"--version) echo 'Version: " + version + "' ;;\n" +
			"--help) echo '  --stream  dump to criu-image-streamer' ;;\n" +
			"check) [ \"$3\" = uffd ] && exit 0; exit 1 ;;\n" +
			"esac\n"
		if err := os.WriteFile(path, []byte(body), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	ran := func() []string {
		b, _ := os.ReadFile(calls)
		os.Remove(calls)
		return strings.Fields(strings.ReplaceAll(strings.TrimSpace(string(b)), " ", "_"))
	}
	ctx := context.Background()
	ask := func(opts FindOptions) (Version, bool, bool, bool) {
		t.Helper()
		b, err := Find(ctx, opts)
		if err != nil {
			t.Fatal(err)
		}
		uffd, _ := b.HasFeature(ctx, "uffd")
		dirty, _ := b.HasFeature(ctx, "mem_dirty_track")
		return b.Version, b.HasStream(ctx), uffd, dirty
	}
	script("4.2.1")
	want := func(label string, gotV Version, stream, uffd, dirty bool, v Version, runs int) {
		t.Helper()
		r := ran()
		if gotV != v || !stream || !uffd || dirty || len(r) != runs {
			t.Errorf("%s: version %v stream %v uffd %v dirty %v, criu ran %v; want %v true true false, %d runs", label, gotV, stream, uffd, dirty, r, v, runs)
		}
	}
	v, s, u, d := ask(FindOptions{Flag: path})
	want("first", v, s, u, d, Version{4, 2, 1}, 4)
	v, s, u, d = ask(FindOptions{Flag: path})
	want("second", v, s, u, d, Version{4, 2, 1}, 0)

	// A missing feature is asked again once its answer is old; the rest
	// stands.
	defer func(ttl time.Duration) { missingTTL = ttl }(missingTTL)
	missingTTL = 0
	v, s, u, d = ask(FindOptions{Flag: path})
	want("a missing feature, later", v, s, u, d, Version{4, 2, 1}, 1)
	missingTTL = time.Hour

	time.Sleep(10 * time.Millisecond) // a new mtime, whatever the clock's grain
	script("4.3.0")                   // upgraded in place
	v, s, u, d = ask(FindOptions{Flag: path})
	want("after an upgrade", v, s, u, d, Version{4, 3, 0}, 4)
	v, s, u, d = ask(FindOptions{Flag: path, Fresh: true})
	want("fresh", v, s, u, d, Version{4, 3, 0}, 4)

	entries, _ := filepath.Glob(filepath.Join(os.Getenv(FactsDirEnv), "*.json"))
	if len(entries) != 1 {
		t.Fatalf("cache entries: %v, want one", entries)
	}
	if err := os.Chmod(entries[0], 0o666); err != nil {
		t.Fatal(err)
	}
	v, s, u, d = ask(FindOptions{Flag: path})
	want("entry writable by others", v, s, u, d, Version{4, 3, 0}, 4)

	// Features asks what it does not know, in one go, and remembers it.
	t.Setenv(FactsDirEnv, filepath.Join(t.TempDir(), "facts2"))
	for i, runs := range []int{2, 0} {
		b, err := Find(ctx, FindOptions{Flag: path})
		if err != nil {
			t.Fatal(err)
		}
		ran()
		got := b.Features(ctx, "uffd", "mem_dirty_track")
		if r := ran(); !got["uffd"] || got["mem_dirty_track"] || len(r) != runs {
			t.Errorf("Features, time %d: %v, criu ran %v; want uffd alone, %d runs", i+1, got, r, runs)
		}
	}

	t.Setenv(FactsDirEnv, "off")
	ask(FindOptions{Flag: path})
	ask(FindOptions{Flag: path})
	if r := ran(); len(r) != 8 {
		t.Errorf("with the cache off CRIU ran %v, want every question asked each time", r)
	}
}
