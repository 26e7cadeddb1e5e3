package migrate

// This file holds the pure decisions of live migration: which mode to use for
// a job, and when iterative pre-copy should stop. Nothing here touches the
// system, so the policy can be tested with recorded statistics and the code
// that drives CRIU only has to follow the verdicts.

import (
	"errors"
	"fmt"
	"math"
	"sort"
	"strings"
	"time"

	"github.com/ferry-cr/ferry/internal/progress"
)

// Mode is how a job's memory reaches the destination.
type Mode string

const (
	// ModeAuto picks one of the other modes from the hosts' capabilities,
	// the job's memory size, the link bandwidth and the downtime budget.
	ModeAuto Mode = "auto"
	// ModeStopCopy freezes the job and streams the whole checkpoint. It is
	// the simplest and most robust mode (one transfer, the source is no
	// longer needed once it ends), but downtime grows with memory size.
	ModeStopCopy Mode = "stop-copy"
	// ModePostCopy freezes the job, sends everything but memory and restores
	// with CRIU lazy pages; memory follows on demand. Downtime is about
	// constant, but the job depends on the source until the last page has
	// arrived.
	ModePostCopy Mode = "post-copy"
	// ModePreCopy copies memory in rounds while the job runs, then freezes it
	// and sends only what was dirtied since. Downtime is small when the job
	// dirties memory much slower than the link carries it.
	ModePreCopy Mode = "pre-copy"
)

// modes lists the valid modes in the order error messages show them.
var modes = []Mode{ModeAuto, ModeStopCopy, ModePostCopy, ModePreCopy}

// ParseMode parses the value of a --mode flag. The empty string means auto,
// so an unset option behaves like the flag's default.
func ParseMode(s string) (Mode, error) {
	t := strings.ToLower(strings.TrimSpace(s))
	if t == "" {
		return ModeAuto, nil
	}
	for _, m := range modes {
		if string(m) == t {
			return m, nil
		}
	}
	return "", fmt.Errorf("invalid migration mode %q: want %s", s, modeList())
}

func modeList() string {
	names := make([]string, len(modes))
	for i, m := range modes {
		names[i] = string(m)
	}
	return strings.Join(names[:len(names)-1], ", ") + " or " + names[len(names)-1]
}

// Capabilities is what one host's kernel and CRIU can do for migration.
type Capabilities struct {
	// SoftDirty: the kernel tracks dirtied pages (CRIU feature
	// mem_dirty_track), which pre-copy needs on the source to know what to
	// send again after each round.
	SoftDirty bool
	// LazyPages: userfaultfd works (CRIU features uffd and uffd-noncoop).
	// Post-copy needs it on both hosts: the destination restores with lazy
	// pages and the source's CRIU serves the pages it faults in.
	LazyPages bool
}

// CapabilitiesFromFeatures maps the CRIU feature checks (as reported by
// "criu check --feature", see internal/doctor) to Capabilities, so the
// feature names live in one place.
func CapabilitiesFromFeatures(f map[string]bool) Capabilities {
	return Capabilities{
		SoftDirty: f["mem_dirty_track"],
		LazyPages: f["uffd"] && f["uffd-noncoop"],
	}
}

// Situation is everything Choose weighs. Zero values mean "unknown" or "use
// the default", never "zero", so a partly measured situation is still valid.
type Situation struct {
	Source, Dest Capabilities
	// MemoryBytes is the job's resident memory.
	MemoryBytes int64
	// CompressRatio is the expected stored/raw size of memory pages;
	// 0 (or negative) assumes 0.5.
	CompressRatio float64
	// Bandwidth is the measured link throughput in bytes/s; 0 means unknown.
	Bandwidth float64
	// MaxDowntime is the longest acceptable freeze; 0 (or negative) means no
	// limit was stated.
	MaxDowntime time.Duration
	// FixedCost is the part of downtime not proportional to memory: freeze,
	// dumping metadata, restore. 0 (or negative) assumes 300ms.
	FixedCost time.Duration
	// TCPEstablished says established TCP connections are carried. Only
	// stop-copy keeps them locked from the dump until the source copy is
	// gone (CRIU's post-dump verdict); a post-copy source must release
	// them while it serves pages, and a peer's data acknowledged then
	// would be lost.
	TCPEstablished bool
}

// Decision is the mode Choose settled on, and why.
type Decision struct {
	Mode Mode
	// Reason is one sentence for the user naming the figures that decided.
	Reason string
	// EstimatedDowntime is the expected freeze; 0 means it cannot be
	// estimated (stop-copy over a link of unknown bandwidth).
	EstimatedDowntime time.Duration
}

