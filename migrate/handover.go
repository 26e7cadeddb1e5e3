package migrate

import "github.com/ferry-cr/ferry/internal/job"

// The handover, in one place: each side of a migration is a state
// machine (source, destination) that takes every input the world gives
// it (the peer's messages, the outcome of its own CRIU work and of its
// lease, a lost link, a silence that lasted too long, the operator's
// interrupt) through step, and answers with the actions to take, in
// order. The machines do no I/O and know no clock: source.go, serve.go and
// postcopy.go drive them with the real connection, CRIU and timers, and
// handover_test.go drives the same machines with a simulated link that
// loses, duplicates, reorders and delays messages, fake CRIU outcomes and
// crashes of either side at every step, and checks after every step that
// the job never runs twice and is never lost.
//
//	source (stop-copy)                        destination
//	srcRunning ─ freeze ─► srcFrozen
//	srcFrozen ── stream, DataEnd ─────────────► dstReceiving (restores, held frozen)
//	srcFrozen ◄──────────────────── Restored ── dstHeld
//	srcCommitted (note, then lease End; CRIU ends the tree)
//	srcCommitted ── Gone ─────────────────────► dstHeld ─► thaw ─► dstDone
//	srcDone ◄─────────────────────── Running ── dstDone
//
//	source (post-copy)                        destination
//	srcFrozen ── stream (no memory) ──────────► dstReceiving
//	srcFrozen ◄──────────────────── Restored ── dstHeld
//	srcServing (note, lease Keep) ─ Commit ───► dstLazy (runs; faults pages in)
//	srcServing ◄── pages over the page link ──► dstLazy
//	srcServing ◄──────────────────── Complete ─ dstComplete
//	srcDone (lease End, tree ended) ─ Gone ───► dstDone
//
// The rules the machines follow, whatever the order of events:
//   - The source's copy is given back (it runs on here) only while
//     nothing is committed, or when the destination says its copy is gone
//     (Dropped, or Abort, in post-copy).
//   - Before the source commits, its job's record says what it is about
//     to do, so that a source that dies just after the commit has left
//     the note that settles it (recovery below).
//   - The destination runs its copy only on the source's Gone (stop-copy)
//     or Commit (post-copy); it drops a held copy only on the source's
//     Abort, a failed restore, or (post-copy, before every page came) a
//     failed page transfer.
//   - Anything else that ends a migration (a lost link, silence, a
//     message that does not fit) leaves each copy as it is: a frozen copy
//     is recorded in doubt with the command that settles it (settle.go).

// in is one input to a side's machine.
type in int

const (
	// Messages from the peer.
	inRestoring in = iota // a heartbeat (Restoring, Prepared)
	inRestored
	inGone
	inCommit
	inRunning
	inComplete
	inDropped
	inAbort
	// The link and the clock.
	inLost    // the control connection failed or was cut
	inSilence // the peer said nothing for longer than its bound
	inCutDue  // source, post-copy: an interrupted source's grace before it cuts the page link ran out
	// The operator.
	inInterrupt
	// The source's own work.
	inFrozen       // the dump begins: the job may be frozen from here
	inSent         // the checkpoint is sent whole (DataEnd): the destination may restore it
	inDumpFailed   // the dump failed before the handover; dump gives the tree back
	inCommitFailed // the lease ran out before the commit: its guard gave the job back
	inKept         // post-copy: the lease holds Keep
	inCommitted    // the lease holds End: this copy never runs again, though it is not yet ended
	inEnded        // stop-copy: CRIU ended the tree after the commit
	inEndFailed    // committed, but ending the tree failed: it stays frozen
	inServed       // post-copy: CRIU served every page
	inServeFailed  // post-copy: CRIU's page server failed
	// The destination's own work.
	inRestoredHere  // the copy is restored, held frozen
	inRestoreFailed // the restore failed (or its stream did); nothing is left of it
	inThawFailed    // thawing the held copy failed
	inPagesIn       // post-copy: the lazy-pages daemon has every page
	inPagesFailed   // post-copy: the daemon failed, or the page link closed first
)

var inNames = [...]string{"restoring", "restored", "gone", "commit", "running", "complete", "dropped", "abort",
	"link lost", "silence", "cut due", "interrupt",
	"frozen", "sent", "dump failed", "commit failed", "kept", "committed", "ended", "end failed", "served", "serve failed",
	"restored here", "restore failed", "thaw failed", "pages in", "pages failed"}

func (i in) String() string { return inNames[i] }

// act is one action a machine asks its driver for.
type act int

