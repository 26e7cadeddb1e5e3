package checkpoint

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/ferry-cr/ferry/image"
	pb "github.com/ferry-cr/ferry/proto"
)

// v1Inventory, v1Plan and v1Stats are parts of a format 1 ferry.json as
// the ferry before the manifest was a message wrote it (cut down from a
// real one); v1Manifest is the whole.
const (
	v1Inventory = `{"root": 4242, "tasks": [{"pid": 4242, "nspid": 1, "ppid": 4240, "pgid": 1, "sid": 1, "threads": 1,
	  "cmdline": ["/srv/job", "-x"], "exe": "/srv/job", "cwd": "/srv", "uid": 0, "gid": 0, "startTime": 98765,
	  "tracer": 7, "memory": {"size": 8192, "rss": 4096, "anonymous": 4096, "fileRss": 0, "shmemRss": 0},
	  "maps": [{"Start": 18446744073699065856, "End": 18446744073699069952, "perms": "--xp", "path": "[vsyscall]", "kind": "vsyscall", "rss": 0}],
	  "fds": [{"fd": 3, "kind": "socket", "target": "socket:[555]", "flags": "02", "inode": 555, "locks": ["FLOCK ADVISORY WRITE 4242 00:2a:9 0 EOF"], "fanotifyFsMarks": 1}]}],
	  "sockets": [{"inode": 555, "pid": 4242, "fd": 3, "family": "tcp", "state": "established", "local": "127.0.0.1:1", "remote": "127.0.0.1:2", "peerInTree": false}],
	  "ipc": {"shm": 1, "sem": 0, "msg": 2}, "fileLocks": 1,
	  "memory": {"size": 8192, "rss": 4096, "anonymous": 4096, "fileRss": 0, "shmemRss": 0},
	  "ownIpcNamespace": true, "ownPidNamespace": true}`
	v1Plan = `{"tcpEstablished": true, "extUnixSk": false, "fileLocks": false, "shellJob": false, "linkRemap": false,
	  "ghostLimit": 3145728, "needs": [{"pid": 4242, "what": "1 file locks", "reason": "the tree holds file locks", "flag": "--file-locks"}],
	  "notes": ["a note"]}`
	v1Stats = `{"freezing_time": 100850, "frozen_time": 60580, "memdump_time": 6269, "memwrite_time": 322,
	  "pages_scanned": 126, "pages_skipped_parent": 0, "pages_written": 75, "irmap_resolve": 0, "pages_lazy": 0,
	  "page_pipes": 16, "page_pipe_bufs": 16, "shpages_scanned": 0, "shpages_skipped_parent": 0, "shpages_written": 0}`
	v1Manifest = `{
  "format": 1, "ferryVersion": "0.9 (abc)", "criuVersion": "4.2.1", "kernel": "6.18.44", "host": "vm",
  "created": "2026-12-06T06:24:36.8512561Z",
  "job": "j", "command": ["/srv/job", "-x"], "dir": "/srv",
  "externalPidNs": true, "shellJob": true, "outputPipe": "pipe:[49082]", "errorPipe": "pipe:[49083]",
  "tcpEstablished": true, "networkLock": "nftables",
  "periodic": {"everyNs": 3600000000000, "keep": 3},
  "init": {"path": "/usr/bin/ferry-init", "size": 772304, "sha256": "8218a1bd"},
  "processes": 1, "threads": 1, "memoryBytes": 1099511627776,
  "inventory": ` + v1Inventory + `,
  "plan": ` + v1Plan + `,
  "criuStats": ` + v1Stats + `,
  "files": {"core-1.img": 4, "pages-1.img": 8}
}`
)

// checkV1 checks that m holds what v1Manifest says.
func checkV1(t *testing.T, m *Manifest, withFiles bool) {
	t.Helper()
	if got, want := Created(m), time.Date(2026, 12, 6, 6, 24, 36, 851256100, time.UTC); !got.Equal(want) {
		t.Errorf("created %v, want %v", got, want)
	}
	if m.Job != "j" || len(m.Command) != 2 || m.Dir != "/srv" || !m.ExternalPidNs || !m.ShellJob || !m.TcpEstablished ||
		m.NetworkLock != "nftables" || m.MemoryBytes != 1<<40 || m.GetInit().GetSha256() != "8218a1bd" {
		t.Errorf("manifest read as %v", m)
	}
	if p := OutputPipes(m); len(p) != 2 || p[1] != "pipe:[49083]" {
		t.Errorf("output pipes %v", p)
	}
	if Every(m.GetPeriodic()) != time.Hour || m.GetPeriodic().GetKeep() != 3 {
		t.Errorf("periodic %v", m.GetPeriodic())
	}
	inv := m.GetInventory()
	if inv.GetRoot() != 4242 || len(inv.GetTasks()) != 1 || inv.GetIpc().GetMsg() != 2 || inv.GetFileLocks() != 1 || !inv.GetOwnPidNamespace() {
		t.Fatalf("inventory read as %v", inv)
	}
	task := inv.Tasks[0]
	if task.Tracer != 7 || task.StartTime != 98765 || task.GetMemory().GetRss() != 4096 ||
		task.Maps[0].Start != 18446744073699065856 || task.Fds[0].Num != 3 || task.Fds[0].FsMarks != 1 || len(task.Fds[0].Locks) != 1 {
		t.Errorf("task read as %v", task)
	}
	if s := inv.Sockets[0]; s.Fd != 3 || s.Remote != "127.0.0.1:2" || s.Inode != 555 {
		t.Errorf("socket read as %v", s)
	}
	if p := m.GetPlan(); !p.TcpEstablished || p.GhostLimit != 3<<20 || p.Needs[0].Flag != "--file-locks" || p.Notes[0] != "a note" {
		t.Errorf("plan read as %v", p)
	}
	if st := CriuStats(m); st.GetFrozenTime() != 60580 || st.GetPagesWritten() != 75 || st.GetPagePipes() != 16 {
		t.Errorf("CRIU's statistics read as %v", st)
	}
	if withFiles && (len(m.Files) != 2 || m.Files["pages-1.img"] != 8) {
		t.Errorf("files %v", m.Files)
	}
}

