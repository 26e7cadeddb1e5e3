package migrate

import (
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// The explorer drives the real machines of handover.go (source and
// destination, the code Migrate and Server run) through a simulated
// world: a link that loses, duplicates, reorders and delays messages and
// can be cut; a fake CRIU whose dumps, restores, commits, ends and page
// transfers succeed or fail; the job's lease guard, which acts for a
// source that dies; a serve that dies and restarts (dstRecover); and the
// settle rules (srcSettles, dstSettles) that a re-run of the source's
// command applies at the end. After every step it checks that the job
// never runs in two places and that every record tells the truth; at the
// end, that it exists somewhere, that every frozen copy is recorded as
// such, that settling leaves exactly one running copy, and that a
// schedule with no fault moved the job.

type copyState int

const (
	noCopy    copyState = iota
	running             // runs
	frozen              // frozen (held, kept, or stopped for the dump)
	ended               // ended (the source's, handed over)
	restoring           // the destination's restore is at work
	missing             // runs with pages that never came (zeros): a corrupt copy
)

func (c copyState) String() string {
	return [...]string{"none", "running", "frozen", "ended", "restoring", "running with missing pages"}[c]
}

// stream is the checkpoint, as a message to the destination.
const stream in = 100

// lease is where the source's lease stands.
type leaseState int

const (
	leaseOpen leaseState = iota // taken, nothing committed
	leaseKeep
	leaseEnd
)

type world struct {
	// broken, when set, replaces a machine's answer (a test that the
	// explorer finds broken rules): side is "source" or "destination".
	broken   func(side string, st int, i in) ([]act, bool)
	postCopy bool
	src      *source
	dst      *destination
	srcCopy  copyState
	dstCopy  copyState
	lease    leaseState
	srcNote  string // the source's record's note state ("" for none)
	dstNote  string
	toDst    []in
	toSrc    []in
	linkUp   bool
	// Pending local outcomes.
	srcEnding   bool // commit End done: CRIU ends the tree (or fails to)
	landed      bool // stop-copy: the lease's End landed (Options.Committed)
	srcCut      bool // cutPages done
	srcWaitCut  bool // waitCut armed
	pages       int  // 0 not done, 1 complete, 2 failed
	srcPagesHrd bool // the source heard its page server's end
	dstPagesHrd bool // the destination heard its daemon's
	srcDead     bool
	dstDead     bool
	faults      int
	trace       []string
}

func newWorld(postCopy bool) *world {
	w := &world{postCopy: postCopy, src: &source{postCopy: postCopy}, dst: &destination{postCopy: postCopy},
		srcCopy: running, linkUp: true}
	w.srcDo(w.src.step(inFrozen))
	w.srcCopy = frozen
	return w
}

func (w *world) clone() *world {
	c := *w
	if w.src != nil {
		s := *w.src
		c.src = &s
	}
	if w.dst != nil {
		d := *w.dst
		c.dst = &d
	}
	c.toDst = slices.Clone(w.toDst)
	c.toSrc = slices.Clone(w.toSrc)
	c.trace = slices.Clone(w.trace)
	return &c
}

// sendTo queues m on the link (lost if the link is down).
func (w *world) send(q *[]in, m in) {
	if w.linkUp {
		*q = append(*q, m)
	}
}

// srcDo carries out the source's actions as the real driver would.
func (w *world) srcDo(acts []act) {
	for _, a := range acts {
		switch a {
		case sendAbort:
			w.send(&w.toDst, inAbort)
		case sendGone:
			w.send(&w.toDst, inGone)
		case sendCommit:
			w.send(&w.toDst, inCommit)
		case noteFrozen, noteGaveBack:
			w.srcNote = stateFrozen
		case noteCommitted:
			w.srcNote = stateCommitted
		case noteServing:
			w.srcNote = stateServing
		case noteInDoubt:
			w.srcNote = stateInDoubt
		case clearNote:
			w.srcNote = ""
		case commitEnd, endCopy:
			w.lease, w.srcEnding = leaseEnd, true
		case commitKeep:
			w.lease = leaseKeep
		case giveBack:
			if w.srcCopy == frozen {
				w.srcCopy = running
			}
		case cutPages:
			w.srcCut = true
			w.failPages()
		case waitCut:
			w.srcWaitCut = true
		}
	}
}

// dstDo carries out the destination's actions.
func (w *world) dstDo(acts []act) {
	for _, a := range acts {
		switch a {
		case sendAbort:
			w.send(&w.toSrc, inAbort)
		case sendRestored:
			w.send(&w.toSrc, inRestored)
		case sendRunning:
			w.send(&w.toSrc, inRunning)
		case sendComplete:
			w.send(&w.toSrc, inComplete)
		case sendDropped:
			w.send(&w.toSrc, inDropped)
		case noteHeld:
			w.dstNote = stateHeld
		case noteLazy:
			w.dstNote = stateLazy
		case noteInDoubt:
			w.dstNote = stateInDoubt
		case clearNote:
			w.dstNote = ""
		case thaw:
			switch {
			case w.postCopy && w.pages != 1:
				w.dstCopy = running // lazily: becomes missing if the pages fail
			default:
				w.dstCopy = running
			}
		case dropCopy:
			w.dstCopy, w.dstNote = noCopy, "" // its record goes with it
			w.failPages()
		}
	}
}

// failPages ends a page transfer that has not completed.
func (w *world) failPages() {
	if w.postCopy && w.pages == 0 {
		w.pages = 2
	}
}

// step is one thing that can happen next.
type step struct {
	name  string
	fault bool
	do    func(w *world)
}

func (w *world) srcAlive() bool { return w.src != nil && !w.src.done() }
func (w *world) dstAlive() bool { return w.dst != nil && !w.dst.done() }

func (w *world) srcGets(i in) {
	if w.broken != nil {
		if acts, ok := w.broken("source", int(w.src.st), i); ok {
			w.src.st = srcDone
			w.srcDo(acts)
			return
		}
	}
	w.srcDo(w.src.step(i))
}
func (w *world) dstGets(i in) {
	if i == stream {
		if w.dst.st == dstReceiving && w.dstCopy == noCopy {
			// The restore's record carries the held note from its
			// creation (restore.Options.Migration).
			w.dstCopy, w.dstNote = restoring, stateHeld
		}
		return
	}
	if w.broken != nil {
		if acts, ok := w.broken("destination", int(w.dst.st), i); ok {
			w.dst.st = dstDone
			w.dstDo(acts)
			return
		}
	}
	w.dstDo(w.dst.step(i))
}

func (w *world) steps() []step {
	var out []step
	add := func(name string, fault bool, do func(w *world)) { out = append(out, step{name, fault, do}) }
	// The link.
	if len(w.toDst) > 0 && w.dstCopy != restoring {
		m := w.toDst[0]
		add("destination gets "+name(m), false, func(w *world) {
			w.toDst = w.toDst[1:]
			if w.dstAlive() {
				w.dstGets(m)
			}
		})
		add("lose "+name(m)+" to the destination", true, func(w *world) { w.toDst = w.toDst[1:] })
		if m != stream { // the stream is a whole TCP conversation, not one message
			add("duplicate "+name(m)+" to the destination", true, func(w *world) { w.toDst = append([]in{m}, w.toDst...) })
		}
		if len(w.toDst) > 1 && m != stream {
			add("reorder "+name(m)+" behind "+name(w.toDst[1]), true, func(w *world) { w.toDst[0], w.toDst[1] = w.toDst[1], w.toDst[0] })
		}
	}
	if len(w.toSrc) > 0 {
		m := w.toSrc[0]
		add("source gets "+name(m), false, func(w *world) {
			w.toSrc = w.toSrc[1:]
			if w.srcAlive() {
				w.srcGets(m)
			}
		})
		add("lose "+name(m)+" to the source", true, func(w *world) { w.toSrc = w.toSrc[1:] })
		add("duplicate "+name(m)+" to the source", true, func(w *world) { w.toSrc = append([]in{m}, w.toSrc...) })
		if len(w.toSrc) > 1 {
			add("reorder "+name(m)+" behind "+name(w.toSrc[1]), true, func(w *world) { w.toSrc[0], w.toSrc[1] = w.toSrc[1], w.toSrc[0] })
		}
	}
	if w.linkUp {
		add("the link is cut", true, func(w *world) {
			w.linkUp = false
			w.toDst, w.toSrc = nil, nil
			w.failPages()
			if w.srcAlive() {
				w.toSrc = []in{inLost} // what the source reads next
			}
			if w.dstAlive() && w.dstCopy != restoring {
				w.toDst = []in{inLost}
			}
		})
	}
	// The fake CRIU and the lease guard.
	if w.dstAlive() && w.dstCopy == restoring {
		add("the restore succeeds", false, func(w *world) {
			w.dstCopy = frozen
			w.dstGets(inRestoredHere)
			if !w.linkUp && w.dstAlive() {
				w.dstGets(inLost) // its Restored could not be sent
			}
		})
		add("the restore fails", true, func(w *world) {
			w.dstCopy, w.dstNote = noCopy, "" // the failed restore removes its record
			w.dstGets(inRestoreFailed)
		})
	}
	if w.srcAlive() && w.src.st == srcFrozen && !w.src.sent {
		add("the stream is sent whole", false, func(w *world) {
			w.send(&w.toDst, stream)
			if w.linkUp {
				w.srcGets(inSent)
			} else {
				w.srcGets(inLost)
			}
		})
		// Before its end (DataEnd goes in Handover): the stream is cut
		// short, so the destination's restore cannot complete.
		add("the dump fails", true, func(w *world) { w.srcGets(inDumpFailed) })
	}
	if w.srcAlive() && w.srcEnding && w.src.st == srcCommitted && !w.postCopy && !w.landed {
		// The commit lands before CRIU (or ferry) ends the tree.
		add("the lease's End lands", false, func(w *world) {
			w.landed = true
			w.srcGets(inCommitted)
		})
	}
	if w.srcAlive() && w.srcEnding && (w.postCopy || w.landed) {
		add("CRIU ends the source's copy", false, func(w *world) {
			w.srcEnding, w.srcCopy = false, ended
			w.srcGets(inEnded)
		})
		add("ending the source's copy fails", true, func(w *world) {
			w.srcEnding, w.lease = false, leaseKeep
			w.srcGets(inEndFailed)
		})
	}
	if w.srcAlive() && w.srcEnding {
		if w.src.st == srcCommitted && !w.postCopy && !w.landed {
			add("the lease runs out before the commit", true, func(w *world) {
				w.srcEnding, w.lease = false, leaseOpen
				w.srcCopy = running // the guard gave it back
				w.srcGets(inCommitFailed)
			})
		}
	}
	if w.srcAlive() && w.src.st == srcServing && !w.src.kept {
		add("the lease holds Keep", false, func(w *world) { w.srcGets(inKept) })
	}
	if w.srcAlive() && w.srcWaitCut {
		add("the source's grace before the cut runs out", false, func(w *world) {
			w.srcWaitCut = false
			w.srcGets(inCutDue)
		})
	}
	if w.postCopy {
		// Pages flow once the destination's copy exists (the daemon
		// fetches even while it is held) and the source serves them.
		if w.pages == 0 && (w.dstCopy == frozen || w.dstCopy == running) && w.srcCopy == frozen && !w.srcCut && w.src != nil {
			add("every page arrives", false, func(w *world) { w.pages = 1 })
			add("the page transfer fails", true, func(w *world) { w.pages = 2 })
		}
		if w.pages != 0 && !w.srcPagesHrd && w.srcAlive() && w.src.st >= srcServing {
			add("the source's page server ends cleanly", false, func(w *world) {
				w.srcPagesHrd = true
				w.srcGets(inServed)
			})
			if w.pages == 2 {
				add("the source's page server fails", false, func(w *world) {
					w.srcPagesHrd = true
					w.srcGets(inServeFailed)
				})
			}
		}
		if w.pages != 0 && !w.dstPagesHrd && w.dstAlive() && w.dst.st != dstReceiving {
			what, i := "the daemon has every page", inPagesIn
			if w.pages == 2 {
				what, i = "the daemon's transfer fails", inPagesFailed
			}
			add(what, false, func(w *world) {
				w.dstPagesHrd = true
				w.dstGets(i)
			})
		}
	}
	// Timers and the operator.
	if w.srcAlive() {
		add("the source hears nothing in time", true, func(w *world) { w.srcGets(inSilence) })
		add("the source is interrupted", true, func(w *world) { w.srcGets(inInterrupt) })
	}
	if w.dstAlive() && w.dstCopy != restoring {
		add("the destination hears nothing in time", true, func(w *world) { w.dstGets(inSilence) })
	}
	// Crashes.
	if w.src != nil && !w.srcDead && (w.srcAlive() || w.srcEnding) {
		add("the source's ferry dies", true, func(w *world) { w.crashSrc() })
	}
	if w.dst != nil && !w.dstDead && w.dstAlive() {
		add("the destination's serve dies", true, func(w *world) { w.crashDst() })
	}
	return out
}

// crashSrc is the source's ferry killed: its lease guard acts on the
// lease as it stands, and the link and its page server die with it.
func (w *world) crashSrc() {
	w.srcDead, w.srcEnding = true, false
	w.src = nil
	switch w.lease {
	case leaseOpen:
		if w.srcCopy == frozen {
			w.srcCopy = running
		}
	case leaseEnd:
		w.srcCopy = ended
	}
	w.failPages()
	w.toDst = nil
	if w.dstAlive() && w.dstCopy != restoring {
		w.toDst = []in{inLost}
	}
	if w.dstCopy == restoring {
		// Its stream is whole (restoring starts on the whole stream):
		// the restore goes on; the link is gone.
		w.linkUp = false
	}
	w.linkUp = false
}

// crashDst is the destination's serve killed: a restore under way dies
// with it (its record is swept), a held copy stays frozen with its note,
// a copy that runs on pages still coming loses its daemon.
func (w *world) crashDst() {
	w.dstDead = true
	w.dst = nil
	switch w.dstCopy {
	case restoring:
		w.dstCopy = noCopy // a stale start, its note with it until a serve recovers
	case running:
		if w.postCopy && w.pages != 1 {
			w.dstCopy = missing
		}
	}
	w.failPages()
	w.toSrc = nil
	if w.srcAlive() {
		w.toSrc = []in{inLost}
	}
	w.linkUp = false
}

func name(i in) string {
	if i == stream {
		return "the stream"
	}
	return i.String()
}

// invariant is checked after every step.
func (w *world) invariant() error {
	isRunning := func(c copyState) bool { return c == running || c == missing }
	if isRunning(w.srcCopy) && isRunning(w.dstCopy) {
		return fmt.Errorf("the job runs twice (source %s, destination %s)", w.srcCopy, w.dstCopy)
	}
	return w.truthful() // after every step, not only at the end
}

// truthful says whether the records tell the truth about the copies.
func (w *world) truthful() error {
	okSrc := map[string][]copyState{
		"":             {running, ended},
		stateFrozen:    {running, frozen},
		stateCommitted: {ended, frozen},
		stateServing:   {frozen},
		stateInDoubt:   {frozen, ended},
	}
	okDst := map[string][]copyState{
		"":           {noCopy, running},
		stateHeld:    {frozen, restoring},
		stateLazy:    {running, missing},
		stateInDoubt: {frozen},
	}
	if !slices.Contains(okSrc[w.srcNote], w.srcCopy) {
		return fmt.Errorf("the source's record (%q) does not tell the truth: its copy is %s", w.srcNote, w.srcCopy)
	}
	if !slices.Contains(okDst[w.dstNote], w.dstCopy) && !(w.dstDead && w.dstCopy == noCopy) {
		// (A dead serve's stale start keeps its note until a serve
		// recovers; ferry list shows it stale.)
		return fmt.Errorf("the destination's record (%q) does not tell the truth: its copy is %s", w.dstNote, w.dstCopy)
	}
	return nil
}

// finish ends a schedule: the dead restart (a restarted serve recovers
// by dstRecover; the page transfer is over), the records are checked,
// and the source's command, re-run, settles by srcSettles and dstSettles.
func (w *world) finish() error {
	if w.dstDead && w.dstCopy == noCopy {
		w.dstNote = "" // Recover: no copy is left, the note goes
	}
	if w.dstDead && w.dstNote != "" {
		switch dstRecover(w.dstNote) {
		case dropCopy:
			w.dstCopy, w.dstNote = noCopy, ""
		case noteInDoubt:
			w.dstNote = stateInDoubt
		}
	}
	if err := w.truthful(); err != nil {
		return err
	}
	if w.faults == 0 && (w.srcCopy != ended || w.dstCopy != running || w.srcNote != "" || w.dstNote != "") {
		// Liveness: with nothing going wrong, the job moves.
		return fmt.Errorf("a migration with no fault did not move the job (source %s %q, destination %s %q)", w.srcCopy, w.srcNote, w.dstCopy, w.dstNote)
	}
	if w.dstCopy == missing {
		return fmt.Errorf("the destination's copy runs with pages missing")
	}
	if w.srcCopy == frozen && w.srcNote == "" || w.dstCopy == frozen && w.dstNote == "" {
		return fmt.Errorf("a copy is left frozen with no record (source %s, destination %s)", w.srcCopy, w.dstCopy)
	}
	if w.srcCopy != running && w.dstCopy != running && w.srcCopy != frozen && w.dstCopy != frozen {
		return fmt.Errorf("the job is lost (source %s, destination %s)", w.srcCopy, w.dstCopy)
	}
	// Settle, as a re-run of the source's command does.
	if w.srcNote != "" {
		src := map[copyState]string{running: "running", frozen: "frozen", ended: "ended"}[w.srcCopy]
		held := w.dstCopy == frozen && w.dstNote != ""
		ans, a := dstSettles(src, held, w.dstCopy == running)
		switch a {
		case thaw:
			w.dstCopy, w.dstNote = running, ""
		case dropCopy:
			w.dstCopy, w.dstNote = noCopy, ""
		}
		switch srcSettles(src, ans) {
		case clearNote:
		case endCopy:
			w.srcCopy = ended
		case thaw:
			w.srcCopy = running
		default:
			return fmt.Errorf("settling leaves the job lost or twice (source %s, destination %s)", src, ans)
		}
		w.srcNote = ""
	}
	if w.srcCopy == frozen || w.dstCopy == frozen {
		return fmt.Errorf("a copy is still frozen after settling (source %s, destination %s)", w.srcCopy, w.dstCopy)
	}
	if (w.srcCopy == running) == (w.dstCopy == running) {
		return fmt.Errorf("after settling: source %s, destination %s", w.srcCopy, w.dstCopy)
	}
	return nil
}

type explorer struct {
	maxFaults int
	n         int
	limit     int
}

// explore runs every schedule from w with up to maxFaults faults.
func (e *explorer) explore(w *world, depth int) error {
	if e.n > e.limit {
		return fmt.Errorf("the schedule space is larger than expected (%d)", e.n)
	}
	steps := w.steps()
	var next []step
	for _, s := range steps {
		if !s.fault || w.faults < e.maxFaults {
			next = append(next, s)
		}
	}
	if len(next) == 0 || !slices.ContainsFunc(next, func(s step) bool { return !s.fault }) && !w.srcAlive() && !w.dstAlive() || depth > 60 {
		e.n++
		if err := w.finish(); err != nil {
			return fmt.Errorf("%s after:\n  %s", err, strings.Join(w.trace, "\n  "))
		}
		return nil
	}
	for _, s := range next {
		c := w.clone()
		if s.fault {
			c.faults++
		}
		c.trace = append(c.trace, s.name)
		s.do(c)
		if err := c.invariant(); err != nil {
			return fmt.Errorf("%s after:\n  %s", err, strings.Join(c.trace, "\n  "))
		}
		if err := e.explore(c, depth+1); err != nil {
			return err
		}
	}
	return nil
}

// walk is one seeded random schedule to its end.
func walk(postCopy bool, seed uint64, maxFaults int) error {
	r := rand.New(rand.NewPCG(seed, 0))
	w := newWorld(postCopy)
	for depth := 0; depth < 200; depth++ {
		var next []step
		for _, s := range w.steps() {
			if !s.fault || w.faults < maxFaults {
				next = append(next, s)
			}
		}
		if len(next) == 0 || !w.srcAlive() && !w.dstAlive() && !slices.ContainsFunc(next, func(s step) bool { return !s.fault }) {
			break
		}
		s := next[r.IntN(len(next))]
		if s.fault {
			w.faults++
		}
		w.trace = append(w.trace, s.name)
		s.do(w)
		if err := w.invariant(); err != nil {
			return fmt.Errorf("%s after:\n  %s", err, strings.Join(w.trace, "\n  "))
		}
	}
	if err := w.finish(); err != nil {
		return fmt.Errorf("%s after:\n  %s", err, strings.Join(w.trace, "\n  "))
	}
	return nil
}

// TestExploreHandover runs every schedule with up to two faults (lost,
// duplicated, reordered or delayed messages, a cut link, failed CRIU
// work, either side dying, an interrupt), in both modes, through the real
// machines.
func TestExploreHandover(t *testing.T) {
	for _, postCopy := range []bool{false, true} {
		mode := map[bool]string{false: "stop-copy", true: "post-copy"}[postCopy]
		e := &explorer{maxFaults: 3, limit: 5_000_000}
		if postCopy {
			e.maxFaults = 2 // pages add many schedules; the random walks go further
		}
		if err := e.explore(newWorld(postCopy), 0); err != nil {
			t.Fatalf("%s: %v", mode, err)
		}
		t.Logf("%s: explored all %d schedules with up to %d faults: the job never ran twice, was never lost, every record told the truth, and settling left one running copy", mode, e.n, e.maxFaults)
		if e.n < 1000 {
			t.Fatalf("%s: only %d schedules explored", mode, e.n)
		}
	}
}

// TestRandomHandover walks seeded random schedules with up to six
// faults. FERRY_HANDOVER_SEED replays one schedule (its failure prints
// the seed); FERRY_HANDOVER_WALKS sets how many are walked.
func TestRandomHandover(t *testing.T) {
	walks := 20000
	if n, err := strconv.Atoi(os.Getenv("FERRY_HANDOVER_WALKS")); err == nil && n > 0 {
		walks = n
	}
	seeds := make([]uint64, walks)
	base := rand.Uint64()
	for i := range seeds {
		seeds[i] = base + uint64(i)
	}
	if s, err := strconv.ParseUint(os.Getenv("FERRY_HANDOVER_SEED"), 10, 64); err == nil {
		seeds = []uint64{s}
	}
	for _, postCopy := range []bool{false, true} {
		mode := map[bool]string{false: "stop-copy", true: "post-copy"}[postCopy]
		for _, seed := range seeds {
			if err := walk(postCopy, seed, 6); err != nil {
				t.Fatalf("%s, seed %d (replay: FERRY_HANDOVER_SEED=%d go test -run TestRandomHandover ./migrate/): %v", mode, seed, seed, err)
			}
		}
		t.Logf("%s: %d random schedules with up to 6 faults each, seeds %d..%d", mode, len(seeds), seeds[0], seeds[len(seeds)-1])
	}
}

// The explorer finds broken rules: a destination that runs its held copy
// when it hears nothing, or a source that gives its job back after its
// commit, makes the job run twice in some schedule; a destination that
// drops its held copy on silence loses it.
func TestExploreHandoverCatchesBrokenRules(t *testing.T) {
	for what, c := range map[string]struct {
		broken func(side string, st int, i in) ([]act, bool)
		want   string
	}{
		"destination runs a held copy on silence": {func(side string, st int, i in) ([]act, bool) {
			return []act{thaw, clearNote}, side == "destination" && dstState(st) == dstHeld && i == inSilence
		}, "twice"},
		"source gives back after its commit": {func(side string, st int, i in) ([]act, bool) {
			return []act{giveBack, clearNote}, side == "source" && (srcState(st) == srcCommitted || srcState(st) == srcServing) && i == inSilence
		}, ""},
		"destination drops a held copy on silence": {func(side string, st int, i in) ([]act, bool) {
			return []act{dropCopy}, side == "destination" && dstState(st) == dstHeld && i == inSilence
		}, "lost"},
	} {
		found := false
		for _, postCopy := range []bool{false, true} {
			e := &explorer{maxFaults: 2, limit: 5_000_000}
			if postCopy {
				e.maxFaults = 1
			}
			w := newWorld(postCopy)
			w.broken = c.broken
			if err := e.explore(w, 0); err != nil {
				if !strings.Contains(err.Error(), c.want) {
					t.Errorf("%s: found %v, want a job %s", what, err, c.want)
				}
				found = true
			}
		}
		if !found {
			t.Errorf("%s: the explorer found nothing wrong", what)
		}
	}
}