const (
	// Messages to the peer.
	sendAbort act = iota
	sendGone
	sendCommit
	sendRestored
	sendRunning
	sendComplete
	sendDropped
	// The source's copy.
	noteFrozen    // record: frozen here for a move to the peer, nothing committed
	noteCommitted // record: ended here once committed; the start there unconfirmed
	noteServing   // record: frozen here while the destination runs on its pages
	noteInDoubt   // record: the outcome is unknown; how to settle it
	noteGaveBack  // record: runs on here; the peer may hold a frozen copy to drop
	clearNote     // the record holds no migration
	commitEnd     // commit the lease End: the point of no return (CRIU ends the tree)
	commitKeep    // commit the lease Keep: the copy stays frozen whatever happens to us
	giveBack      // the job runs on here (dump gives the tree back)
	endCopy       // post-copy: commit End and end the tree (its memory is all served)
	cutPages      // shut the page link (CRIU's page server and the destination see it)
	waitWord      // the destination's word must come within the silence bound
	waitCut       // cut the page link unless the destination drops first (a grace)
	// The destination's copy.
	noteHeld // record: held frozen until the source's word
	noteLazy // record: runs on pages still coming from the source
	thaw     // run the held copy
	dropCopy // kill the copy and forget it
)

var actNames = [...]string{"send abort", "send gone", "send commit", "send restored", "send running", "send complete", "send dropped",
	"note frozen", "note committed", "note serving", "note in doubt", "note gave back", "clear note", "commit end", "commit keep", "give back", "end copy", "cut pages",
	"wait for a word", "wait, then cut",
	"note held", "note lazy", "thaw", "drop copy"}

func (a act) String() string { return actNames[a] }

// srcState is where the source's side of a migration stands.
type srcState int

const (
	// srcRunning: nothing of the job is stopped yet (offer, Prepared).
	srcRunning srcState = iota
	// srcFrozen: the job is frozen here and its stream on the way or
	// sent; the destination may hold a frozen copy, but this side has
	// not committed.
	srcFrozen
	// srcCommitted (stop-copy): the lease is committed End and CRIU ends
	// this copy; the destination's held copy is the job.
	srcCommitted
	// srcServing (post-copy): Commit sent: the destination may run its
	// copy, which reads its memory from here; the lease holds Keep.
	srcServing
	// The ends: the destination runs the job and this copy is ended; the
	// job runs on here; or the outcome is in doubt (see the record).
	srcDone
	srcGaveBack
	srcInDoubt
)

var srcNames = [...]string{"running", "frozen", "committed", "serving", "done", "gave back", "in doubt"}

func (s srcState) String() string { return srcNames[s] }

// source is the source's machine.
type source struct {
	postCopy bool
	st       srcState
	// post-copy, in srcServing:
	served   bool // CRIU's page server has ended...
	serveBad bool // ...and failed
	complete bool // the destination has every page
	ctlLost  bool // the control connection is gone
	aborting bool // interrupted: Abort sent, the page link cut soon
	kept     bool // the lease holds Keep and Commit is sent
	ended    bool // stop-copy: CRIU ended the tree
	goneSent bool // stop-copy: Gone is sent (from the commit on)
	sent     bool // the checkpoint went whole: the destination may hold a copy
}

// done says whether the source's side has ended.
func (s *source) done() bool { return s.st >= srcDone }

