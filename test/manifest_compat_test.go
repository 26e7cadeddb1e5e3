package test

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ferry-cr/ferry/image"
	"github.com/ferry-cr/ferry/internal/checkpoint"
	pb "github.com/ferry-cr/ferry/proto"
)

// Parts of a manifest as the ferry before the manifest was a proto
// message wrote it: ferry.json format 1, and the JSON blobs of a .ferry
// stream's manifest record.
const (
	oldInventory = `{"root": 1, "tasks": [{"pid": 1, "nspid": 1, "ppid": 0, "pgid": 1, "sid": 1, "threads": 1,
  "cmdline": ["sh", "-c", "count"], "exe": "/usr/bin/sh", "cwd": "/", "uid": 0, "gid": 0, "startTime": 1,
  "memory": {"size": 8192, "rss": 4096, "anonymous": 4096, "fileRss": 0, "shmemRss": 0},
  "maps": [{"Start": 4096, "End": 8192, "perms": "rw-p", "kind": "anon", "rss": 4096}],
  "fds": [{"fd": 1, "kind": "pipe", "target": "pipe:[1]", "inode": 1}]}],
  "sockets": null, "ipc": {"shm": 0, "sem": 0, "msg": 0}, "fileLocks": 0,
  "memory": {"size": 8192, "rss": 4096, "anonymous": 4096, "fileRss": 0, "shmemRss": 0},
  "ownIpcNamespace": true, "ownPidNamespace": true}`
	oldPlan  = `{"tcpEstablished": false, "extUnixSk": false, "fileLocks": false, "shellJob": false, "linkRemap": false, "notes": ["old"]}`
	oldStats = `{"freezing_time": 1000, "frozen_time": 2000, "memdump_time": 300, "memwrite_time": 400, "pages_scanned": 3, "pages_written": 2}`
)

