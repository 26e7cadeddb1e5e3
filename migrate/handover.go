package migrate

// The handover, in one place: the states each side of a migration passes
// through, the messages that move it from one to the next, and what each
// side does with its copy of the job if the migration ends there, whether
// the link is lost, the peer aborts, or this process dies (then the job's
// lease guard acts for it: see package lease). handover_test.go explores
// every crash point and every lost message of both modes against these
// rules and checks that the job never runs twice and is never lost.
//
//	source (stop-copy)                      destination
//	srcFrozen ── stream, DataEnd ─────────► dstReceiving (restores, held frozen)
//	srcFrozen ◄──────────────── Restored ── dstHeld
//	srcCommitted (lease committed End; CRIU ends the tree)
//	srcCommitted ── Gone ─────────────────► dstHeld ─► thaw ─► dstRunning
//	srcDone ◄─────────────────── Running ── dstRunning
//
//	source (post-copy)                      destination
//	srcFrozen ── stream (no memory) ──────► dstReceiving
//	srcFrozen ◄──────────────── Restored ── dstHeld
//	srcServing (lease committed Keep) ─ Commit ─► dstLazy (runs; faults pages in)
//	srcServing ◄── pages over the page link ──► dstLazy
//	srcServing ◄──────────────── Complete ── dstRunning
//	srcDone (lease committed End) ── Gone ─► dstRunning
//
// A source before its commit (srcFrozen) gives the job back and tells the
// destination, which drops its copy. A source that committed never runs
// its copy again: if it cannot hear the end, the migration is in doubt,
// and the operator settles it with the command its record names.

// srcState is where the source's side of a migration stands.
type srcState int

const (
	// srcRunning: nothing of the job is stopped yet (offer, Prepared).
	srcRunning srcState = iota
	// srcFrozen: the job is frozen here and its stream on the way or
	// sent; the destination may hold a frozen copy (Restored), but this
	// side has not committed.
	srcFrozen
	// srcCommitted (stop-copy): the lease is committed End; this copy is
	// ended, the destination's held copy is the job.
	srcCommitted
	// srcServing (post-copy): Commit sent: the destination may run its
	// copy, which reads its memory from here; the lease holds Keep.
	srcServing
	// srcDone: the destination runs the job and this copy is ended.
	srcDone
)

// srcVerdict is what the source does with its copy.
type srcVerdict int

const (
	giveBack    srcVerdict = iota // the job runs on here; the destination is told to drop its copy
	endHere                       // this copy ends (the destination's is the job)
	keepInDoubt                   // this copy stays as it is (ended, or frozen); the record says how to settle
)

// The source's rule for its copy is carried out where its lease is
// committed (package dump, stop.go): nothing is committed before the
// destination holds a copy, so a source that stops there gives the job
// back (or, dying, its guard does); End is committed at the stop-copy
// gate, and Keep before post-copy's Commit, so that a source that cannot
// hear the end keeps its copy as it is, in doubt. handover_test.go models
// both sides' rules, this one included, and explores them.

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
	// dstRunning: the copy runs, whole.
	dstRunning
)

// dstVerdict is what the destination does with its copy.
type dstVerdict int

const (
	drop     dstVerdict = iota // kill the copy (never thawed)
	keepHeld                   // keep it frozen, in doubt; the record says how to settle
	run                        // the copy is the job
)

// dstOnLost is the destination's rule when the migration ends in state s
// without the source's word (link lost, silence, or the source's Abort
// when aborted is set).
func dstOnLost(s dstState, aborted bool) dstVerdict {
	switch s {
	case dstReceiving:
		return drop
	case dstHeld:
		if aborted {
			return drop // the source resumed its copy
		}
		return keepHeld // the source may have ended its copy
	case dstLazy:
		return drop // its memory cannot come any more
	}
	return run
}
