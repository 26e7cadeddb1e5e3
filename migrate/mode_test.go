package migrate

import (
	"errors"
	"strings"
	"testing"
	"time"
)

const (
	ms  = time.Millisecond
	MiB = int64(1) << 20
	GiB = int64(1) << 30
)

func TestParseMode(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Mode
	}{
		{"auto", ModeAuto},
		{"", ModeAuto},
		{"stop-copy", ModeStopCopy},
		{"post-copy", ModePostCopy},
		// Parsed so that Choose refuses it as not built (exit 23), rather
		// than as an unknown word (exit 2).
		{" Pre-Copy\n", ModePreCopy},
	} {
		got, err := ParseMode(tc.in)
		if err != nil || got != tc.want {
			t.Errorf("ParseMode(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
		}
	}
	for _, in := range []string{"fast", "postcopy", "stop copy"} {
		_, err := ParseMode(in)
		if err == nil {
			t.Fatalf("ParseMode(%q) succeeded", in)
		}
		for _, m := range []string{"auto, stop-copy or post-copy", in} {
			if !strings.Contains(err.Error(), m) {
				t.Errorf("ParseMode(%q) error %q does not mention %q", in, err, m)
			}
		}
		if strings.Contains(err.Error(), "pre-copy") {
			t.Errorf("ParseMode(%q) error %q offers pre-copy, which is not built", in, err)
		}
	}
}

func TestCapabilitiesFromFeatures(t *testing.T) {
	for _, tc := range []struct {
		f    map[string]bool
		want Capabilities
	}{
		{nil, Capabilities{}},
		{map[string]bool{"mem_dirty_track": true}, Capabilities{SoftDirty: true}},
		{map[string]bool{"uffd": true}, Capabilities{}},
		{map[string]bool{"uffd": true, "uffd-noncoop": true}, Capabilities{LazyPages: true}},
		{map[string]bool{"mem_dirty_track": true, "uffd": true, "uffd-noncoop": true}, Capabilities{true, true}},
	} {
		if got := CapabilitiesFromFeatures(tc.f); got != tc.want {
			t.Errorf("CapabilitiesFromFeatures(%v) = %+v, want %+v", tc.f, got, tc.want)
		}
	}
}

var (
	none  = Capabilities{}
	dirty = Capabilities{SoftDirty: true}
	lazy  = Capabilities{LazyPages: true}
	all   = Capabilities{SoftDirty: true, LazyPages: true}
)

// checkReason asserts that a Reason is one sentence naming the given figures.
func checkReason(t *testing.T, name, reason string, figures []string) {
	t.Helper()
	if !strings.HasSuffix(reason, ".") || strings.Contains(reason, ". ") {
		t.Errorf("%s: Reason is not one sentence: %q", name, reason)
	}
	for _, f := range figures {
		if !strings.Contains(reason, f) {
			t.Errorf("%s: Reason %q does not mention %q", name, reason, f)
		}
	}
}

// The tests below go through chooseFor, the chooser Migrate calls.

