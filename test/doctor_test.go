package test

import (
	"encoding/json"
	"strings"
	"testing"
)

func TestDoctor(t *testing.T) {
	e := newEnv(t)
	var r struct {
		Ready bool `json:"ready"`
		Criu  struct {
			Path    string `json:"path"`
			Version string `json:"version"`
			CheckOK bool   `json:"checkOk"`
		} `json:"criu"`
		Features map[string]bool `json:"features"`
		Cgroup   struct {
			Mode string `json:"mode"`
		} `json:"cgroup"`
		Root bool `json:"root"`
	}
	out := e.must("doctor", "--json")
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("doctor --json: %v\n%s", err, out)
	}
	if !r.Ready || !r.Root || !r.Criu.CheckOK || r.Criu.Version == "" || r.Cgroup.Mode == "" {
		t.Fatalf("doctor on this host: %+v", r)
	}
	for _, f := range []string{"mem_dirty_track", "uffd", "uffd-noncoop", "pidfd_store", "network_lock_nftables", "stream"} {
		if _, ok := r.Features[f]; !ok {
			t.Errorf("doctor does not report feature %s", f)
		}
	}
	if table := e.must("doctor"); !strings.Contains(table, "ready:") || !strings.Contains(table, "criu check") {
		t.Errorf("doctor table:\n%s", table)
	}
	// Without a usable CRIU the host is not ready: exit 9 and the reason.
	res := e.ferry("--criu", "/no/such/criu", "doctor")
	if res.code != 9 || !strings.Contains(res.stderr, "make deps") {
		t.Errorf("doctor with a missing CRIU: %s", res)
	}
	res = e.ferry("--criu", fakeCriuOld(t), "doctor")
	if res.code != 9 || !strings.Contains(res.stderr, "too old") {
		t.Errorf("doctor with CRIU 4.1: %s", res)
	}
}
