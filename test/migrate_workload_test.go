package test

import (
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TestMigrateWorkloads moves the checkpoint/restore workloads between the
// two test hosts and checks, on the destination, that the state each one
// keeps went on from where it was on the source. Modes alternate where
// this host has lazy pages, so trees of several processes, threads,
// timers and SysV IPC go through post-copy as well as stop-copy.
func TestMigrateWorkloads(t *testing.T) {
	requireCriu(t)
	w := buildWorkload(t)
	h := newHosts(t)
	src, dst := newEnv(t), newEnv(t)
	token := writeToken(t, "correct horse battery staple 42")
	listen := net.JoinHostPort(h.addrB, "7120")
	dst.serve(h.b, listen, token)
	lazy := src.lazyPages()
	data := make([]byte, 4096)
	for i := range data {
		data[i] = byte(i % 251)
	}
	path := filepath.Join(t.TempDir(), "data")
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}

	ints := func(t *testing.T, line string) []int {
		var out []int
		for _, f := range strings.Fields(line) {
			n, err := strconv.Atoi(f)
			if err != nil {
				t.Fatalf("line %q: %v", line, err)
			}
			out = append(out, n)
		}
		return out
	}
	for _, tc := range []struct {
		name, prefix string
		args         []string
		postCopy     bool
		// check compares the source's last line with the destination's
		// first.
		check func(t *testing.T, last, first string)
	}{
		{"ring", "seq ", []string{"pipes"}, true, func(t *testing.T, last, first string) {
			// Four processes pass the number round pipes and a socketpair.
			if l, f := ints(t, last)[0], ints(t, first)[0]; f != l+4 {
				t.Fatalf("sequence %d on the source, %d next on the destination; want %d", l, f, l+4)
			}
		}},
		{"thr", "threads ", []string{"threads", "4"}, false, func(t *testing.T, last, first string) {
			l, f := ints(t, last), ints(t, first)
			for i := range l {
				if f[i] <= l[i] {
					t.Fatalf("thread %d counted %d on the source, %d on the destination: reset or stuck", i, l[i], f[i])
				}
			}
		}},
		{"tmr", "ticks ", []string{"timer"}, true, func(t *testing.T, last, first string) {
			if l, f := ints(t, last)[0], ints(t, first)[0]; f != l+10 {
				t.Fatalf("timer ticks %d on the source, %d next on the destination; want %d", l, f, l+10)
			}
		}},
		{"ipc", "sysv ok ", []string{"sysv"}, false, func(t *testing.T, last, first string) {
			if l, f := ints(t, last)[0], ints(t, first)[0]; f != l+1 {
				t.Fatalf("SysV check %d on the source, %d next on the destination", l, f)
			}
		}},
		{"fmap", "file ", []string{"file", path}, false, func(t *testing.T, last, first string) {
			if l, f := ints(t, last)[1], ints(t, first)[1]; f != l+1 {
				t.Fatalf("file offset %d on the source, %d next on the destination", l, f)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mode := "stop-copy"
			if tc.postCopy && lazy {
				mode = "post-copy"
			}
			if r := src.ferryIn(h.a, append([]string{"run", "--name", tc.name, "--", w}, tc.args...)...); r.code != 0 {
				t.Fatalf("run: %s", r)
			}
			src.waitLines(tc.name, tc.prefix, 5)
			if r := src.ferryIn(h.a, "migrate", tc.name, "--to", listen, "--token-file", token, "--mode", mode); r.code != 0 {
				t.Fatalf("migrate (%s): %s", mode, r)
			}
			before := src.lines(tc.name, tc.prefix)
			dst.waitLines(tc.name, tc.prefix, 3)
			after := dst.lines(tc.name, tc.prefix)
			tc.check(t, before[len(before)-1], after[0])
			dst.noErrors(tc.name)
			if v := src.job(tc.name); v.State != "exited" {
				t.Errorf("source job after migration: %s", v.State)
			}
			dst.must("kill", tc.name)
		})
	}
}