// subset reports where want (decoded JSON) is not found in got: every
// name with the same value and JSON type; got may have more names.
func subset(t *testing.T, path string, got, want any) {
	t.Helper()
	switch w := want.(type) {
	case map[string]any:
		g, ok := got.(map[string]any)
		if !ok {
			t.Errorf("%s: %T, want an object", path, got)
			return
		}
		for k, v := range w {
			if _, ok := g[k]; !ok {
				t.Errorf("%s.%s: missing", path, k)
				continue
			}
			subset(t, path+"."+k, g[k], v)
		}
	case []any:
		g, ok := got.([]any)
		if !ok || len(g) != len(w) {
			t.Errorf("%s: %v, want %v", path, got, want)
			return
		}
		for i := range w {
			subset(t, path+"[]", g[i], w[i])
		}
	default:
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%s: %v (%T), want %v (%T)", path, got, got, want, want)
		}
	}
}

// decodeNumbers decodes JSON keeping numbers exact (uint64 addresses).
func decodeNumbers(t *testing.T, data []byte) any {
	t.Helper()
	d := json.NewDecoder(bytes.NewReader(data))
	d.UseNumber()
	var v any
	if err := d.Decode(&v); err != nil {
		t.Fatalf("%v\n%s", err, data)
	}
	return v
}

// A checkpoint directory written before the manifest was a message
// (format 1) still loads, and inspect --json prints its manifest with the
// names, types and values it printed then.
func TestLoadFormat1(t *testing.T) {
	dir := t.TempDir()
	for name, data := range map[string]string{ManifestFile: v1Manifest, "core-1.img": "core", "pages-1.img": "pagesabc"} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	m, err := Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	checkV1(t, m, true)
	out, err := json.Marshal(JSON(m))
	if err != nil {
		t.Fatal(err)
	}
	subset(t, "manifest", decodeNumbers(t, out), decodeNumbers(t, []byte(v1Manifest)))
}

// What this ferry writes (format 2, protojson) it reads back whole.
func TestEncodeRoundTrip(t *testing.T) {
	m, err := DecodeManifest(bytes.NewReader([]byte(v1Manifest)), "v1")
	if err != nil {
		t.Fatal(err)
	}
	data, err := Encode(m)
	if err != nil {
		t.Fatal(err)
	}
	back, err := DecodeManifest(bytes.NewReader(data), "v2")
	if err != nil {
		t.Fatalf("%v\n%s", err, data)
	}
	if back.Format != FormatVersion || !proto.Equal(back, m) {
		t.Fatalf("through ferry.json:\n got %v\nwant %v", back, m)
	}
	checkV1(t, back, true)
}

// A .ferry stream written before the manifest was a message carries the
// walk, the plan and CRIU's statistics as JSON in its record: they are
// read into the message, for inspect and for a restore that starts from
// the first record.
func TestLegacyRecord(t *testing.T) {
	old := &pb.Manifest{Job: "j", Command: []string{"/srv/job", "-x"}, OutputPipe: "pipe:[1]",
		InventoryJson: []byte(v1Inventory), PlanJson: []byte(v1Plan), CriuStatsJson: []byte(v1Stats)}
	var buf bytes.Buffer
	w, err := image.NewWriter(&buf, old, image.WriterOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	rec, _, err := image.ReadIndex(bytes.NewReader(buf.Bytes()))
	if err != nil {
		t.Fatal(err)
	}
	m, err := FromRecord(rec)
	if err != nil {
		t.Fatal(err)
	}
	if m.GetInventory().GetTasks()[0].GetFds()[0].GetNum() != 3 || m.GetPlan().GetNeeds()[0].GetFlag() != "--file-locks" ||
		CriuStats(m).GetFrozenTime() != 60580 || len(m.InventoryJson) != 0 {
		t.Fatalf("legacy record read as %v", m)
	}
	out, err := json.Marshal(JSON(m))
	if err != nil {
		t.Fatal(err)
	}
	got := decodeNumbers(t, out).(map[string]any)
	subset(t, "manifest.inventory", got["inventory"], decodeNumbers(t, []byte(v1Inventory)))
	subset(t, "manifest.plan", got["plan"], decodeNumbers(t, []byte(v1Plan)))
	subset(t, "manifest.criuStats", got["criuStats"], decodeNumbers(t, []byte(v1Stats)))
	if _, ok := got["inventoryJson"]; ok {
		t.Error("the deprecated blob is printed")
	}
	if _, err := FromRecord(&pb.Manifest{InventoryJson: []byte("{not json")}); err == nil {
		t.Error("a record with a broken inventory is read")
	}
}