// Defaults for inputs left at zero. 300ms of fixed cost is a typical freeze,
// metadata dump and restore of a small process tree; 0.5 is a conservative
// ratio for compressed anonymous memory; 256 MiB is roughly what stop-copy
// moves in well under a few seconds on any link fast enough to migrate over,
// so without a stated budget it is not worth the fragility of the other modes.
const (
	defaultCompressRatio = 0.5
	defaultFixedCost     = 300 * time.Millisecond
	defaultMaxDowntime   = 300 * time.Millisecond
	defaultMaxRounds     = 8
	smallMemory          = 256 << 20
)

// withDefaults fills in the defaults and clears nonsense so that estimates
// never divide by zero: a non-positive, NaN or infinite bandwidth is unknown.
func (s Situation) withDefaults() Situation {
	if s.MemoryBytes < 0 {
		s.MemoryBytes = 0
	}
	if !(s.CompressRatio > 0) || math.IsInf(s.CompressRatio, 0) {
		s.CompressRatio = defaultCompressRatio
	}
	if !(s.Bandwidth > 0) || math.IsInf(s.Bandwidth, 0) {
		s.Bandwidth = 0
	}
	if s.MaxDowntime < 0 {
		s.MaxDowntime = 0
	}
	if s.FixedCost <= 0 {
		s.FixedCost = defaultFixedCost
	}
	return s
}

// stopCopy estimates stop-copy downtime: compressed memory over the link plus
// the fixed cost. ok is false when the bandwidth is unknown.
func (s Situation) stopCopy() (est time.Duration, ok bool) {
	if s.Bandwidth <= 0 {
		return 0, false
	}
	compressed := float64(s.MemoryBytes) * s.CompressRatio
	return addSat(s.FixedCost, seconds(compressed/s.Bandwidth)), true
}

// stopCopyPhrase describes the stop-copy estimate with its inputs.
func (s Situation) stopCopyPhrase() string {
	est, ok := s.stopCopy()
	if !ok {
		return fmt.Sprintf("stop-copy downtime for %s of memory cannot be estimated because the link bandwidth is unknown",
			progress.FormatBytes(s.MemoryBytes))
	}
	return fmt.Sprintf("stop-copy of %s of memory (about %s compressed) over %s would freeze the job for about %s (including %s fixed cost)",
		progress.FormatBytes(s.MemoryBytes), progress.FormatBytes(int64(float64(s.MemoryBytes)*s.CompressRatio)),
		rate(s.Bandwidth), dur(est), dur(s.FixedCost))
}

// preCopyTarget is the downtime pre-copy aims for when it converges: the
// budget (or the policy default), but never less than the fixed cost.
func (s Situation) preCopyTarget() time.Duration {
	t := s.MaxDowntime
	if t <= 0 {
		t = defaultMaxDowntime
	}
	return max(t, s.FixedCost)
}

