package migrate

import (
	"fmt"
	"strings"
	"testing"
)

// The explorer: both sides of a migration, as handover.go's states and
// rules, exchange messages over a link that can lose, duplicate or delay
// them (a delay past the silence bound is a timeout), and either side can
// die at any step. Every schedule with up to maxFaults faults is run, in
// both modes, and each end state is checked: the job never runs twice,
// it always exists somewhere (running, or frozen and recorded as in
// doubt), and a copy is left frozen only by a rule that records it.

const maxFaults = 3

type copyState int

const (
	noCopy  copyState = iota // none (the destination before its restore, or dropped)
	running                  // runs
	frozen                   // frozen and recorded in doubt (keepInDoubt, keepHeld)
	holding                  // frozen by the migration itself, still in progress
	ended                    // ended (the source's, handed over)
)

func (c copyState) String() string {
	return [...]string{"none", "running", "frozen in doubt", "held", "ended"}[c]
}

// srcOnLost is the source's rule when the migration ends in state s
// without word from the destination (link lost, silence, or this process
// interrupted). dropped says the destination confirmed its copy is gone.
func srcOnLost(s srcState, dropped bool) srcVerdict {
	switch s {
	case srcRunning, srcFrozen:
		return giveBack
	case srcServing:
		if dropped {
			return giveBack
		}
		return keepInDoubt // the destination may run the job
	case srcCommitted:
		return keepInDoubt // ended here; held frozen there
	}
	return endHere
}

// srcOnCrash is what the source's lease guard does when the source's
// ferry dies in state s: what the lease was last committed to.
func srcOnCrash(s srcState) srcVerdict {
	switch s {
	case srcRunning, srcFrozen:
		return giveBack // uncommitted: given back as it was
	case srcServing:
		return keepInDoubt // Keep: frozen, its record says why
	}
	return endHere // End
}

// dstOnCrash is what becomes of the destination's copy when its serve
// dies in state s: a held copy stays frozen with its record's note (the
// job's shim holds it); a lazy one loses its memory's source (the
// lazy-pages daemon dies with it) and is dropped.
func dstOnCrash(s dstState) dstVerdict {
	switch s {
	case dstReceiving, dstLazy:
		return drop
	case dstHeld:
		return keepHeld
	}
	return run
}

// rules are the four rules the explorer applies: handover.go's, or a
// broken one in the test that shows the explorer catches it.
type rules struct {
	srcOnLost  func(srcState, bool) srcVerdict
	srcOnCrash func(srcState) srcVerdict
	dstOnLost  func(dstState, bool) dstVerdict
	dstOnCrash func(dstState) dstVerdict
}

var realRules = rules{srcOnLost, srcOnCrash, dstOnLost, dstOnCrash}

type world struct {
	r                *rules
	postCopy         bool
	src              srcState
	dst              dstState
	srcCopy, dstCopy copyState
	srcEnd, dstEnd   bool // the side has finished (or died)
	dropped          bool
	toDst, toSrc     []string
	faults           int
	trace            []string
}

func newWorld(postCopy bool, r *rules) *world {
	// The source has frozen its job and sent its stream.
	return &world{r: r, postCopy: postCopy, src: srcFrozen, srcCopy: holding, dstCopy: noCopy, toDst: []string{"stream"}}
}

func (w *world) clone() *world {
	c := *w
	c.toDst = append([]string(nil), w.toDst...)
	c.toSrc = append([]string(nil), w.toSrc...)
	c.trace = append([]string(nil), w.trace...)
	return &c
}

// applySrc carries out a source verdict.
func (w *world) applySrc(v srcVerdict, tell bool) {
	switch v {
	case giveBack:
		w.srcCopy = running
		if tell {
			w.toDst = append(w.toDst, "abort")
		}
	case keepInDoubt:
		if w.srcCopy == holding {
			w.srcCopy = frozen
		}
	case endHere:
		w.srcCopy = ended
	}
	w.srcEnd = true
}

func (w *world) applyDst(v dstVerdict, tell bool) {
	switch v {
	case drop:
		if w.dstCopy == running && tell {
			w.toSrc = append(w.toSrc, "dropped")
		}
		w.dstCopy = noCopy
	case keepHeld:
		if w.dstCopy == holding {
			w.dstCopy = frozen
		}
	case run:
		w.dstCopy = running
	}
	w.dstEnd = true
}