// step takes one input and returns the actions it calls for, in order.
func (s *source) step(i in) []act {
	switch s.st {
	case srcRunning:
		switch i {
		case inFrozen:
			// Noted before anything is frozen: a source that dies from
			// here leaves the record that settles what the destination
			// holds (its guard gives the job back).
			s.st = srcFrozen
			return []act{noteFrozen}
		case inRestoring:
			return nil
		}
		// Refused, failed or interrupted before anything was stopped.
		s.st = srcGaveBack
		return []act{sendAbort}
	case srcFrozen:
		switch i {
		case inRestoring:
			return nil
		case inSent:
			s.sent = true
			return nil
		case inRestored:
			if s.postCopy {
				s.st = srcServing
				return []act{noteServing, commitKeep}
			}
			s.st = srcCommitted
			return []act{noteCommitted, commitEnd}
		}
		// Anything else before the commit: the job runs on here, and the
		// destination is told to drop whatever it holds. Unless it said
		// its copy is gone (or the dump failed, which fails its
		// restore), the record keeps what settles a copy it may hold
		// should the Abort not reach it.
		s.st = srcGaveBack
		if i == inAbort || i == inDropped || i == inDumpFailed || !s.sent {
			return []act{giveBack, clearNote, sendAbort}
		}
		return []act{giveBack, noteGaveBack, sendAbort}
	case srcCommitted:
		switch i {
		case inRestoring, inRestored:
			return nil // late or repeated words
		case inCommitFailed:
			// The guard gave the job back before the commit landed: the
			// destination must drop its copy.
			s.st = srcGaveBack
			return []act{noteGaveBack, sendAbort}
		case inCommitted:
			// The lease holds End: the guard ends this copy should we
			// die, and nothing thaws it. The destination may run its
			// own now, while ours is still being ended (CRIU's kill,
			// the exit of a tree of gigabytes: tens of milliseconds of
			// downtime saved).
			if s.postCopy || s.goneSent {
				return nil // post-copy said Gone when every page was in
			}
			s.goneSent = true
			return []act{sendGone}
		case inEnded:
			s.ended = true
			if s.postCopy {
				// Gone went before the end: the destination runs.
				s.st = srcDone
				return []act{clearNote}
			}
			if s.goneSent {
				return nil
			}
			s.goneSent = true
			return []act{sendGone}
		case inEndFailed:
			// Ours was meant to go, and stays frozen; theirs is held
			// (stop-copy) or runs (post-copy).
			s.st = srcInDoubt
			return []act{noteInDoubt}
		case inRunning:
			if s.ended {
				s.st = srcDone
				return []act{clearNote}
			}
			return nil // read only once ours has ended (or failed to)
		}
		// A lost link, silence, an interrupt, a stray word: this copy is
		// ended (or being ended), the start there unconfirmed.
		if !s.ended || s.postCopy {
			return nil // the end is under way; its outcome decides
		}
		s.st = srcInDoubt
		return []act{noteInDoubt}
	case srcServing:
		return s.serving(i)
	}
	return nil // ended: nothing changes it
}

// serving is srcServing's part of step.
func (s *source) serving(i in) []act {
	var acts []act
	switch i {
	case inKept:
		if s.kept {
			return nil
		}
		// From here the destination may run its copy: even an unsent
		// Commit counts, so ours must not run again unless it says its
		// own is gone.
		s.kept = true
		return []act{sendCommit}
	case inCommitFailed:
		if !s.kept {
			// The lease ran out before Keep: the guard gave the job
			// back, and the destination must drop its copy.
			s.st = srcGaveBack
			return []act{noteGaveBack, sendAbort}
		}
		return nil
	case inComplete:
		s.complete = true
	case inServed, inServeFailed:
		if s.served {
			return nil
		}
		s.served, s.serveBad = true, i == inServeFailed
		if s.serveBad {
			acts = append(acts, cutPages)
		}
	case inDropped, inAbort:
		// The destination's copy is gone (or never ran): ours is the job.
		s.st = srcGaveBack
		return []act{cutPages, giveBack, clearNote}
	case inLost:
		s.ctlLost = true
	case inSilence:
		// Both sides beat every heartbeatEvery while the pages move: a
		// destination silent this long is gone or cut off. It may run
		// the job, so ours stays frozen, in doubt.
		s.st = srcInDoubt
		return []act{noteInDoubt}
	case inInterrupt:
		if !s.aborting {
			s.aborting = true
			return []act{sendAbort, waitCut}
		}
	case inCutDue:
		return []act{cutPages}
	}
	switch {
	case s.served && s.complete:
		// Every page served, and the destination has them all: this
		// copy ends (srcCommitted, until CRIU has ended it).
		s.st = srcCommitted
		return append(acts, noteCommitted, sendGone, endCopy)
	case s.served && s.ctlLost:
		s.st = srcInDoubt
		return append(acts, noteInDoubt)
	case s.served && (i == inServed || i == inServeFailed):
		// CRIU is done: the destination's word decides, and must come
		// soon.
		return append(acts, waitWord)
	}
	return acts
}

// dstState is where the destination's side stands.
type dstState int

const (
	// dstReceiving: the checkpoint is arriving and being restored; no
	// copy exists yet, or one held frozen that the source has not heard of.
	dstReceiving dstState = iota
	// dstHeld: Restored sent; the copy is held frozen until the source
	// says Gone (stop-copy) or Commit (post-copy).
	dstHeld
	// dstLazy (post-copy): the copy runs and faults its memory in from
	// the source.
	dstLazy
	// dstComplete (post-copy): the copy runs with every page; the source's
	// Gone is awaited, but changes nothing.
	dstComplete
	// The ends: the copy is the job; it was dropped; or it is held frozen
	// in doubt (see the record).
	dstDone
	dstDropped
	dstInDoubt
)

