package migrate

// This file holds the pure decision of live migration: which mode moves a
// job, from what both hosts can do, the job's memory, the downtime limit and
// whether TCP connections are carried. Nothing here touches the system, so
// the rules are unit-tested, and Migrate only follows the Decision.

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/ferry-cr/ferry/internal/progress"
)

// Mode is how a job's memory reaches the destination.
type Mode string

const (
	// ModeAuto picks stop-copy or post-copy from the hosts' capabilities,
	// the job's memory, the downtime limit and the TCP connections carried.
	ModeAuto Mode = "auto"
	// ModeStopCopy freezes the job and streams the whole checkpoint. It is
	// the simplest and most robust mode (one transfer, the source is no
	// longer needed once it ends), but downtime grows with memory size.
	ModeStopCopy Mode = "stop-copy"
	// ModePostCopy freezes the job, sends everything but memory and restores
	// with CRIU lazy pages; memory follows on demand. Downtime does not grow
	// with memory, but the job depends on the source until the last page
	// has arrived.
	ModePostCopy Mode = "post-copy"
	// ModePreCopy (memory copied in rounds while the job runs) is not built.
	// The name is parsed only so that asking for it is refused as a mode
	// this ferry cannot run (ErrUnsupportedMode), not as an unknown word.
	ModePreCopy Mode = "pre-copy"
)

// modes lists the modes this ferry runs, in the order error messages show
// them.
var modes = []Mode{ModeAuto, ModeStopCopy, ModePostCopy}