func TestChooseExplicit(t *testing.T) {
	for _, tc := range []struct {
		name     string
		want     Mode
		src, dst Capabilities
		limit    time.Duration
		tcp      bool
		ok       bool
		mention  []string // in Reason, or in the error when refused
		absent   []string // in the error when refused
	}{
		{"stop-copy needs nothing", ModeStopCopy, none, none, 0, false, true,
			[]string{"stop-copy requested", "4.0 GiB"}, nil},
		{"stop-copy with a limit says it may not fit", ModeStopCopy, none, none, 500 * ms, false, true,
			[]string{"4.0 GiB", "may or may not fit the 500ms downtime limit"}, nil},
		{"stop-copy with TCP connections", ModeStopCopy, all, all, 0, true, true, []string{"4.0 GiB"}, nil},
		{"post-copy on both", ModePostCopy, lazy, lazy, 0, false, true, []string{"post-copy requested", "4.0 GiB"}, nil},
		{"post-copy without source", ModePostCopy, none, lazy, 0, false, false,
			[]string{"uffd-noncoop", "the source lacks", "use --mode stop-copy"}, []string{"pre-copy"}},
		{"post-copy without destination, soft-dirty everywhere", ModePostCopy, all, dirty, 0, false, false,
			[]string{"the destination lacks", "use --mode stop-copy"}, []string{"pre-copy"}},
		{"post-copy without either", ModePostCopy, none, none, 0, false, false,
			[]string{"both the source and the destination lack"}, nil},
		{"post-copy with TCP connections", ModePostCopy, lazy, lazy, 0, true, false,
			[]string{"TCP", "use --mode stop-copy"}, nil},
		{"pre-copy with soft-dirty on both", ModePreCopy, dirty, dirty, 0, false, false,
			[]string{"pre-copy is not built", "use --mode stop-copy"}, []string{"post-copy"}},
		{"pre-copy with everything on both", ModePreCopy, all, all, 500 * ms, false, false,
			[]string{"pre-copy is not built", "use --mode post-copy or stop-copy"}, nil},
		{"pre-copy with nothing", ModePreCopy, none, none, 0, false, false,
			[]string{"pre-copy is not built", "use --mode stop-copy"}, []string{"post-copy"}},
		{"pre-copy with TCP connections offers only stop-copy", ModePreCopy, all, all, 0, true, false,
			[]string{"pre-copy is not built", "use --mode stop-copy"}, []string{"post-copy"}},
	} {
		d, err := chooseFor(tc.want, Situation{Source: tc.src, Dest: tc.dst, MemoryBytes: 4 * GiB, MaxDowntime: tc.limit, TCPEstablished: tc.tcp})
		if !tc.ok {
			if err == nil {
				t.Errorf("%s: chooseFor accepted %s: %+v", tc.name, tc.want, d)
				continue
			}
			if !errors.Is(err, ErrUnsupportedMode) {
				t.Errorf("%s: error %q is not ErrUnsupportedMode", tc.name, err)
			}
			for _, m := range tc.mention {
				if !strings.Contains(err.Error(), m) {
					t.Errorf("%s: error %q does not mention %q", tc.name, err, m)
				}
			}
			for _, m := range tc.absent {
				if strings.Contains(err.Error(), m) {
					t.Errorf("%s: error %q mentions %q", tc.name, err, m)
				}
			}
			continue
		}
		if err != nil || d.Mode != tc.want {
			t.Errorf("%s: chooseFor = %+v, %v; want mode %s", tc.name, d, err, tc.want)
			continue
		}
		checkReason(t, tc.name, d.Reason, tc.mention)
	}
	_, err := chooseFor("fast", Situation{})
	if err == nil || !strings.Contains(err.Error(), "auto, stop-copy or post-copy") {
		t.Errorf("chooseFor(fast) error = %v, want one listing the modes", err)
	}
}