var dstNames = [...]string{"receiving", "held", "lazy", "complete", "done", "dropped", "in doubt"}

func (d dstState) String() string { return dstNames[d] }

// destination is the destination's machine.
type destination struct {
	postCopy bool
	st       dstState
	ctlLost  bool // post-copy: the control connection is gone
	gone     bool // post-copy: the source said Gone
	pagesIn  bool // post-copy: every page came while the copy was held
}

// done says whether the destination's side has ended.
func (d *destination) done() bool { return d.st >= dstDone }

// step takes one input and returns the actions it calls for, in order.
func (d *destination) step(i in) []act {
	switch d.st {
	case dstReceiving:
		switch i {
		case inRestoredHere:
			d.st = dstHeld
			return []act{noteHeld, sendRestored}
		case inRestoreFailed:
			d.st = dstDropped
			return []act{sendAbort}
		}
		return nil // the restore's outcome decides (a cut stream fails it)
	case dstHeld:
		switch i {
		case inGone, inCommit:
			if d.postCopy {
				d.gone = i == inGone
				if d.pagesIn {
					// Every page came while it was held: it runs whole.
					d.st = dstComplete
					if d.gone {
						d.st = dstDone
					}
					return []act{thaw, clearNote, sendRunning, sendComplete}
				}
				d.st = dstLazy
				return []act{noteLazy, thaw, sendRunning}
			}
			if i == inCommit {
				break // not a stop-copy word
			}
			d.st = dstDone
			return []act{thaw, clearNote, sendRunning}
		case inAbort:
			// The source resumed its copy.
			d.st = dstDropped
			if d.postCopy {
				return []act{dropCopy, sendDropped}
			}
			return []act{dropCopy}
		case inThawFailed:
			// After Gone: the source's copy is ended and ours is frozen.
			d.st = dstInDoubt
			return []act{noteInDoubt}
		case inRestoring, inRestored, inRunning, inComplete, inDropped, inRestoredHere:
			return nil
		case inPagesIn:
			if d.postCopy && !d.ctlLost {
				d.pagesIn = true // the daemon fetched them all before Commit
				return nil
			}
		case inPagesFailed:
			if d.postCopy {
				// Not committed, and its memory cannot come: the source
				// keeps (or gets back) its own.
				d.st = dstDropped
				return []act{dropCopy, sendDropped}
			}
			return nil
		case inLost:
			if d.postCopy && !d.ctlLost && !d.pagesIn {
				// The page link may still tell (it fails, or the
				// pages all come without a Commit: in doubt).
				d.ctlLost = true
				return nil
			}
		}
		// The source's word did not come: it may have ended its copy.
		d.st = dstInDoubt
		return []act{noteInDoubt}
	case dstLazy:
		switch i {
		case inPagesIn:
			if d.gone || d.ctlLost {
				d.st = dstDone
				return []act{clearNote, sendComplete}
			}
			d.st = dstComplete
			return []act{clearNote, sendComplete}
		case inPagesFailed, inAbort, inThawFailed, inSilence:
			// Pages are missing (or will not come: the source has been
			// silent past its bound): our copy cannot run on, and the
			// source's frozen one is whole.
			d.st = dstDropped
			return []act{dropCopy, sendDropped}
		case inLost:
			d.ctlLost = true // the pages may still all come
		case inGone:
			d.gone = true
		}
		return nil
	case dstComplete:
		switch i {
		case inGone, inLost, inSilence, inAbort, inInterrupt:
			d.gone = d.gone || i == inGone // (the log says whether it came)
			d.st = dstDone
		}
		return nil
	}
	return nil
}

// dstRecover is what a restarted serve does with a copy whose record
// says it was in the middle of a migration (noteState, the note's State):
// a held copy stays held, in doubt, for the source's settle; a copy that
// ran on pages still coming has lost the daemon that brought them, and is
// dropped (the source holds its own whole and frozen, and settles to it).
func dstRecover(noteState string) act {
	switch noteState {
	case stateLazy:
		return dropCopy
	case stateHeld:
		return noteInDoubt
	}
	return -1 // in doubt already, or nothing to do
}

// The states a job's record names (job.MigrationNote.State).
const (
	stateFrozen    = "frozen"     // source: frozen (or given back by its guard), nothing committed
	stateCommitted = "committed"  // source: ended here; the start there unconfirmed
	stateServing   = "serving"    // source: frozen, serving the destination's pages
	stateInDoubt   = "in doubt"   // either side: frozen, the outcome unknown
	stateHeld      = "held"       // destination: held frozen for the source's word
	stateLazy      = job.NoteLazy // destination: runs on pages still coming
)