// ParseMode parses the value of a --mode flag. The empty string means auto,
// so an unset option behaves like the flag's default.
func ParseMode(s string) (Mode, error) {
	t := Mode(strings.ToLower(strings.TrimSpace(s)))
	if t == "" {
		return ModeAuto, nil
	}
	if t == ModePreCopy {
		return t, nil // Choose refuses it with the reason
	}
	for _, m := range modes {
		if m == t {
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
	// mem_dirty_track). Only pre-copy would need it, and it is not built:
	// the hosts report it in the handshake, and nothing decides on it.
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

// Situation is everything Choose weighs.
type Situation struct {
	Source, Dest Capabilities
	// MemoryBytes is the job's resident memory.
	MemoryBytes int64
	// MaxDowntime is the longest acceptable freeze (--max-downtime); 0 (or
	// negative) means no limit was stated.
	MaxDowntime time.Duration
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
}

// smallMemory is the most memory auto moves by stop-copy when no downtime
// limit is given: 256 MiB crosses any link fast enough to migrate over in
// a few seconds at most, which is not worth post-copy's dependence on the
// source until the last page has arrived.
const smallMemory = 256 << 20

// Choose resolves the requested mode for situation s.
//
// An explicit mode is honoured if the hosts can do it, since the user may
// know things Choose does not (a flaky source, a fast link); if they cannot,
// the error says what is missing and which modes remain. Stop-copy is never
// refused; pre-copy always is, since it is not built.
//
// Auto picks stop-copy when TCP connections are carried (only stop-copy
// keeps them locked), and when no downtime limit is given and the job has
// at most 256 MiB of memory, because it is one transfer and leaves nothing
// behind on the source. Otherwise stop-copy's downtime is not known to be
// acceptable: a job over 256 MiB may take long to cross, and with a limit,
// ferry cannot tell whether stop-copy fits it, since it does not measure
// the link before it migrates. Then auto picks post-copy when both hosts
// support lazy pages, since its downtime does not grow with memory, and
// falls back to stop-copy otherwise, with a Reason saying why.
func Choose(want Mode, s Situation) (Decision, error) {
	if want == "" {
		want = ModeAuto
	}
	s.MemoryBytes = max(s.MemoryBytes, 0)
	s.MaxDowntime = max(s.MaxDowntime, 0)
	lazy := s.Source.LazyPages && s.Dest.LazyPages
	mem := progress.FormatBytes(s.MemoryBytes)
	switch want {
	case ModeStopCopy:
		return Decision{Mode: ModeStopCopy,
			Reason: fmt.Sprintf("stop-copy requested: the job stays frozen while its checkpoint with %s of memory crosses the link%s.", mem, limitClause(s.MaxDowntime))}, nil
	case ModePostCopy:
		if s.TCPEstablished {
			return Decision{}, errors.New("post-copy cannot carry established TCP connections (the source must release them while it serves pages, and what a peer sends then would be lost); use --mode stop-copy")
		}
		if !lazy {
			return Decision{}, fmt.Errorf("post-copy needs lazy pages (userfaultfd: CRIU features uffd and uffd-noncoop) on both hosts, since the destination restores with lazy pages and the source serves them, and %s it; use --mode stop-copy",
				lacking(s.Source.LazyPages, s.Dest.LazyPages))
		}
		return Decision{Mode: ModePostCopy,
			Reason: fmt.Sprintf("post-copy requested: the job runs on the destination once everything but its %s of memory has arrived, and the memory follows on demand.", mem)}, nil
	case ModePreCopy:
		alt := "stop-copy"
		if lazy && !s.TCPEstablished {
			alt = "post-copy or stop-copy"
		}
		return Decision{}, fmt.Errorf("pre-copy is not built in this ferry; use --mode %s", alt)
	case ModeAuto:
		return chooseAuto(s, lazy, mem), nil
	}
	return Decision{}, fmt.Errorf("invalid migration mode %q: want %s", string(want), modeList())
}

func chooseAuto(s Situation, lazy bool, mem string) Decision {
	if s.TCPEstablished {
		return Decision{Mode: ModeStopCopy,
			Reason: "auto chose stop-copy: established TCP connections are carried, and only stop-copy keeps them locked until the source copy is gone" + limitClause(s.MaxDowntime) + "."}
	}
	var why string // why stop-copy's downtime is not known to be acceptable
	switch {
	case s.MaxDowntime == 0 && s.MemoryBytes <= smallMemory:
		return Decision{Mode: ModeStopCopy,
			Reason: fmt.Sprintf("auto chose stop-copy: no downtime limit was given and %s of memory is within the %s small-job threshold.",
				mem, progress.FormatBytes(smallMemory))}
	case s.MaxDowntime > 0:
		why = fmt.Sprintf("stop-copy of %s of memory cannot be shown to fit the %s downtime limit, since the link's bandwidth is not measured beforehand",
			mem, dur(s.MaxDowntime))
	default:
		why = fmt.Sprintf("no downtime limit was given but %s of memory exceeds the %s small-job threshold",
			mem, progress.FormatBytes(smallMemory))
	}
	if lazy {
		return Decision{Mode: ModePostCopy,
			Reason: fmt.Sprintf("auto chose post-copy: %s, while post-copy's downtime does not grow with memory, which follows on demand.", why)}
	}
	return Decision{Mode: ModeStopCopy,
		Reason: fmt.Sprintf("auto fell back to stop-copy: %s, and post-copy is unavailable because %s lazy pages (userfaultfd).",
			why, lacking(s.Source.LazyPages, s.Dest.LazyPages))}
}

// limitClause notes that stop-copy may or may not fit a downtime limit, if
// one was given.
func limitClause(limit time.Duration) string {
	if limit <= 0 {
		return ""
	}
	return ", which may or may not fit the " + dur(limit) + " downtime limit (the link's bandwidth is not measured beforehand)"
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

// dur renders a duration as the user gave it, to the 10µs, 0.1ms or 10ms
// that matters for downtime at its scale.
func dur(d time.Duration) string {
	switch {
	case d >= time.Second:
		return d.Round(10 * time.Millisecond).String()
	case d >= 10*time.Millisecond:
		return d.Round(100 * time.Microsecond).String()
	}
	return d.Round(10 * time.Microsecond).String()
}