func TestChooseAuto(t *testing.T) {
	for _, tc := range []struct {
		name    string
		s       Situation
		want    Mode
		mention []string
	}{
		{"small memory, no limit",
			Situation{Source: all, Dest: all, MemoryBytes: 100 * MiB},
			ModeStopCopy, []string{"auto chose stop-copy", "no downtime limit", "100.0 MiB", "256.0 MiB"}},
		{"256 MiB exactly, no limit",
			Situation{Source: all, Dest: all, MemoryBytes: 256 * MiB},
			ModeStopCopy, []string{"256.0 MiB", "small-job threshold"}},
		{"over 256 MiB, no limit, lazy pages on both",
			Situation{Source: lazy, Dest: lazy, MemoryBytes: 256*MiB + 1},
			ModePostCopy, []string{"auto chose post-copy", "no downtime limit", "exceeds the 256.0 MiB"}},
		{"large memory, no limit, lazy pages and soft-dirty on both",
			Situation{Source: all, Dest: all, MemoryBytes: 8 * GiB},
			ModePostCopy, []string{"8.0 GiB", "256.0 MiB"}},
		{"large memory, no limit, no lazy pages on the destination",
			Situation{Source: all, Dest: dirty, MemoryBytes: 8 * GiB},
			ModeStopCopy, []string{"auto fell back to stop-copy", "8.0 GiB", "the destination lacks lazy pages"}},
		{"large memory, no limit, nothing on either",
			Situation{MemoryBytes: 4 * GiB},
			ModeStopCopy, []string{"4.0 GiB", "both the source and the destination lack lazy pages"}},
		{"small memory with a limit, lazy pages on both",
			Situation{Source: lazy, Dest: lazy, MemoryBytes: 10 * MiB, MaxDowntime: 500 * ms},
			ModePostCopy, []string{"auto chose post-copy", "10.0 MiB", "cannot be shown to fit the 500ms downtime limit"}},
		{"a limit, no lazy pages on the source",
			Situation{Source: dirty, Dest: all, MemoryBytes: GiB, MaxDowntime: time.Second},
			ModeStopCopy, []string{"auto fell back to stop-copy", "1.0 GiB", "1s downtime limit", "the source lacks lazy pages"}},
		{"TCP connections outweigh lazy pages",
			Situation{Source: all, Dest: all, MemoryBytes: 8 * GiB, TCPEstablished: true},
			ModeStopCopy, []string{"auto chose stop-copy", "TCP"}},
		{"TCP connections with a limit",
			Situation{Source: lazy, Dest: lazy, MemoryBytes: 8 * GiB, MaxDowntime: 500 * ms, TCPEstablished: true},
			ModeStopCopy, []string{"TCP", "may or may not fit the 500ms downtime limit"}},
	} {
		for _, want := range []Mode{ModeAuto, ""} {
			d, err := chooseFor(want, tc.s)
			if err != nil {
				t.Fatalf("%s: chooseFor(%q): %v", tc.name, want, err)
			}
			if d.Mode != tc.want {
				t.Errorf("%s: chooseFor(%q) = %s (%q); want %s", tc.name, want, d.Mode, d.Reason, tc.want)
			}
			checkReason(t, tc.name, d.Reason, tc.mention)
		}
	}
	// The TCP rule is what decides: without it, the same job goes post-copy.
	s := Situation{Source: all, Dest: all, MemoryBytes: 8 * GiB}
	if d, _ := chooseFor(ModeAuto, s); d.Mode != ModePostCopy {
		t.Errorf("auto without TCP connections chose %s; want post-copy", d.Mode)
	}
}

// TestChooseNeverPreCopy: whatever the hosts can do, auto picks a mode this
// ferry runs, and pre-copy is refused as unavailable.
func TestChooseNeverPreCopy(t *testing.T) {
	caps := []Capabilities{none, dirty, lazy, all}
	for _, src := range caps {
		for _, dst := range caps {
			for _, mem := range []int64{0, 100 * MiB, 8 * GiB} {
				for _, limit := range []time.Duration{0, 300 * ms} {
					for _, tcp := range []bool{false, true} {
						s := Situation{Source: src, Dest: dst, MemoryBytes: mem, MaxDowntime: limit, TCPEstablished: tcp}
						d, err := chooseFor(ModeAuto, s)
						if err != nil || (d.Mode != ModeStopCopy && d.Mode != ModePostCopy) {
							t.Errorf("auto in %+v = %+v, %v", s, d, err)
						}
						if d.Mode == ModePostCopy && (tcp || !src.LazyPages || !dst.LazyPages) {
							t.Errorf("auto in %+v chose post-copy, which these hosts cannot run", s)
						}
						if _, err := chooseFor(ModePreCopy, s); !errors.Is(err, ErrUnsupportedMode) {
							t.Errorf("pre-copy in %+v: err %v, want ErrUnsupportedMode", s, err)
						}
					}
				}
			}
		}
	}
}

// TestChooseOddInputs: negative memory or limits count as none.
func TestChooseOddInputs(t *testing.T) {
	s := Situation{Source: lazy, Dest: lazy, MemoryBytes: -1, MaxDowntime: -4}
	d, err := chooseFor(ModeAuto, s)
	if err != nil || d.Mode != ModeStopCopy {
		t.Errorf("auto with negative memory and limit = %+v, %v; want stop-copy as for an empty job without a limit", d, err)
	}
	checkReason(t, "negative inputs", d.Reason, []string{"0 B", "no downtime limit"})
	d, err = chooseFor(ModeStopCopy, s)
	if err != nil || strings.Contains(d.Reason, "limit") {
		t.Errorf("stop-copy with a negative limit = %+v, %v; want no mention of a limit", d, err)
	}
}
