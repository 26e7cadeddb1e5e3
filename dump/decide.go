package dump

// This file is the checkpoint's one decision: from what was asked
// (Options), what the tree is (a job with a cgroup or not) and what the
// host can do, how the checkpoint is made. It is pure, so that every
// combination is a row of a table test (decide_test.go); the stages that
// carry the method out (stop.go, sink.go, capture.go) read it and decide
// nothing of their own.

// sinkKind is where the checkpoint goes.
type sinkKind int

const (
	// sinkDir: CRIU writes a directory beside the output, which is
	// fsynced and renamed into place (--format dir).
	sinkDir sinkKind = iota
	// sinkPacked: CRIU writes a scratch directory, which ferry packs into
	// one image stream (a .ferry file, or standard output) afterwards.
	sinkPacked
	// sinkStreamed: CRIU streams its images straight into ferry's image
	// stream (criu dump --stream); nothing lands in scratch space.
	sinkStreamed
	// sinkLazy: a post-copy migration: the stream starts before CRIU
	// runs and carries every image but the private memory, which CRIU
	// serves to the destination afterwards.
	sinkLazy
	// sinkStore: CRIU writes scratch space, whose images the snapshot
	// store takes in (keeping only the chunks it lacks).
	sinkStore
	// sinkStoreStreamed: CRIU streams its images straight into the
	// snapshot store, for a job whose images tmpfs has no room for: the
	// job stands still while the store takes them in (streamed images
	// must not change while they drain), but nothing is spooled to disk.
	sinkStoreStreamed
)

// streamed says whether CRIU streams its images into the sink (criu dump
// --stream) rather than writing scratch space.
func (k sinkKind) streamed() bool { return k == sinkStreamed || k == sinkStoreStreamed }

func (k sinkKind) String() string {
	return [...]string{"directory", "packed stream", "streamed", "lazy stream", "store", "streamed store"}[k]
}

// stopKind is how the tree is held still.
type stopKind int

const (
	// stopFirst: ferry freezes the job's cgroup before CRIU starts;
	// CRIU finds it frozen and leaves it so.
	stopFirst stopKind = iota
	// stopLate: ferry freezes the cgroup in CRIU's pre-dump action, once
	// CRIU has started: a migration's CRIU start-up is then no downtime.
	stopLate
	// stopByCRIU: CRIU stops the tree itself, freezing the cgroup it is
	// given (and thawing it when done), or seizing the tasks with ptrace
	// where there is no cgroup to freeze.
	stopByCRIU
)

func (k stopKind) String() string {
	return [...]string{"freeze first", "freeze late", "criu stops"}[k]
}

// criuLeaves is how CRIU leaves the tree when its dump succeeds.
type criuLeaves int

const (
	// leavesAsFound: the cgroup as CRIU found it (frozen by ferry, or
	// thawed); CRIU's --leave-running with --freeze-cgroup.
	leavesAsFound criuLeaves = iota
	// leavesRunning: CRIU resumes the tree (--leave-running).
	leavesRunning
	// leavesStopped: CRIU leaves every task SIGSTOPped (--leave-stopped).
	leavesStopped
	// leavesDead: CRIU ends the tree itself, after the post-dump action
	// approved (a stop-copy handover).
	leavesDead
)

// method is how one checkpoint is made.
type method struct {
	sink   sinkKind
	toPipe bool // the output is standard output (or a migration's connection)
	stop   stopKind
	leaves criuLeaves
	// gated: the handover runs inside CRIU's post-dump action, so CRIU
	// ends the tree with its TCP connections still locked.
	gated bool
	// holdPages: CRIU's pages files are held in pipes and sent last
	// (gated only).
	holdPages bool
	// warm: the stream is written while the job is frozen (a migration):
	// ready its buffers and encoder before the freeze.
	warm bool
}