// srcGets is the source's code for message m.
func (w *world) srcGets(m string) {
	switch {
	case m == "restored" && w.src == srcFrozen && !w.postCopy:
		w.src, w.srcCopy = srcCommitted, ended // commit End; CRIU ends the tree
		w.toDst = append(w.toDst, "gone")
	case m == "restored" && w.src == srcFrozen && w.postCopy:
		w.src = srcServing // commit Keep
		w.toDst = append(w.toDst, "commit", "pages")
	case m == "running" && w.src == srcCommitted:
		w.src, w.srcEnd = srcDone, true
	case m == "complete" && w.src == srcServing:
		w.src, w.srcCopy, w.srcEnd = srcDone, ended, true // commit End
		w.toDst = append(w.toDst, "gone")
	case m == "dropped" && w.src == srcServing:
		w.dropped = true
		w.applySrc(w.r.srcOnLost(w.src, true), false)
	case m == "abort" && (w.src == srcFrozen || w.src == srcServing):
		w.applySrc(w.r.srcOnLost(w.src, w.src == srcServing), false)
	}
}

func (w *world) dstGets(m string) {
	switch {
	case m == "stream" && w.dst == dstReceiving:
		w.dst, w.dstCopy = dstHeld, holding
		w.toSrc = append(w.toSrc, "restored")
	case m == "gone" && w.dst == dstHeld && !w.postCopy:
		w.dst, w.dstCopy, w.dstEnd = dstRunning, running, true
		w.toSrc = append(w.toSrc, "running")
	case m == "commit" && w.dst == dstHeld && w.postCopy:
		w.dst, w.dstCopy = dstLazy, running
	case m == "pages" && w.dst == dstLazy:
		w.dst, w.dstEnd = dstRunning, true
		w.toSrc = append(w.toSrc, "complete")
	case m == "abort" && (w.dst == dstReceiving || w.dst == dstHeld || w.dst == dstLazy):
		w.applyDst(w.r.dstOnLost(w.dst, true), true)
	}
}

// step is one thing that can happen next.
type step struct {
	name  string
	fault bool
	do    func(w *world)
}

func (w *world) steps() []step {
	var out []step
	if len(w.toDst) > 0 {
		m := w.toDst[0]
		out = append(out,
			step{"deliver " + m + " to destination", false, func(w *world) {
				w.toDst = w.toDst[1:]
				if !w.dstEnd {
					w.dstGets(m)
				}
			}},
			step{"lose " + m, true, func(w *world) { w.toDst = w.toDst[1:] }},
			step{"duplicate " + m, true, func(w *world) {
				if !w.dstEnd {
					w.dstGets(m)
				}
			}})
		if len(w.toDst) > 1 {
			out = append(out, step{"reorder " + m + " behind " + w.toDst[1], true, func(w *world) {
				w.toDst[0], w.toDst[1] = w.toDst[1], w.toDst[0]
			}})
		}
	}
	if len(w.toSrc) > 0 {
		m := w.toSrc[0]
		out = append(out,
			step{"deliver " + m + " to source", false, func(w *world) {
				w.toSrc = w.toSrc[1:]
				if !w.srcEnd {
					w.srcGets(m)
				}
			}},
			step{"lose " + m, true, func(w *world) { w.toSrc = w.toSrc[1:] }},
			step{"duplicate " + m, true, func(w *world) {
				if !w.srcEnd {
					w.srcGets(m)
				}
			}})
	}
	if !w.srcEnd {
		out = append(out,
			step{"source dies", true, func(w *world) { w.applySrc(w.r.srcOnCrash(w.src), false) }},
			step{"source hears nothing in time", true, func(w *world) { w.applySrc(w.r.srcOnLost(w.src, false), true) }})
	}
	if !w.dstEnd {
		out = append(out,
			step{"destination dies", true, func(w *world) { w.applyDst(w.r.dstOnCrash(w.dst), false) }},
			step{"destination hears nothing in time", true, func(w *world) { w.applyDst(w.r.dstOnLost(w.dst, false), true) }})
		if w.dst == dstReceiving {
			out = append(out, step{"destination's restore fails", true, func(w *world) {
				w.dstCopy = noCopy
				w.dstEnd = true
				w.toSrc = append(w.toSrc, "abort")
			}})
		}
	}
	return out
}

