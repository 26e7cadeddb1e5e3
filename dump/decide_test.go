package dump

import (
	"errors"
	"testing"
)

// TestDecide is the checkpoint's decision as a table: what was asked and
// what the tree and host are, against the method.
func TestDecide(t *testing.T) {
	yes, no := func() bool { return true }, func() bool { return false }
	job := request{cgroup: true, criuStreams: yes, tmpfsRoom: true}
	with := func(r request, f func(*request)) request { f(&r); return r }
	for _, tc := range []struct {
		name string
		req  request
		want method
	}{
		{"directory", job,
			method{sink: sinkDir, stop: stopFirst, leaves: leavesAsFound}},
		{"directory, leave running: criu freezes, only as long as it needs", with(job, func(r *request) { r.leaveRunning = true }),
			method{sink: sinkDir, stop: stopByCRIU, leaves: leavesAsFound}},
		{".ferry file, streamed by criu", with(job, func(r *request) { r.stream = true }),
			method{sink: sinkStreamed, stop: stopFirst, leaves: leavesAsFound}},
		{"stdout, streamed", with(job, func(r *request) { r.stream, r.toPipe = true, true }),
			method{sink: sinkStreamed, toPipe: true, stop: stopFirst, leaves: leavesAsFound}},
		{".ferry file, leave running: streamed (compressed while criu dumps), frozen until read", with(job, func(r *request) { r.stream, r.leaveRunning = true, true }),
			method{sink: sinkStreamed, stop: stopFirst, leaves: leavesAsFound}},
		{"stdout, leave running, tmpfs has room: spooled, then packed (a slow reader would keep it stopped)", with(job, func(r *request) { r.stream, r.toPipe, r.leaveRunning = true, true, true }),
			method{sink: sinkPacked, toPipe: true, stop: stopByCRIU, leaves: leavesAsFound}},
		{"stdout, leave running, no room in tmpfs: streamed", with(job, func(r *request) { r.stream, r.toPipe, r.leaveRunning, r.tmpfsRoom = true, true, true, false }),
			method{sink: sinkStreamed, toPipe: true, stop: stopFirst, leaves: leavesAsFound}},
		{".ferry file, leave running, criu without --stream: spooled, then packed", with(job, func(r *request) { r.stream, r.leaveRunning, r.criuStreams = true, true, no }),
			method{sink: sinkPacked, stop: stopByCRIU, leaves: leavesAsFound}},
		{".ferry file, leave running, no room in tmpfs: streamed, frozen throughout", with(job, func(r *request) { r.stream, r.leaveRunning, r.tmpfsRoom = true, true, false }),
			method{sink: sinkStreamed, stop: stopFirst, leaves: leavesAsFound}},
		{".ferry file, criu without --stream: packed", with(job, func(r *request) { r.stream, r.criuStreams = true, no }),
			method{sink: sinkPacked, stop: stopFirst, leaves: leavesAsFound}},
		{"store snapshot", with(job, func(r *request) { r.store, r.leaveRunning = true, true }),
			method{sink: sinkStore, toPipe: true, stop: stopByCRIU, leaves: leavesAsFound}},
		{"store snapshot, no room in tmpfs: streamed into the store, frozen throughout", with(job, func(r *request) { r.store, r.leaveRunning, r.tmpfsRoom = true, true, false }),
			method{sink: sinkStoreStreamed, toPipe: true, stop: stopFirst, leaves: leavesAsFound}},
		{"store snapshot, no room in tmpfs, criu without --stream: spooled", with(job, func(r *request) { r.store, r.leaveRunning, r.tmpfsRoom, r.criuStreams = true, true, false, no }),
			method{sink: sinkStore, toPipe: true, stop: stopByCRIU, leaves: leavesAsFound}},
		{"stop-copy migration: gated, late freeze, pages last", with(job, func(r *request) { r.stream, r.toPipe, r.handover, r.pagesLast = true, true, true, true }),
			method{sink: sinkStreamed, toPipe: true, stop: stopLate, leaves: leavesDead, gated: true, holdPages: true, warm: true}},
		{"stop-copy migration of a foreign job (criu in its namespaces)", with(job, func(r *request) { r.stream, r.toPipe, r.handover, r.wrapped, r.cgroup = true, true, true, true, false }),
			method{sink: sinkStreamed, toPipe: true, stop: stopByCRIU, leaves: leavesStopped}},
		{"post-copy migration: lazy, late freeze", with(job, func(r *request) { r.stream, r.toPipe, r.handover, r.postCopy = true, true, true, true }),
			method{sink: sinkLazy, toPipe: true, stop: stopLate, leaves: leavesAsFound, warm: true}},
		{"keeping TCP connections, .ferry file: gated, criu ends the tree with them locked", with(job, func(r *request) { r.stream, r.tcpEstablished = true, true }),
			method{sink: sinkStreamed, stop: stopFirst, leaves: leavesDead, gated: true}},
		{"keeping TCP connections, directory: gated through criu's notification", with(job, func(r *request) { r.tcpEstablished = true }),
			method{sink: sinkDir, stop: stopFirst, leaves: leavesDead, gated: true}},
		{"keeping TCP connections, leave running: not gated", with(job, func(r *request) { r.tcpEstablished, r.leaveRunning = true, true }),
			method{sink: sinkDir, stop: stopByCRIU, leaves: leavesAsFound}},
		{"--pid tree without a cgroup: criu seizes and leaves it stopped", request{criuStreams: yes, tmpfsRoom: true},
			method{sink: sinkDir, stop: stopByCRIU, leaves: leavesStopped}},
		{"--pid tree without a cgroup, leave running", request{leaveRunning: true, criuStreams: yes, tmpfsRoom: true},
			method{sink: sinkDir, stop: stopByCRIU, leaves: leavesRunning}},
		{"--pid tree streamed, leave running, no room: stopped until its images are read", request{stream: true, leaveRunning: true, criuStreams: yes},
			method{sink: sinkStreamed, stop: stopByCRIU, leaves: leavesStopped}},
		{"--pid tree streamed, leave running: stopped until its images are read", request{stream: true, leaveRunning: true, criuStreams: yes, tmpfsRoom: true},
			method{sink: sinkStreamed, stop: stopByCRIU, leaves: leavesStopped}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := decide(tc.req)
			if err != nil {
				t.Fatal(err)
			}
			if got.sink.streamed() && tc.req.criuStreams == nil {
				t.Fatal("streamed without asking CRIU")
			}
			if got != tc.want {
				t.Fatalf("decide(%+v)\n got %+v\nwant %+v", tc.req, got, tc.want)
			}
		})
	}
}

func TestDecideRefusesPostCopy(t *testing.T) {
	ok := request{cgroup: true, stream: true, toPipe: true, postCopy: true, handover: true}
	if _, err := decide(ok); err != nil {
		t.Fatalf("post-copy of a job to a pipe: %v", err)
	}
	for name, f := range map[string]func(*request){
		"no cgroup":     func(r *request) { r.cgroup = false },
		"leave running": func(r *request) { r.leaveRunning = true },
		"not a stream":  func(r *request) { r.stream = false },
		"to a file":     func(r *request) { r.toPipe = false },
	} {
		r := ok
		f(&r)
		if _, err := decide(r); !errors.Is(err, ErrNoPostCopy) {
			t.Errorf("%s: %v, want ErrNoPostCopy", name, err)
		}
	}
}