// writeOldManifest replaces the ferry.json of the checkpoint directory dir
// (written by this ferry) with a format 1 one saying the same, and
// returns the manifest it replaced.
func writeOldManifest(t *testing.T, dir string) *checkpoint.Manifest {
	t.Helper()
	m, err := checkpoint.Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	js := func(v any) string {
		b, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	old := fmt.Sprintf(`{
  "format": 1, "ferryVersion": "old", "criuVersion": %s, "kernel": %s, "host": "h",
  "created": "2026-01-02T03:04:05.5Z", "job": %s, "command": %s, "dir": %s,
  "outputPipe": %s, "errorPipe": %s,
  "init": {"path": %s, "size": %d, "sha256": %s},
  "processes": %d, "threads": %d, "memoryBytes": %d,
  "inventory": %s, "plan": %s, "criuStats": %s,
  "files": %s
}
`, js(m.CriuVersion), js(m.Kernel), js(m.Job), js(m.Command), js(m.Dir), js(m.OutputPipe), js(m.ErrorPipe),
		js(m.Init.Path), m.Init.Size, js(m.Init.Sha256), m.Processes, m.Threads, m.MemoryBytes,
		oldInventory, oldPlan, oldStats, js(m.Files))
	if err := os.WriteFile(filepath.Join(dir, checkpoint.ManifestFile), []byte(old), 0o600); err != nil {
		t.Fatal(err)
	}
	return m
}

// packOld writes the checkpoint directory dir (with a format 1 manifest)
// as the old ferry packed it: a stream whose manifest record carries the
// walk, the plan and CRIU's statistics as JSON, ferry.json first.
func packOld(t *testing.T, dir, out string, m *checkpoint.Manifest) {
	t.Helper()
	f, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rec := &pb.Manifest{FerryVersion: "old", CriuVersion: m.CriuVersion, Kernel: m.Kernel, Host: "h",
		CreatedUnixNano: time.Date(2026, 1, 2, 3, 4, 5, 5e8, time.UTC).UnixNano(), Job: m.Job, Command: m.Command,
		Dir: m.Dir, OutputPipe: m.OutputPipe, ErrorPipe: m.ErrorPipe, Init: m.Init,
		Processes: m.Processes, Threads: m.Threads, MemoryBytes: m.MemoryBytes,
		InventoryJson: []byte(oldInventory), PlanJson: []byte(oldPlan), CriuStatsJson: []byte(oldStats)}
	w, err := image.NewWriter(f, rec, image.WriterOptions{})
	if err != nil {
		t.Fatal(err)
	}
	names := slices.Sorted(func(yield func(string) bool) {
		for n := range m.Files {
			if !yield(n) {
				return
			}
		}
	})
	for _, name := range append([]string{checkpoint.ManifestFile}, names...) {
		src, err := os.Open(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		fw, err := w.Create(name)
		if err == nil {
			_, err = io.Copy(fw, src)
		}
		if err == nil {
			err = fw.Close()
		}
		src.Close()
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
}

// checkOldInspect checks what inspect says of a checkpoint written by the
// old ferry: the old manifest's values, with their JSON types.
func checkOldInspect(t *testing.T, e *env, path string, format float64) {
	t.Helper()
	var info struct {
		Manifest map[string]any `json:"manifest"`
	}
	out := e.must("inspect", "--json", path)
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("inspect --json %s: %v\n%s", path, err, out)
	}
	m := info.Manifest
	inv, _ := m["inventory"].(map[string]any)
	tasks, _ := inv["tasks"].([]any)
	stats, _ := m["criuStats"].(map[string]any)
	plan, _ := m["plan"].(map[string]any)
	if m["format"] != format || m["created"] != "2026-01-02T03:04:05.5Z" || m["job"] != "old" || len(tasks) != 1 ||
		stats["frozen_time"] != 2000.0 || plan["notes"] == nil {
		t.Errorf("inspect --json %s:\n%s", path, out)
	}
	if text := e.must("inspect", path); !strings.Contains(text, "CRIU: frozen 2ms") || !strings.Contains(text, "sh -c count") {
		t.Errorf("inspect %s:\n%s", path, text)
	}
}

// TestOldManifests: a checkpoint directory with a format 1 ferry.json and
// a .ferry file whose manifest record carries JSON blobs, as the ferry
// before the manifest was one proto message wrote them, still inspect
// (with the old values and types) and restore (the count goes on).
func TestOldManifests(t *testing.T) {
	e := newEnv(t)
	requireCriu(t)
	e.must("run", "--name", "old", "--", "sh", "-c", counter)
	eventually(t, 10*time.Second, "count to reach 20", func() bool { return e.logLines("old") >= 20 })

	dir := filepath.Join(t.TempDir(), "old.ckpt")
	e.must("checkpoint", "--format", "dir", "-o", dir, "old")
	writeOldManifest(t, dir)
	checkOldInspect(t, e, dir, 1)
	atCheckpoint := e.logLines("old")
	e.must("restore", dir)
	eventually(t, 10*time.Second, "count to continue from the old directory", func() bool { return e.logLines("old") >= atCheckpoint+20 })
	assertConsecutive(t, numbers(t, e.must("logs", "old")))

	dir2 := filepath.Join(t.TempDir(), "old2.ckpt")
	e.must("checkpoint", "--format", "dir", "-o", dir2, "old")
	m := writeOldManifest(t, dir2)
	file := filepath.Join(t.TempDir(), "old.ferry")
	packOld(t, dir2, file, m)
	os.RemoveAll(dir2)
	e.must("verify", file)
	checkOldInspect(t, e, file, 1)
	atCheckpoint = e.logLines("old")
	e.must("restore", file)
	eventually(t, 10*time.Second, "count to continue from the old .ferry", func() bool { return e.logLines("old") >= atCheckpoint+20 })
	assertConsecutive(t, numbers(t, e.must("logs", "old")))
}