// settled ends a schedule whose messages are all delivered or lost: a
// side still waiting waits in vain, and its silence rule applies.
func (w *world) settle() {
	if !w.srcEnd {
		w.applySrc(w.r.srcOnLost(w.src, w.dropped), true)
	}
	if !w.dstEnd {
		w.applyDst(w.r.dstOnLost(w.dst, false), true)
	}
}

func (w *world) check() error {
	switch {
	case w.srcCopy == running && w.dstCopy == running:
		return fmt.Errorf("the job runs twice")
	case w.srcCopy == holding || w.dstCopy == holding:
		return fmt.Errorf("a copy is left frozen outside the in-doubt state (source %s, destination %s)", w.srcCopy, w.dstCopy)
	case w.srcCopy != running && w.dstCopy != running && w.srcCopy != frozen && w.dstCopy != frozen:
		return fmt.Errorf("the job is lost (source %s, destination %s)", w.srcCopy, w.dstCopy)
	}
	return nil
}

// explore runs every schedule from w and returns how many it ran, or
// the first end state that breaks a rule, with its schedule.
func explore(w *world, depth int, n *int) error {
	if *n > 2_000_000 {
		return fmt.Errorf("the schedule space is larger than expected")
	}
	steps := w.steps()
	if w.srcEnd && w.dstEnd && len(w.toDst) == 0 && len(w.toSrc) == 0 || len(steps) == 0 || depth > 40 {
		w.settle()
		*n++
		if err := w.check(); err != nil {
			return fmt.Errorf("%s (source %s, destination %s) after:\n  %s", err, w.srcCopy, w.dstCopy, strings.Join(w.trace, "\n  "))
		}
		return nil
	}
	for _, s := range steps {
		if s.fault && w.faults >= maxFaults {
			continue
		}
		c := w.clone()
		if s.fault {
			c.faults++
		}
		c.trace = append(c.trace, s.name)
		s.do(c)
		if err := explore(c, depth+1, n); err != nil {
			return err
		}
	}
	return nil
}

func TestExploreHandover(t *testing.T) {
	for _, postCopy := range []bool{false, true} {
		mode := map[bool]string{false: "stop-copy", true: "post-copy"}[postCopy]
		n := 0
		if err := explore(newWorld(postCopy, &realRules), 0, &n); err != nil {
			t.Fatalf("%s: %v", mode, err)
		}
		t.Logf("%s: explored %d schedules with up to %d faults (lost, duplicated, reordered or delayed messages; either side dying): the job ran once and was never lost in each", mode, n, maxFaults)
		if n < 100 {
			t.Fatalf("%s: only %d schedules explored", mode, n)
		}
	}
}

// The explorer finds broken rules: a destination that runs its held copy
// when it hears nothing, or a source that gives its job back once it has
// committed, makes the job run twice in some schedule; a destination that
// drops its held copy on silence loses it.
func TestExploreHandoverCatchesBrokenRules(t *testing.T) {
	for name, broken := range map[string]struct {
		r    rules
		want string
	}{
		"destination runs a held copy on silence": {rules{srcOnLost, srcOnCrash, func(s dstState, aborted bool) dstVerdict {
			if s == dstHeld && !aborted {
				return run
			}
			return dstOnLost(s, aborted)
		}, dstOnCrash}, "twice"},
		"source gives back after its commit": {rules{func(s srcState, dropped bool) srcVerdict {
			if s == srcCommitted {
				return giveBack
			}
			return srcOnLost(s, dropped)
		}, srcOnCrash, dstOnLost, dstOnCrash}, "twice"},
		"destination drops a held copy on silence": {rules{srcOnLost, srcOnCrash, func(s dstState, aborted bool) dstVerdict {
			if s == dstHeld {
				return drop
			}
			return dstOnLost(s, aborted)
		}, dstOnCrash}, "lost"},
	} {
		found := false
		for _, postCopy := range []bool{false, true} {
			n := 0
			if err := explore(newWorld(postCopy, &broken.r), 0, &n); err != nil {
				if !strings.Contains(err.Error(), broken.want) {
					t.Errorf("%s: found %v, want a job %s", name, err, broken.want)
				}
				found = true
			}
		}
		if !found {
			t.Errorf("%s: the explorer found nothing wrong", name)
		}
	}
}