// Choose resolves the requested mode for situation s.
//
// An explicit mode is honoured if the hosts can do it, since the user may know
// things Choose does not (a flaky source, a fast link not yet measured); if
// they cannot, the error says what is missing and which modes remain. An
// explicit stop-copy is never refused, only annotated when it exceeds the
// budget.
//
// Auto prefers, in order: stop-copy when its estimate fits MaxDowntime (or, with
// no limit, when memory is at most 256 MiB), because it is one transfer and
// leaves nothing behind on the source; post-copy when both hosts support lazy
// pages, because its downtime does not depend on memory size or on how fast
// the job dirties memory; pre-copy when the source tracks dirty memory,
// because it can still shorten downtime (the caller falls back to a final
// stop-copy if PreCopyPolicy gives up); and stop-copy as the last resort,
// with a Reason saying why nothing better was possible.
func Choose(want Mode, s Situation) (Decision, error) {
	if want == "" {
		want = ModeAuto
	}
	s = s.withDefaults()
	lazy := s.Source.LazyPages && s.Dest.LazyPages
	switch want {
	case ModeStopCopy:
		est, _ := s.stopCopy()
		return Decision{Mode: ModeStopCopy, EstimatedDowntime: est,
			Reason: "stop-copy requested: " + s.stopCopyPhrase() + budgetClause(est, s.MaxDowntime) + "."}, nil
	case ModePostCopy:
		if s.TCPEstablished {
			return Decision{}, errors.New("post-copy cannot carry established TCP connections (the source must release them while it serves pages, and what a peer sends then would be lost); use --mode stop-copy")
		}
		if !lazy {
			alt := "stop-copy"
			if s.Source.SoftDirty {
				alt = "pre-copy or stop-copy"
			}
			return Decision{}, fmt.Errorf("post-copy needs lazy pages (userfaultfd: CRIU features uffd and uffd-noncoop) on both hosts, since the destination restores with lazy pages and the source serves them, and %s it; use --mode %s",
				lacking(s.Source.LazyPages, s.Dest.LazyPages), alt)
		}
		return Decision{Mode: ModePostCopy, EstimatedDowntime: s.FixedCost,
			Reason: fmt.Sprintf("post-copy requested: the job is frozen for about %s (fixed cost) whatever its %s of memory, which follows on demand after restore.",
				dur(s.FixedCost), progress.FormatBytes(s.MemoryBytes))}, nil
	case ModePreCopy:
		if !s.Source.SoftDirty {
			alt := "stop-copy"
			if lazy {
				alt = "post-copy or stop-copy"
			}
			return Decision{}, fmt.Errorf("pre-copy needs memory dirty tracking (soft-dirty, CRIU feature mem_dirty_track) on the source kernel, which the source lacks; use --mode %s", alt)
		}
		t := s.preCopyTarget()
		return Decision{Mode: ModePreCopy, EstimatedDowntime: t,
			Reason: fmt.Sprintf("pre-copy requested: %s of memory is copied while the job runs, aiming for about %s of downtime if the dirty set converges.",
				progress.FormatBytes(s.MemoryBytes), dur(t))}, nil
	case ModeAuto:
		if s.TCPEstablished {
			est, _ := s.stopCopy()
			return Decision{Mode: ModeStopCopy, EstimatedDowntime: est,
				Reason: "auto chose stop-copy: established TCP connections are carried, and only stop-copy keeps them locked until the source copy is gone; " + s.stopCopyPhrase() + budgetClause(est, s.MaxDowntime) + "."}, nil
		}
		return chooseAuto(s, lazy), nil
	}
	return Decision{}, fmt.Errorf("invalid migration mode %q: want %s", string(want), modeList())
}

func chooseAuto(s Situation, lazy bool) Decision {
	est, known := s.stopCopy()
	var why string // why stop-copy is not good enough
	switch {
	case s.MaxDowntime > 0 && known && est <= s.MaxDowntime:
		return Decision{Mode: ModeStopCopy, EstimatedDowntime: est,
			Reason: "auto chose stop-copy: " + s.stopCopyPhrase() + ", within the " + dur(s.MaxDowntime) + " budget."}
	case s.MaxDowntime <= 0 && s.MemoryBytes <= smallMemory:
		tail := "; its downtime cannot be estimated because the link bandwidth is unknown"
		if known {
			tail = fmt.Sprintf(", so stop-copy's estimated %s freeze is acceptable", dur(est))
		}
		return Decision{Mode: ModeStopCopy, EstimatedDowntime: est,
			Reason: fmt.Sprintf("auto chose stop-copy: no downtime limit was given and %s of memory is within the %s small-job threshold%s.",
				progress.FormatBytes(s.MemoryBytes), progress.FormatBytes(smallMemory), tail)}
	case s.MaxDowntime > 0 && known:
		why = s.stopCopyPhrase() + ", over the " + dur(s.MaxDowntime) + " budget"
	case s.MaxDowntime > 0:
		why = fmt.Sprintf("the link bandwidth is unknown, so stop-copy of %s of memory cannot be shown to fit the %s budget",
			progress.FormatBytes(s.MemoryBytes), dur(s.MaxDowntime))
	default:
		why = fmt.Sprintf("no downtime limit was given but %s of memory exceeds the %s small-job threshold, and %s",
			progress.FormatBytes(s.MemoryBytes), progress.FormatBytes(smallMemory), s.stopCopyPhrase())
	}
	if lazy {
		return Decision{Mode: ModePostCopy, EstimatedDowntime: s.FixedCost,
			Reason: fmt.Sprintf("auto chose post-copy: %s, while post-copy freezes it for about %s because memory follows on demand.",
				why, dur(s.FixedCost))}
	}
	noLazy := fmt.Sprintf("post-copy is unavailable because %s lazy pages (userfaultfd)",
		lacking(s.Source.LazyPages, s.Dest.LazyPages))
	if s.Source.SoftDirty {
		t := s.preCopyTarget()
		return Decision{Mode: ModePreCopy, EstimatedDowntime: t,
			Reason: fmt.Sprintf("auto chose pre-copy: %s, and %s, so memory is copied while the job runs, aiming for about %s of downtime.",
				why, noLazy, dur(t))}
	}
	return Decision{Mode: ModeStopCopy, EstimatedDowntime: est,
		Reason: fmt.Sprintf("auto fell back to stop-copy although the estimate exceeds the budget: %s, %s, and pre-copy is unavailable because the source kernel lacks soft-dirty memory tracking.",
			why, noLazy)}
}

