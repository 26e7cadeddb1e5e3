package test

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// TestJSONShapes pins the names and JSON types of what scripts read:
// checkpoint --dry-run --json, checkpoint --json, and inspect --json of a
// directory and of a .ferry file. The expected shapes were taken from the
// ferry before the manifest became proto messages (FERRY_SHAPES=print
// prints them): every name there must still be there, with the same type
// (numbers stay numbers: protojson would write int64 as strings).
func TestJSONShapes(t *testing.T) {
	e := newEnv(t)
	requireCriu(t)
	w := buildWorkload(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
	ln.Close()
	e.must("run", "--name", "shape", "--", w, "tcp", port)
	e.waitLines("shape", "echo ", 3)

	dir := filepath.Join(t.TempDir(), "ck")
	file := filepath.Join(t.TempDir(), "ck.ferry")
	outs := map[string]string{
		"dry-run": e.must("checkpoint", "--dry-run", "--json", "shape"),
		"checkpoint": e.must("checkpoint", "--json", "--tcp-established", "--leave-running",
			"--format", "dir", "-o", dir, "shape"),
	}
	e.must("checkpoint", "--tcp-established", "--leave-running", "-o", file, "shape")
	outs["inspect-dir"] = e.must("inspect", "--json", dir)
	outs["inspect-file"] = e.must("inspect", "--json", file)

	names := slices.Sorted(func(yield func(string) bool) {
		for k := range outs {
			if !yield(k) {
				return
			}
		}
	})
	for _, name := range names {
		var v any
		if err := json.Unmarshal([]byte(outs[name]), &v); err != nil {
			t.Fatalf("%s: %v\n%s", name, err, outs[name])
		}
		got := map[string]string{}
		shape(v, "", got)
		if os.Getenv("FERRY_SHAPES") == "print" {
			fmt.Printf("\t%q: {\n", name)
			for _, p := range slices.Sorted(func(yield func(string) bool) {
				for k := range got {
					if !yield(k) {
						return
					}
				}
			}) {
				fmt.Printf("\t\t%q: %q,\n", p, got[p])
			}
			fmt.Printf("\t},\n")
			continue
		}
		for p, typ := range wantShapes[name] {
			g, ok := got[p]
			switch {
			case !ok:
				t.Errorf("%s: %s is gone (was %s)", name, p, typ)
			case g != typ && typ != "null" && g != "null":
				t.Errorf("%s: %s is %s, was %s", name, p, g, typ)
			}
		}
	}
}

// shape records the JSON type of every name in v by its path; arrays
// merge their elements under "[]", maps keyed by file name under "*".
func shape(v any, path string, out map[string]string) {
	switch x := v.(type) {
	case map[string]any:
		out[path] = "object"
		for k, c := range x {
			if strings.HasSuffix(path, "manifest.files") {
				k = "*"
			}
			shape(c, path+"."+k, out)
		}
	case []any:
		out[path] = "array"
		for _, c := range x {
			shape(c, path+"[]", out)
		}
	case string:
		out[path] = "string"
	case float64:
		out[path] = "number"
	case bool:
		out[path] = "bool"
	case nil:
		if _, ok := out[path]; !ok {
			out[path] = "null"
		}
	}
}

var wantShapes = map[string]map[string]string{
	"checkpoint": {
		"":                                    "object",
		".criuStats":                          "object",
		".criuStats.freezing_time":            "number",
		".criuStats.frozen_time":              "number",
		".criuStats.irmap_resolve":            "number",
		".criuStats.memdump_time":             "number",
		".criuStats.memwrite_time":            "number",
		".criuStats.page_pipe_bufs":           "number",
		".criuStats.page_pipes":               "number",
		".criuStats.pages_lazy":               "number",
		".criuStats.pages_scanned":            "number",
		".criuStats.pages_skipped_parent":     "number",
		".criuStats.pages_written":            "number",
		".criuStats.shpages_scanned":          "number",
		".criuStats.shpages_skipped_parent":   "number",
		".criuStats.shpages_written":          "number",
		".frozenAt":                           "string",
		".frozenNs":                           "number",
		".inventory":                          "object",
		".inventory.fileLocks":                "number",
		".inventory.ipc":                      "object",
		".inventory.ipc.msg":                  "number",
		".inventory.ipc.sem":                  "number",
		".inventory.ipc.shm":                  "number",
		".inventory.lacksCapSysResource":      "bool",
		".inventory.memory":                   "object",
		".inventory.memory.anonymous":         "number",
		".inventory.memory.fileRss":           "number",
		".inventory.memory.rss":               "number",
		".inventory.memory.shmemRss":          "number",
		".inventory.memory.size":              "number",
		".inventory.ownIpcNamespace":          "bool",
		".inventory.ownPidNamespace":          "bool",
		".inventory.root":                     "number",
		".inventory.sockets":                  "array",
		".inventory.sockets[]":                "object",
		".inventory.sockets[].family":         "string",
		".inventory.sockets[].fd":             "number",
		".inventory.sockets[].inode":          "number",
		".inventory.sockets[].local":          "string",
		".inventory.sockets[].peerInTree":     "bool",
		".inventory.sockets[].pid":            "number",
		".inventory.sockets[].remote":         "string",
		".inventory.sockets[].state":          "string",
		".inventory.tasks":                    "array",
		".inventory.tasks[]":                  "object",
		".inventory.tasks[].cmdline":          "array",
		".inventory.tasks[].cmdline[]":        "string",
		".inventory.tasks[].cwd":              "string",
		".inventory.tasks[].exe":              "string",
		".inventory.tasks[].fds":              "array",
		".inventory.tasks[].fds[]":            "object",
		".inventory.tasks[].fds[].fd":         "number",
		".inventory.tasks[].fds[].flags":      "string",
		".inventory.tasks[].fds[].inode":      "number",
		".inventory.tasks[].fds[].kind":       "string",
		".inventory.tasks[].fds[].target":     "string",
		".inventory.tasks[].gid":              "number",
		".inventory.tasks[].maps":             "array",
		".inventory.tasks[].maps[]":           "object",
		".inventory.tasks[].maps[].End":       "number",
		".inventory.tasks[].maps[].Start":     "number",
		".inventory.tasks[].maps[].kind":      "string",
		".inventory.tasks[].maps[].path":      "string",
		".inventory.tasks[].maps[].perms":     "string",
		".inventory.tasks[].maps[].rss":       "number",
		".inventory.tasks[].memory":           "object",
		".inventory.tasks[].memory.anonymous": "number",
		".inventory.tasks[].memory.fileRss":   "number",
		".inventory.tasks[].memory.rss":       "number",
		".inventory.tasks[].memory.shmemRss":  "number",
		".inventory.tasks[].memory.size":      "number",
		".inventory.tasks[].nspid":            "number",
		".inventory.tasks[].pgid":             "number",
		".inventory.tasks[].pid":              "number",
		".inventory.tasks[].ppid":             "number",
		".inventory.tasks[].sid":              "number",
		".inventory.tasks[].startTime":        "number",
		".inventory.tasks[].threads":          "number",
		".inventory.tasks[].uid":              "number",
		".job":                                "string",
		".jobEnded":                           "bool",
		".memoryBytes":                        "number",
		".output":                             "string",
		".plan":                               "object",
		".plan.extUnixSk":                     "bool",
		".plan.fileLocks":                     "bool",
		".plan.linkRemap":                     "bool",
		".plan.shellJob":                      "bool",
		".plan.tcpEstablished":                "bool",
		".processes":                          "number",
		".sizeBytes":                          "number",
		".stoppedBy":                          "string",
		".threads":                            "number",
		".totalNs":                            "number",
	},
	"dry-run": {
		"":                                    "object",
		".inventory":                          "object",
		".inventory.fileLocks":                "number",
		".inventory.ipc":                      "object",
		".inventory.ipc.msg":                  "number",
		".inventory.ipc.sem":                  "number",
		".inventory.ipc.shm":                  "number",
		".inventory.lacksCapSysResource":      "bool",
		".inventory.memory":                   "object",
		".inventory.memory.anonymous":         "number",
		".inventory.memory.fileRss":           "number",
		".inventory.memory.rss":               "number",
		".inventory.memory.shmemRss":          "number",
		".inventory.memory.size":              "number",
		".inventory.ownIpcNamespace":          "bool",
		".inventory.ownPidNamespace":          "bool",
		".inventory.root":                     "number",
		".inventory.sockets":                  "array",
		".inventory.sockets[]":                "object",
		".inventory.sockets[].family":         "string",
		".inventory.sockets[].fd":             "number",
		".inventory.sockets[].inode":          "number",
		".inventory.sockets[].local":          "string",
		".inventory.sockets[].peerInTree":     "bool",
		".inventory.sockets[].pid":            "number",
		".inventory.sockets[].remote":         "string",
		".inventory.sockets[].state":          "string",
		".inventory.tasks":                    "array",
		".inventory.tasks[]":                  "object",
		".inventory.tasks[].cmdline":          "array",
		".inventory.tasks[].cmdline[]":        "string",
		".inventory.tasks[].cwd":              "string",
		".inventory.tasks[].exe":              "string",
		".inventory.tasks[].fds":              "array",
		".inventory.tasks[].fds[]":            "object",
		".inventory.tasks[].fds[].fd":         "number",
		".inventory.tasks[].fds[].flags":      "string",
		".inventory.tasks[].fds[].inode":      "number",
		".inventory.tasks[].fds[].kind":       "string",
		".inventory.tasks[].fds[].target":     "string",
		".inventory.tasks[].gid":              "number",
		".inventory.tasks[].maps":             "array",
		".inventory.tasks[].maps[]":           "object",
		".inventory.tasks[].maps[].End":       "number",
		".inventory.tasks[].maps[].Start":     "number",
		".inventory.tasks[].maps[].kind":      "string",
		".inventory.tasks[].maps[].path":      "string",
		".inventory.tasks[].maps[].perms":     "string",
		".inventory.tasks[].maps[].rss":       "number",
		".inventory.tasks[].memory":           "object",
		".inventory.tasks[].memory.anonymous": "number",
		".inventory.tasks[].memory.fileRss":   "number",
		".inventory.tasks[].memory.rss":       "number",
		".inventory.tasks[].memory.shmemRss":  "number",
		".inventory.tasks[].memory.size":      "number",
		".inventory.tasks[].nspid":            "number",
		".inventory.tasks[].pgid":             "number",
		".inventory.tasks[].pid":              "number",
		".inventory.tasks[].ppid":             "number",
		".inventory.tasks[].sid":              "number",
		".inventory.tasks[].startTime":        "number",
		".inventory.tasks[].threads":          "number",
		".inventory.tasks[].uid":              "number",
		".plan":                               "object",
		".plan.extUnixSk":                     "bool",
		".plan.fileLocks":                     "bool",
		".plan.linkRemap":                     "bool",
		".plan.needs":                         "array",
		".plan.needs[]":                       "object",
		".plan.needs[].flag":                  "string",
		".plan.needs[].pid":                   "number",
		".plan.needs[].reason":                "string",
		".plan.needs[].what":                  "string",
		".plan.shellJob":                      "bool",
		".plan.tcpEstablished":                "bool",
	},
	"inspect-dir": {
		"":                                             "object",
		".checked":                                     "string",
		".files":                                       "array",
		".files[]":                                     "object",
		".files[].name":                                "string",
		".files[].size":                                "number",
		".files[].stored":                              "number",
		".manifest":                                    "object",
		".manifest.command":                            "array",
		".manifest.command[]":                          "string",
		".manifest.created":                            "string",
		".manifest.criuStats":                          "object",
		".manifest.criuStats.freezing_time":            "number",
		".manifest.criuStats.frozen_time":              "number",
		".manifest.criuStats.irmap_resolve":            "number",
		".manifest.criuStats.memdump_time":             "number",
		".manifest.criuStats.memwrite_time":            "number",
		".manifest.criuStats.page_pipe_bufs":           "number",
		".manifest.criuStats.page_pipes":               "number",
		".manifest.criuStats.pages_lazy":               "number",
		".manifest.criuStats.pages_scanned":            "number",
		".manifest.criuStats.pages_skipped_parent":     "number",
		".manifest.criuStats.pages_written":            "number",
		".manifest.criuStats.shpages_scanned":          "number",
		".manifest.criuStats.shpages_skipped_parent":   "number",
		".manifest.criuStats.shpages_written":          "number",
		".manifest.criuVersion":                        "string",
		".manifest.dir":                                "string",
		".manifest.errorPipe":                          "string",
		".manifest.ferryVersion":                       "string",
		".manifest.files":                              "object",
		".manifest.files.*":                            "number",
		".manifest.format":                             "number",
		".manifest.host":                               "string",
		".manifest.init":                               "object",
		".manifest.init.path":                          "string",
		".manifest.init.sha256":                        "string",
		".manifest.init.size":                          "number",
		".manifest.inventory":                          "object",
		".manifest.inventory.fileLocks":                "number",
		".manifest.inventory.ipc":                      "object",
		".manifest.inventory.ipc.msg":                  "number",
		".manifest.inventory.ipc.sem":                  "number",
		".manifest.inventory.ipc.shm":                  "number",
		".manifest.inventory.lacksCapSysResource":      "bool",
		".manifest.inventory.memory":                   "object",
		".manifest.inventory.memory.anonymous":         "number",
		".manifest.inventory.memory.fileRss":           "number",
		".manifest.inventory.memory.rss":               "number",
		".manifest.inventory.memory.shmemRss":          "number",
		".manifest.inventory.memory.size":              "number",
		".manifest.inventory.ownIpcNamespace":          "bool",
		".manifest.inventory.ownPidNamespace":          "bool",
		".manifest.inventory.root":                     "number",
		".manifest.inventory.sockets":                  "array",
		".manifest.inventory.sockets[]":                "object",
		".manifest.inventory.sockets[].family":         "string",
		".manifest.inventory.sockets[].fd":             "number",
		".manifest.inventory.sockets[].inode":          "number",
		".manifest.inventory.sockets[].local":          "string",
		".manifest.inventory.sockets[].peerInTree":     "bool",
		".manifest.inventory.sockets[].pid":            "number",
		".manifest.inventory.sockets[].remote":         "string",
		".manifest.inventory.sockets[].state":          "string",
		".manifest.inventory.tasks":                    "array",
		".manifest.inventory.tasks[]":                  "object",
		".manifest.inventory.tasks[].cmdline":          "array",
		".manifest.inventory.tasks[].cmdline[]":        "string",
		".manifest.inventory.tasks[].cwd":              "string",
		".manifest.inventory.tasks[].exe":              "string",
		".manifest.inventory.tasks[].fds":              "array",
		".manifest.inventory.tasks[].fds[]":            "object",
		".manifest.inventory.tasks[].fds[].fd":         "number",
		".manifest.inventory.tasks[].fds[].flags":      "string",
		".manifest.inventory.tasks[].fds[].inode":      "number",
		".manifest.inventory.tasks[].fds[].kind":       "string",
		".manifest.inventory.tasks[].fds[].target":     "string",
		".manifest.inventory.tasks[].gid":              "number",
		".manifest.inventory.tasks[].maps":             "array",
		".manifest.inventory.tasks[].maps[]":           "object",
		".manifest.inventory.tasks[].maps[].End":       "number",
		".manifest.inventory.tasks[].maps[].Start":     "number",
		".manifest.inventory.tasks[].maps[].kind":      "string",
		".manifest.inventory.tasks[].maps[].path":      "string",
		".manifest.inventory.tasks[].maps[].perms":     "string",
		".manifest.inventory.tasks[].maps[].rss":       "number",
		".manifest.inventory.tasks[].memory":           "object",
		".manifest.inventory.tasks[].memory.anonymous": "number",
		".manifest.inventory.tasks[].memory.fileRss":   "number",
		".manifest.inventory.tasks[].memory.rss":       "number",
		".manifest.inventory.tasks[].memory.shmemRss":  "number",
		".manifest.inventory.tasks[].memory.size":      "number",
		".manifest.inventory.tasks[].nspid":            "number",
		".manifest.inventory.tasks[].pgid":             "number",
		".manifest.inventory.tasks[].pid":              "number",
		".manifest.inventory.tasks[].ppid":             "number",
		".manifest.inventory.tasks[].sid":              "number",
		".manifest.inventory.tasks[].startTime":        "number",
		".manifest.inventory.tasks[].threads":          "number",
		".manifest.inventory.tasks[].uid":              "number",
		".manifest.job":                                "string",
		".manifest.kernel":                             "string",
		".manifest.memoryBytes":                        "number",
		".manifest.networkLock":                        "string",
		".manifest.outputPipe":                         "string",
		".manifest.plan":                               "object",
		".manifest.plan.extUnixSk":                     "bool",
		".manifest.plan.fileLocks":                     "bool",
		".manifest.plan.linkRemap":                     "bool",
		".manifest.plan.shellJob":                      "bool",
		".manifest.plan.tcpEstablished":                "bool",
		".manifest.processes":                          "number",
		".manifest.tcpEstablished":                     "bool",
		".manifest.threads":                            "number",
		".rawBytes":                                    "number",
		".storedBytes":                                 "number",
	},
	"inspect-file": {
		"":                                             "object",
		".checked":                                     "string",
		".files":                                       "array",
		".files[]":                                     "object",
		".files[].chunks":                              "number",
		".files[].file":                                "number",
		".files[].first_record":                        "number",
		".files[].name":                                "string",
		".files[].sha256":                              "string",
		".files[].size":                                "number",
		".files[].stored":                              "number",
		".manifest":                                    "object",
		".manifest.command":                            "array",
		".manifest.command[]":                          "string",
		".manifest.created":                            "string",
		".manifest.criuStats":                          "object",
		".manifest.criuStats.freezing_time":            "number",
		".manifest.criuStats.frozen_time":              "number",
		".manifest.criuStats.irmap_resolve":            "number",
		".manifest.criuStats.memdump_time":             "number",
		".manifest.criuStats.memwrite_time":            "number",
		".manifest.criuStats.page_pipe_bufs":           "number",
		".manifest.criuStats.page_pipes":               "number",
		".manifest.criuStats.pages_lazy":               "number",
		".manifest.criuStats.pages_scanned":            "number",
		".manifest.criuStats.pages_skipped_parent":     "number",
		".manifest.criuStats.pages_written":            "number",
		".manifest.criuStats.shpages_scanned":          "number",
		".manifest.criuStats.shpages_skipped_parent":   "number",
		".manifest.criuStats.shpages_written":          "number",
		".manifest.criuVersion":                        "string",
		".manifest.dir":                                "string",
		".manifest.errorPipe":                          "string",
		".manifest.ferryVersion":                       "string",
		".manifest.files":                              "null",
		".manifest.format":                             "number",
		".manifest.host":                               "string",
		".manifest.init":                               "object",
		".manifest.init.path":                          "string",
		".manifest.init.sha256":                        "string",
		".manifest.init.size":                          "number",
		".manifest.inventory":                          "object",
		".manifest.inventory.fileLocks":                "number",
		".manifest.inventory.ipc":                      "object",
		".manifest.inventory.ipc.msg":                  "number",
		".manifest.inventory.ipc.sem":                  "number",
		".manifest.inventory.ipc.shm":                  "number",
		".manifest.inventory.lacksCapSysResource":      "bool",
		".manifest.inventory.memory":                   "object",
		".manifest.inventory.memory.anonymous":         "number",
		".manifest.inventory.memory.fileRss":           "number",
		".manifest.inventory.memory.rss":               "number",
		".manifest.inventory.memory.shmemRss":          "number",
		".manifest.inventory.memory.size":              "number",
		".manifest.inventory.ownIpcNamespace":          "bool",
		".manifest.inventory.ownPidNamespace":          "bool",
		".manifest.inventory.root":                     "number",
		".manifest.inventory.sockets":                  "array",
		".manifest.inventory.sockets[]":                "object",
		".manifest.inventory.sockets[].family":         "string",
		".manifest.inventory.sockets[].fd":             "number",
		".manifest.inventory.sockets[].inode":          "number",
		".manifest.inventory.sockets[].local":          "string",
		".manifest.inventory.sockets[].peerInTree":     "bool",
		".manifest.inventory.sockets[].pid":            "number",
		".manifest.inventory.sockets[].remote":         "string",
		".manifest.inventory.sockets[].state":          "string",
		".manifest.inventory.tasks":                    "array",
		".manifest.inventory.tasks[]":                  "object",
		".manifest.inventory.tasks[].cmdline":          "array",
		".manifest.inventory.tasks[].cmdline[]":        "string",
		".manifest.inventory.tasks[].cwd":              "string",
		".manifest.inventory.tasks[].exe":              "string",
		".manifest.inventory.tasks[].fds":              "array",
		".manifest.inventory.tasks[].fds[]":            "object",
		".manifest.inventory.tasks[].fds[].fd":         "number",
		".manifest.inventory.tasks[].fds[].flags":      "string",
		".manifest.inventory.tasks[].fds[].inode":      "number",
		".manifest.inventory.tasks[].fds[].kind":       "string",
		".manifest.inventory.tasks[].fds[].target":     "string",
		".manifest.inventory.tasks[].gid":              "number",
		".manifest.inventory.tasks[].maps":             "array",
		".manifest.inventory.tasks[].maps[]":           "object",
		".manifest.inventory.tasks[].maps[].End":       "number",
		".manifest.inventory.tasks[].maps[].Start":     "number",
		".manifest.inventory.tasks[].maps[].kind":      "string",
		".manifest.inventory.tasks[].maps[].path":      "string",
		".manifest.inventory.tasks[].maps[].perms":     "string",
		".manifest.inventory.tasks[].maps[].rss":       "number",
		".manifest.inventory.tasks[].memory":           "object",
		".manifest.inventory.tasks[].memory.anonymous": "number",
		".manifest.inventory.tasks[].memory.fileRss":   "number",
		".manifest.inventory.tasks[].memory.rss":       "number",
		".manifest.inventory.tasks[].memory.shmemRss":  "number",
		".manifest.inventory.tasks[].memory.size":      "number",
		".manifest.inventory.tasks[].nspid":            "number",
		".manifest.inventory.tasks[].pgid":             "number",
		".manifest.inventory.tasks[].pid":              "number",
		".manifest.inventory.tasks[].ppid":             "number",
		".manifest.inventory.tasks[].sid":              "number",
		".manifest.inventory.tasks[].startTime":        "number",
		".manifest.inventory.tasks[].threads":          "number",
		".manifest.inventory.tasks[].uid":              "number",
		".manifest.job":                                "string",
		".manifest.kernel":                             "string",
		".manifest.memoryBytes":                        "number",
		".manifest.networkLock":                        "string",
		".manifest.outputPipe":                         "string",
		".manifest.plan":                               "object",
		".manifest.plan.extUnixSk":                     "bool",
		".manifest.plan.fileLocks":                     "bool",
		".manifest.plan.linkRemap":                     "bool",
		".manifest.plan.shellJob":                      "bool",
		".manifest.plan.tcpEstablished":                "bool",
		".manifest.processes":                          "number",
		".manifest.tcpEstablished":                     "bool",
		".manifest.threads":                            "number",
		".rawBytes":                                    "number",
		".storedBytes":                                 "number",
	},
}