// request is what decide reads: the options that matter, the tree and
// the host.
type request struct {
	toPipe, stream, store, leaveRunning, postCopy, handover, pagesLast bool
	tcpEstablished                                                     bool // the plan keeps established TCP connections

	cgroup  bool // the tree is exactly a cgroup that can be frozen (v1 or v2)
	wrapped bool // CRIU runs in the job's namespaces (nsenter), not ferry's

	// criuStreams says whether CRIU has --stream; asked only where the
	// answer matters (it runs CRIU).
	criuStreams func() bool
	tmpfsRoom   bool // tmpfs has room for the tree's images
}

// decide chooses the method for r, or says why none fits.
func decide(r request) (method, error) {
	m := method{toPipe: r.toPipe || r.store}
	if r.postCopy && (!r.cgroup || r.leaveRunning || !r.stream || !r.toPipe || r.store) {
		return m, ErrNoPostCopy
	}
	stream := r.stream || r.store
	// A stream is streamed by CRIU with --leave-running too: the tree
	// stays stopped until ferry has read every image out of CRIU's pipes
	// (CRIU gifts the tree's pages to them without copying: they must not
	// change before), and runs again while ferry ends and syncs the file
	// (capture). Compression then overlaps CRIU's dump on every core, in
	// bounded memory, where spooling to tmpfs first wrote and read the
	// whole dump once more and compressed only after it (measured here:
	// a third of the CPU, half the wall time, for a longer stop). A
	// snapshot still spools when tmpfs has room: the store hashes every
	// chunk (SHA-256 names them), which the job would wait out stopped.
	// So does standard output (a pipe to ssh, say) when tmpfs has room:
	// the tree would stay stopped for as long as the reader takes, where
	// a file goes at the pace of this host's page cache.
	spool := r.leaveRunning && r.toPipe && r.tmpfsRoom
	switch {
	case r.store && !r.tmpfsRoom && r.criuStreams != nil && r.criuStreams():
		m.sink = sinkStoreStreamed
	case r.store:
		m.sink = sinkStore
	case r.postCopy:
		m.sink = sinkLazy
	case stream && !spool && r.criuStreams != nil && r.criuStreams():
		m.sink = sinkStreamed
	case stream:
		m.sink = sinkPacked
	default:
		m.sink = sinkDir
	}
	// A streamed handover (stop-copy migration) waits for the verdict in
	// CRIU's post-dump action, so that CRIU itself ends the tree while its
	// TCP connections are locked and in repair mode: peers see no FIN or
	// RST. The action's socket is reached only from ferry's namespaces.
	// Under cgroup v1 too: CRIU thaws a v1 freezer once it has seized the
	// tasks (they wait in ptrace stops, where SIGKILL reaches them), and
	// re-freezes it only when it gives the tree back
	// (TestCheckpointKeepsTCPConnection/v1).
	//
	// A checkpoint that keeps TCP connections (--tcp-established, and the
	// job ended) is gated too, for the same reason: ending the tree after
	// CRIU unlocked its connections would send each peer a FIN, and the
	// restored connection would be dead. CRIU alone leaves them locked.
	canGate := !r.leaveRunning && r.cgroup && !r.wrapped
	migrating := r.handover && m.sink == sinkStreamed
	m.gated = canGate && (migrating || r.tcpEstablished && (m.sink == sinkStreamed || m.sink == sinkDir))
	m.holdPages = m.gated && r.pagesLast
	m.warm = m.gated && migrating || r.postCopy
	switch {
	case (m.gated && migrating || r.postCopy) && !r.wrapped:
		// The pre-dump action's script reaches ferry through files in
		// ferry's mount namespace, so CRIU must run there.
		m.stop = stopLate
	case r.cgroup && (!r.leaveRunning || m.sink.streamed()):
		m.stop = stopFirst
	default:
		m.stop = stopByCRIU
	}
	switch {
	case m.gated:
		m.leaves = leavesDead
	case r.cgroup:
		m.leaves = leavesAsFound
	case r.leaveRunning && !m.sink.streamed():
		m.leaves = leavesRunning // images are in files: the tree may run on at once
	default:
		m.leaves = leavesStopped
	}
	return m, nil
}