// budgetClause compares an estimate with the budget, if there is one.
func budgetClause(est, budget time.Duration) string {
	switch {
	case budget <= 0:
		return ""
	case est <= 0:
		return ", so it may or may not fit the " + dur(budget) + " budget"
	case est <= budget:
		return ", within the " + dur(budget) + " budget"
	}
	return ", over the " + dur(budget) + " budget"
}

// lacking names the host(s) without a capability, with the verb.
func lacking(source, dest bool) string {
	switch {
	case !source && !dest:
		return "both the source and the destination lack"
	case !source:
		return "the source lacks"
	}
	return "the destination lacks"
}

// Round is one finished pre-copy round, as measured.
type Round struct {
	// SentBytes is what the round transferred.
	SentBytes int64
	// Duration is how long the round took.
	Duration time.Duration
	// DirtiedBytes is how much memory the job dirtied meanwhile: the next
	// round's work, or the final stop-and-copy's if iteration stops now.
	DirtiedBytes int64
}

// Verdict is what pre-copy should do after a round.
type Verdict int

const (
	// Continue: run another round; the dirty set is shrinking but does not
	// fit the budget yet.
	Continue Verdict = iota
	// StopAndCopy: freeze the job and send the remaining dirty set; it fits
	// the downtime budget.
	StopAndCopy
	// GiveUp: more rounds will not help (the job dirties memory about as fast
	// as the link sends it, the dirty set stopped shrinking, or the round
	// limit was reached). The caller does the final copy anyway, with a longer
	// downtime, or switches to post-copy.
	GiveUp
)

// String returns a short name for v.
func (v Verdict) String() string {
	switch v {
	case Continue:
		return "continue"
	case StopAndCopy:
		return "stop-and-copy"
	case GiveUp:
		return "give-up"
	}
	return fmt.Sprintf("Verdict(%d)", int(v))
}

// PreCopyPolicy decides when iterative pre-copy stops. Zero (or negative)
// fields take defaults: MaxDowntime 300ms, MaxRounds 8, FixedCost 300ms.
//
// Note that with both defaults at 300ms the budget leaves no time for pages,
// so only an empty dirty set fits it; callers should set MaxDowntime (from
// --max-downtime) or a measured FixedCost.
type PreCopyPolicy struct {
	MaxDowntime time.Duration
	MaxRounds   int
	FixedCost   time.Duration
}

// Thresholds for giving up. A dirty rate at 90% of bandwidth leaves each round
// only 10% smaller than the last, which would need tens of rounds, and real
// links and dirty rates fluctuate more than that; a dirty set that shrinks by
// less than 10% in a round has reached the job's hot working set.
const (
	maxDirtyFraction = 0.9
	minShrink        = 0.1
)

func (p PreCopyPolicy) withDefaults() PreCopyPolicy {
	if p.MaxDowntime <= 0 {
		p.MaxDowntime = defaultMaxDowntime
	}
	if p.MaxRounds <= 0 {
		p.MaxRounds = defaultMaxRounds
	}
	if p.FixedCost <= 0 {
		p.FixedCost = defaultFixedCost
	}
	return p
}

