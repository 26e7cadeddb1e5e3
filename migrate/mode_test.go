package migrate

import (
	"math"
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
		for _, m := range []string{"auto", "stop-copy", "post-copy", "pre-copy", in} {
			if !strings.Contains(err.Error(), m) {
				t.Errorf("ParseMode(%q) error %q does not mention %q", in, err, m)
			}
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

func TestChooseExplicit(t *testing.T) {
	base := Situation{MemoryBytes: 4 * GiB, Bandwidth: 1e9, MaxDowntime: 500 * ms}
	for _, tc := range []struct {
		name     string
		want     Mode
		src, dst Capabilities
		ok       bool
		mention  []string // in Reason, or in the error when refused
	}{
		{"stop-copy needs nothing", ModeStopCopy, none, none, true,
			[]string{"4.0 GiB", "2.0 GiB compressed", "953.7 MiB/s", "2.45s", "over the 500ms budget"}},
		{"post-copy on both", ModePostCopy, lazy, lazy, true, []string{"300ms", "4.0 GiB"}},
		{"post-copy without source", ModePostCopy, none, lazy, false,
			[]string{"uffd-noncoop", "the source lacks", "use --mode stop-copy"}},
		{"post-copy without destination", ModePostCopy, all, dirty, false,
			[]string{"the destination lacks", "use --mode pre-copy or stop-copy"}},
		{"post-copy without either", ModePostCopy, none, none, false,
			[]string{"both the source and the destination lack"}},
		{"pre-copy with soft-dirty source", ModePreCopy, dirty, none, true, []string{"4.0 GiB", "500ms"}},
		{"pre-copy without soft-dirty", ModePreCopy, none, all, false,
			[]string{"soft-dirty", "source", "use --mode stop-copy"}},
		{"pre-copy refused, post-copy offered", ModePreCopy, lazy, lazy, false,
			[]string{"use --mode post-copy or stop-copy"}},
	} {
		s := base
		s.Source, s.Dest = tc.src, tc.dst
		d, err := Choose(tc.want, s)
		if !tc.ok {
			if err == nil {
				t.Errorf("%s: Choose accepted %s: %+v", tc.name, tc.want, d)
				continue
			}
			for _, m := range tc.mention {
				if !strings.Contains(err.Error(), m) {
					t.Errorf("%s: error %q does not mention %q", tc.name, err, m)
				}
			}
			continue
		}
		if err != nil || d.Mode != tc.want {
			t.Errorf("%s: Choose = %+v, %v; want mode %s", tc.name, d, err, tc.want)
			continue
		}
		checkReason(t, tc.name, d.Reason, tc.mention)
	}
	if _, err := Choose("fast", base); err == nil || !strings.Contains(err.Error(), "pre-copy") {
		t.Errorf("Choose(fast) error = %v, want one listing the modes", err)
	}
}

func TestChooseExplicitEstimates(t *testing.T) {
	s := Situation{Source: all, Dest: all, MemoryBytes: GiB, CompressRatio: 1, Bandwidth: float64(GiB), FixedCost: 100 * ms}
	for _, tc := range []struct {
		mode Mode
		want time.Duration
	}{
		{ModeStopCopy, 1100 * ms}, // 1 GiB raw over 1 GiB/s + 100ms
		{ModePostCopy, 100 * ms},  // the fixed cost only
		{ModePreCopy, 300 * ms},   // the default budget it aims for
	} {
		d, err := Choose(tc.mode, s)
		if err != nil || d.EstimatedDowntime != tc.want {
			t.Errorf("Choose(%s) = %+v, %v; want estimate %v", tc.mode, d, err, tc.want)
		}
	}
	// Unknown ratio and fixed cost take the defaults: 0.5 and 300ms.
	s.CompressRatio, s.FixedCost = 0, 0
	if d, _ := Choose(ModeStopCopy, s); d.EstimatedDowntime != 800*ms {
		t.Errorf("stop-copy with defaults: estimate %v, want 800ms", d.EstimatedDowntime)
	}
	// Unknown bandwidth: no estimate, and the Reason says why.
	s.Bandwidth = 0
	s.MaxDowntime = time.Second
	d, _ := Choose(ModeStopCopy, s)
	if d.EstimatedDowntime != 0 {
		t.Errorf("stop-copy, unknown bandwidth: estimate %v, want 0", d.EstimatedDowntime)
	}
	checkReason(t, "stop-copy, unknown bandwidth", d.Reason, []string{"unknown", "1.0 GiB", "1s budget"})
}

func TestChooseAuto(t *testing.T) {
	for _, tc := range []struct {
		name    string
		s       Situation
		want    Mode
		est     time.Duration
		mention []string
	}{
		{"small memory, no limit",
			Situation{MemoryBytes: 100 * MiB, Bandwidth: 1e9},
			ModeStopCopy, 352428800, // 50 MiB compressed over 1 GB/s + 300ms
			[]string{"100.0 MiB", "256.0 MiB", "352.4ms"}},
		{"small memory, no limit, unknown bandwidth",
			Situation{Source: all, Dest: all, MemoryBytes: 256 * MiB},
			ModeStopCopy, 0,
			[]string{"256.0 MiB", "unknown"}},
		{"large memory fits the budget on a fast link",
			Situation{Source: all, Dest: all, MemoryBytes: 2 * GiB, Bandwidth: 10e9, MaxDowntime: 500 * ms},
			ModeStopCopy, 407374182,
			[]string{"2.0 GiB", "1.0 GiB compressed", "9.3 GiB/s", "407.4ms", "500ms budget"}},
		{"large memory, lazy pages on both",
			Situation{Source: lazy, Dest: lazy, MemoryBytes: 8 * GiB, Bandwidth: 1.25e9, MaxDowntime: 500 * ms},
			ModePostCopy, 300 * ms,
			[]string{"8.0 GiB", "4.0 GiB compressed", "1.2 GiB/s", "3.74s", "500ms budget", "300ms"}},
		{"large memory, lazy pages preferred to pre-copy",
			Situation{Source: all, Dest: all, MemoryBytes: 8 * GiB, Bandwidth: 1.25e9, MaxDowntime: 500 * ms},
			ModePostCopy, 300 * ms,
			[]string{"8.0 GiB", "3.74s"}},
		{"large memory, no lazy pages on the destination",
			Situation{Source: all, Dest: dirty, MemoryBytes: 8 * GiB, Bandwidth: 1.25e9, MaxDowntime: 500 * ms},
			ModePreCopy, 500 * ms,
			[]string{"8.0 GiB", "3.74s", "500ms budget", "the destination lacks lazy pages"}},
		{"large memory, nothing better available",
			Situation{Source: lazy, Dest: none, MemoryBytes: 8 * GiB, Bandwidth: 1.25e9, MaxDowntime: 500 * ms},
			ModeStopCopy, 3735973836,
			[]string{"exceeds the budget", "8.0 GiB", "3.74s", "500ms", "the destination lacks lazy pages", "soft-dirty"}},
		{"unknown bandwidth with a budget",
			Situation{Source: all, Dest: all, MemoryBytes: 100 * MiB, MaxDowntime: 500 * ms},
			ModePostCopy, 300 * ms,
			[]string{"bandwidth is unknown", "100.0 MiB", "500ms budget"}},
		{"unknown bandwidth, no lazy pages",
			Situation{Source: dirty, Dest: none, MemoryBytes: 4 * GiB, MaxDowntime: time.Second},
			ModePreCopy, time.Second,
			[]string{"bandwidth is unknown", "4.0 GiB", "1s budget", "both the source and the destination lack"}},
		{"no limit, large memory",
			Situation{Source: lazy, Dest: lazy, MemoryBytes: 4 * GiB, Bandwidth: 1e9},
			ModePostCopy, 300 * ms,
			[]string{"no downtime limit", "4.0 GiB", "256.0 MiB", "2.45s"}},
		{"no limit, large memory, unknown bandwidth, no capabilities",
			Situation{MemoryBytes: 4 * GiB},
			ModeStopCopy, 0,
			[]string{"no downtime limit", "4.0 GiB", "unknown", "soft-dirty"}},
		{"budget below the fixed cost still prefers post-copy",
			Situation{Source: all, Dest: all, MemoryBytes: GiB, Bandwidth: 1e9, MaxDowntime: 100 * ms},
			ModePostCopy, 300 * ms,
			[]string{"836.9ms", "100ms budget"}},
	} {
		for _, want := range []Mode{ModeAuto, ""} {
			d, err := Choose(want, tc.s)
			if err != nil {
				t.Fatalf("%s: Choose(%q): %v", tc.name, want, err)
			}
			if d.Mode != tc.want || d.EstimatedDowntime != tc.est {
				t.Errorf("%s: Choose(%q) = %s, %v (%q); want %s, %v",
					tc.name, want, d.Mode, d.EstimatedDowntime, d.Reason, tc.want, tc.est)
			}
			checkReason(t, tc.name, d.Reason, tc.mention)
		}
	}
}

// TestChooseOddInputs feeds nonsense and extremes: nothing may panic, and no
// estimate may be negative.
func TestChooseOddInputs(t *testing.T) {
	for _, s := range []Situation{
		{},
		{MemoryBytes: -1, CompressRatio: -2, Bandwidth: -3, MaxDowntime: -4, FixedCost: -5},
		{MemoryBytes: GiB, CompressRatio: math.NaN(), Bandwidth: math.NaN()},
		{MemoryBytes: GiB, CompressRatio: math.Inf(1), Bandwidth: math.Inf(1), MaxDowntime: time.Second},
		{MemoryBytes: math.MaxInt64, CompressRatio: 1e300, Bandwidth: 1e-300, MaxDowntime: time.Second},
		{Source: all, Dest: all, MemoryBytes: math.MaxInt64, Bandwidth: 1},
	} {
		for _, m := range modes {
			d, err := Choose(m, s)
			if err != nil {
				continue
			}
			if d.EstimatedDowntime < 0 || d.Reason == "" {
				t.Errorf("Choose(%s, %+v) = %+v", m, s, d)
			}
		}
	}
	// Infinite bandwidth is as good as unknown, not as good as free.
	d, _ := Choose(ModeStopCopy, Situation{MemoryBytes: GiB, Bandwidth: math.Inf(1)})
	if d.EstimatedDowntime != 0 || !strings.Contains(d.Reason, "unknown") {
		t.Errorf("infinite bandwidth: %+v", d)
	}
	// A huge job over a trickle saturates instead of wrapping around.
	d, _ = Choose(ModeStopCopy, Situation{MemoryBytes: math.MaxInt64, Bandwidth: 1})
	if d.EstimatedDowntime != math.MaxInt64 {
		t.Errorf("saturated estimate = %v", d.EstimatedDowntime)
	}
}

// Recorded pre-copy statistics. The link carries about 1 GB/s unless said
// otherwise; each Round's DirtiedBytes is the next round's SentBytes.
var (
	// A 1 GiB job dirtying ~50 MB/s: the dirty set shrinks twentyfold per
	// round.
	converging = []Round{
		{SentBytes: GiB, Duration: 1093 * ms, DirtiedBytes: 54_650_000},
		{SentBytes: 54_650_000, Duration: 57 * ms, DirtiedBytes: 2_850_000},
		{SentBytes: 2_850_000, Duration: 3100 * time.Microsecond, DirtiedBytes: 155_000},
	}
	// A 1 GiB job dirtying 1.2 GB/s, faster than the link.
	outrunning = []Round{
		{SentBytes: GiB, Duration: 1100 * ms, DirtiedBytes: 1_320_000_000},
	}
	// A 1 GiB job dirtying ~0.93 of the bandwidth: not faster, still hopeless.
	nearLink = []Round{
		{SentBytes: GiB, Duration: 1100 * ms, DirtiedBytes: 998_500_000},
	}
	// A job with a ~60 MB hot working set it rewrites constantly, and a
	// fixed per-round overhead of ~200ms: the dirty set stops shrinking.
	plateau = []Round{
		{SentBytes: GiB, Duration: 1300 * ms, DirtiedBytes: 80_000_000},
		{SentBytes: 80_000_000, Duration: 290 * ms, DirtiedBytes: 62_000_000},
		{SentBytes: 62_000_000, Duration: 270 * ms, DirtiedBytes: 60_000_000},
	}
	// A 1 GiB job dirtying 70 MB/s over a 100 MB/s link: converges, slowly.
	slow = []Round{
		{SentBytes: GiB, Duration: 10740 * ms, DirtiedBytes: 751_800_000},
		{SentBytes: 751_800_000, Duration: 7520 * ms, DirtiedBytes: 526_400_000},
		{SentBytes: 526_400_000, Duration: 5260 * ms, DirtiedBytes: 368_200_000},
		{SentBytes: 368_200_000, Duration: 3680 * ms, DirtiedBytes: 257_600_000},
	}
)

func TestPreCopyNext(t *testing.T) {
	C, S, G := Continue, StopAndCopy, GiveUp
	for _, tc := range []struct {
		name    string
		p       PreCopyPolicy
		rounds  []Round
		want    []Verdict // after each round
		mention []string  // in the last reason
	}{
		{"converges in 2 rounds", PreCopyPolicy{MaxDowntime: 350 * ms}, converging[:2],
			[]Verdict{C, S}, []string{"round 2", "2.7 MiB", "925.6 MiB/s", "302.9ms", "350ms budget"}},
		{"converges in 3 rounds", PreCopyPolicy{MaxDowntime: 302 * ms}, converging,
			[]Verdict{C, C, S}, []string{"round 3", "151.4 KiB", "914.4 MiB/s", "300.2ms", "302ms budget"}},
		{"converges in 1 round with a low fixed cost", PreCopyPolicy{MaxDowntime: 300 * ms, FixedCost: 200 * ms}, converging[:1],
			[]Verdict{S}, []string{"52.1 MiB", "255.6ms"}},
		{"dirties faster than the link", PreCopyPolicy{MaxDowntime: 500 * ms}, outrunning,
			[]Verdict{G}, []string{"1.1 GiB/s", "123%", "930.9 MiB/s", "1.65s", "500ms budget"}},
		{"dirties at 93% of the link", PreCopyPolicy{MaxDowntime: 500 * ms}, nearLink,
			[]Verdict{G}, []string{"93%", "930.9 MiB/s"}},
		{"dirty set plateaus", PreCopyPolicy{MaxDowntime: 350 * ms}, plateau,
			[]Verdict{C, C, G}, []string{"round 3", "59.1 MiB to 57.2 MiB", "10%", "263.1 MiB/s", "517.5ms"}},
		{"round limit reached", PreCopyPolicy{MaxDowntime: time.Second, MaxRounds: 4}, slow,
			[]Verdict{C, C, C, G}, []string{"4-round limit", "245.7 MiB", "95.4 MiB/s", "2.88s", "1s budget"}},
		{"fits despite a high dirty rate", PreCopyPolicy{MaxDowntime: 350 * ms},
			[]Round{{SentBytes: MiB, Duration: ms, DirtiedBytes: MiB}},
			[]Verdict{S}, []string{"1.0 MiB"}},
		{"continue names the figures", PreCopyPolicy{MaxDowntime: 302 * ms}, converging[:2],
			[]Verdict{C, C}, []string{"round 2", "2.7 MiB", "302.9ms", "302ms budget", "47.7 MiB/s", "5%"}},
		{"no bandwidth measurable yet", PreCopyPolicy{MaxRounds: 2},
			[]Round{{SentBytes: GiB, DirtiedBytes: MiB}, {DirtiedBytes: MiB}},
			[]Verdict{C, G}, []string{"2-round limit", "1.0 MiB"}},
		{"last round without duration", PreCopyPolicy{MaxDowntime: 350 * ms},
			[]Round{converging[0], {SentBytes: 54_650_000, DirtiedBytes: 300 * MiB}},
			[]Verdict{C, G}, []string{"300.0 MiB", "shrinking by less than 10%"}},
		{"negative figures count as zero", PreCopyPolicy{MaxDowntime: 500 * ms},
			[]Round{{SentBytes: -1, Duration: -ms, DirtiedBytes: -1}, {SentBytes: MiB, Duration: 10 * ms, DirtiedBytes: -5}},
			[]Verdict{C, S}, []string{"0 B dirty"}},
	} {
		for i := range tc.rounds {
			v, reason := tc.p.Next(tc.rounds[:i+1])
			if v != tc.want[i] {
				t.Errorf("%s: after round %d: %s (%s), want %s", tc.name, i+1, v, reason, tc.want[i])
			}
			if reason == "" {
				t.Errorf("%s: after round %d: empty reason", tc.name, i+1)
			}
			if i == len(tc.rounds)-1 {
				for _, m := range tc.mention {
					if !strings.Contains(reason, m) {
						t.Errorf("%s: reason %q does not mention %q", tc.name, reason, m)
					}
				}
			}
		}
	}
}

// geometric simulates pre-copy of mem bytes over a link of bw bytes/s while
// the job dirties factor*bw bytes/s.
func geometric(mem int64, bw, factor float64, n int) []Round {
	var rs []Round
	send := mem
	for range n {
		d := time.Duration(float64(send) / bw * float64(time.Second))
		dirtied := int64(float64(send) * factor)
		rs = append(rs, Round{SentBytes: send, Duration: d, DirtiedBytes: dirtied})
		send = dirtied
	}
	return rs
}

func TestPreCopyDefaults(t *testing.T) {
	var p PreCopyPolicy // 300ms budget, 8 rounds, 300ms fixed cost
	if v, reason := p.Next(nil); v != Continue || !strings.Contains(reason, "first round") {
		t.Errorf("Next(nil) = %s, %q", v, reason)
	}
	rs := geometric(GiB, 100e6, 0.7, 9)
	for i := range 7 {
		if v, reason := p.Next(rs[:i+1]); v != Continue {
			t.Fatalf("after round %d: %s (%s), want continue", i+1, v, reason)
		}
	}
	v, reason := p.Next(rs[:8])
	if v != GiveUp || !strings.Contains(reason, "8-round limit") {
		t.Errorf("after round 8: %s (%q), want give-up at the 8-round limit", v, reason)
	}
	// With both defaults at 300ms only an empty dirty set fits, and the
	// reason says why the budget cannot be met.
	if !strings.Contains(reason, "fixed cost alone uses it up") {
		t.Errorf("reason %q does not explain the unattainable budget", reason)
	}
	if v, _ := p.Next([]Round{{SentBytes: GiB, Duration: time.Second}}); v != StopAndCopy {
		t.Errorf("nothing dirty under default policy: %s, want stop-and-copy", v)
	}
	// Nonsense policy values take the defaults too.
	neg := PreCopyPolicy{MaxDowntime: -1, MaxRounds: -1, FixedCost: -1}
	for i := range rs {
		v1, r1 := neg.Next(rs[:i+1])
		v2, r2 := p.Next(rs[:i+1])
		if v1 != v2 || r1 != r2 {
			t.Errorf("round %d: negative policy %s %q, zero policy %s %q", i+1, v1, r1, v2, r2)
		}
	}
}

func TestPreCopyExtremes(t *testing.T) {
	p := PreCopyPolicy{MaxDowntime: time.Second}
	for _, rs := range [][]Round{
		{{}},
		{{}, {}, {}},
		{{SentBytes: math.MaxInt64, Duration: 1, DirtiedBytes: math.MaxInt64}},
		{{SentBytes: 1, Duration: math.MaxInt64, DirtiedBytes: math.MaxInt64}},
		{{SentBytes: math.MaxInt64, Duration: math.MaxInt64, DirtiedBytes: 0}},
	} {
		v, reason := p.Next(rs)
		if reason == "" || v < Continue || v > GiveUp {
			t.Errorf("Next(%+v) = %s, %q", rs, v, reason)
		}
	}
}

func TestVerdictString(t *testing.T) {
	for v, want := range map[Verdict]string{Continue: "continue", StopAndCopy: "stop-and-copy", GiveUp: "give-up", 7: "Verdict(7)"} {
		if got := v.String(); got != want {
			t.Errorf("Verdict(%d).String() = %q, want %q", int(v), got, want)
		}
	}
}

// TestChooseTCPEstablished: established connections are only safe with
// stop-copy, so auto picks it even for a large job and post-copy refuses.
func TestChooseTCPEstablished(t *testing.T) {
	both := Capabilities{LazyPages: true}
	sit := Situation{Source: both, Dest: both, MemoryBytes: 8 * GiB, TCPEstablished: true}
	d, err := Choose(ModeAuto, sit)
	if err != nil || d.Mode != ModeStopCopy || !strings.Contains(d.Reason, "TCP") {
		t.Fatalf("auto with TCP connections = %+v, %v; want stop-copy naming TCP", d, err)
	}
	sit.TCPEstablished = false
	if d, _ := Choose(ModeAuto, sit); d.Mode != ModePostCopy {
		t.Fatalf("auto without TCP connections chose %s; the TCP rule must be what decides", d.Mode)
	}
	sit.TCPEstablished = true
	if _, err := Choose(ModePostCopy, sit); err == nil || !strings.Contains(err.Error(), "stop-copy") {
		t.Fatalf("post-copy with TCP connections: err %v; want a refusal naming stop-copy", err)
	}
	if d, err := Choose(ModeStopCopy, sit); err != nil || d.Mode != ModeStopCopy {
		t.Fatalf("stop-copy with TCP connections = %+v, %v", d, err)
	}
}