// Next decides after each finished round, from all rounds so far, and returns
// a sentence with the figures behind the verdict.
//
// Bandwidth is the median of the rounds' SentBytes/Duration: it uses what the
// transfer actually achieved rather than a probe, and the median ignores one
// round disturbed by other traffic. The checks run in this order:
//
//   - StopAndCopy when the last round's DirtiedBytes / bandwidth + FixedCost
//     fits MaxDowntime: that is the expected freeze, and it is within budget.
//   - GiveUp when the last round's dirty rate (DirtiedBytes/Duration) is at
//     least 90% of the bandwidth: each round could shrink the set by 10% at
//     most, so iteration cannot catch up.
//   - GiveUp when the dirty set shrank by less than 10% from the round
//     before: what remains is the job's hot working set.
//   - GiveUp when MaxRounds rounds have run, stating the expected downtime.
//   - Continue otherwise.
//
// Rounds with no bytes or no duration give no bandwidth; if none does, Next
// continues up to MaxRounds, since the downtime cannot be estimated.
func (p PreCopyPolicy) Next(rounds []Round) (Verdict, string) {
	p = p.withDefaults()
	n := len(rounds)
	if n == 0 {
		return Continue, "no pre-copy round has finished yet, so nothing is measured; run the first round"
	}
	last := rounds[n-1]
	dirty := max(last.DirtiedBytes, 0)
	bw, ok := medianBandwidth(rounds)
	if !ok {
		if n >= p.MaxRounds {
			return GiveUp, fmt.Sprintf("round %d reached the %d-round limit without a round of measurable bandwidth, so the downtime for the remaining %s cannot be estimated",
				n, p.MaxRounds, progress.FormatBytes(dirty))
		}
		return Continue, fmt.Sprintf("round %d: no round yet has both bytes sent and a duration, so bandwidth is unknown; %s is dirty",
			n, progress.FormatBytes(dirty))
	}
	final := addSat(p.FixedCost, seconds(float64(dirty)/bw))
	expect := fmt.Sprintf("%s dirty at %s plus %s fixed cost means about %s of downtime",
		progress.FormatBytes(dirty), rate(bw), dur(p.FixedCost), dur(final))
	if final <= p.MaxDowntime {
		return StopAndCopy, fmt.Sprintf("round %d: %s, within the %s budget; stop and copy", n, expect, dur(p.MaxDowntime))
	}
	over := ", over the " + dur(p.MaxDowntime) + " budget"
	if p.FixedCost >= p.MaxDowntime {
		over += " (the fixed cost alone uses it up)"
	}
	var dirtyRate float64
	if last.Duration > 0 {
		dirtyRate = float64(dirty) / last.Duration.Seconds()
		if dirtyRate >= maxDirtyFraction*bw {
			return GiveUp, fmt.Sprintf("round %d: the job dirties memory at %s, %.0f%% of the %s the link carries, so copying cannot catch up; %s%s",
				n, rate(dirtyRate), 100*dirtyRate/bw, rate(bw), expect, over)
		}
	}
	if n >= 2 {
		prev := max(rounds[n-2].DirtiedBytes, 0)
		if float64(dirty) > (1-minShrink)*float64(prev) {
			return GiveUp, fmt.Sprintf("round %d: the dirty set went from %s to %s, shrinking by less than %.0f%%, so more rounds will not converge; %s%s",
				n, progress.FormatBytes(prev), progress.FormatBytes(dirty), 100*minShrink, expect, over)
		}
	}
	if n >= p.MaxRounds {
		return GiveUp, fmt.Sprintf("round %d reached the %d-round limit; %s%s", n, p.MaxRounds, expect, over)
	}
	return Continue, fmt.Sprintf("round %d: %s%s, and the job dirties memory at %s, %.0f%% of the bandwidth; run another round",
		n, expect, over, rate(dirtyRate), 100*dirtyRate/bw)
}

// medianBandwidth is the median bytes/s over rounds with bytes and duration.
func medianBandwidth(rounds []Round) (float64, bool) {
	rates := make([]float64, 0, len(rounds))
	for _, r := range rounds {
		if r.SentBytes > 0 && r.Duration > 0 {
			rates = append(rates, float64(r.SentBytes)/r.Duration.Seconds())
		}
	}
	if len(rates) == 0 {
		return 0, false
	}
	sort.Float64s(rates)
	m := len(rates) / 2
	if len(rates)%2 == 1 {
		return rates[m], true
	}
	return (rates[m-1] + rates[m]) / 2, true
}

// seconds converts s seconds to a Duration, saturating instead of
// overflowing (a huge job over a trickle of a link) and mapping NaN and
// negatives to 0.
func seconds(s float64) time.Duration {
	if !(s > 0) {
		return 0
	}
	if s >= float64(math.MaxInt64)/float64(time.Second) {
		return math.MaxInt64
	}
	return time.Duration(s * float64(time.Second))
}

// addSat adds two non-negative durations, saturating at the maximum.
func addSat(a, b time.Duration) time.Duration {
	if a > math.MaxInt64-b {
		return math.MaxInt64
	}
	return a + b
}

// rate renders bytes/s like the progress meter does ("823.4 MiB/s").
func rate(bps float64) string {
	if !(bps > 0) {
		return "0 B/s"
	}
	bps = min(bps, 1<<62) // keep the conversion to int64 defined

	return progress.FormatBytes(int64(bps)) + "/s"
}

// dur renders a duration with the precision that matters for downtime: 10ms
// above a second, 0.1ms above 10ms (so an estimate just over a budget does not
// print as equal to it), and 10µs below.
func dur(d time.Duration) string {
	switch {
	case d >= time.Second:
		return d.Round(10 * time.Millisecond).String()
	case d >= 10*time.Millisecond:
		return d.Round(100 * time.Microsecond).String()
	}
	return d.Round(10 * time.Microsecond).String()
}
