package job

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferry-cr/ferry/freezer"
	"github.com/ferry-cr/ferry/internal/cgroup"
	"github.com/ferry-cr/ferry/internal/lease"
	"github.com/ferry-cr/ferry/internal/proc"
)

// LeasePath is the socket where job name's shim guards its leases: a
// ferry command that stops the job (checkpoint, migrate, snapshot,
// freeze, thaw) takes the lease there first (see package lease).
func (s *Registry) LeasePath(name string) string {
	return filepath.Join(s.Dir(name), lease.SocketName)
}

// guardLeases has the shim guard the leases of its job until ctx ends:
// whoever stops the job and dies, or goes silent, before it commits has
// the job given back as it was.
func guardLeases(ctx context.Context, s *Registry, rec *Record, initPID int, log *slog.Logger) {
	g := &guarded{s: s, name: rec.Name, cgroup: rec.Cgroup, foreign: rec.Foreign, initPID: initPID, log: log}
	path := s.LeasePath(rec.Name)
	if err := lease.NewGuard(g, log).Listen(ctx, path); err != nil {
		log.Error("guarding the job's leases", "err", err)
		return
	}
	context.AfterFunc(ctx, func() { _ = os.Remove(path) })
}

// guarded is a job as its lease guard sees it.
type guarded struct {
	s       *Registry
	name    string
	cgroup  string
	foreign bool
	initPID int
	log     *slog.Logger
	stopped []int        // a foreign tree's tasks stopped when the lease was taken
	tracers map[int]bool // processes tracing the job's tasks then
}

func (g *guarded) Frozen() (bool, error) {
	cg, err := cgroup.Open(g.cgroup)
	if err != nil {
		return false, err
	}
	pids, _ := cg.Procs()
	g.tracers = proc.Tracers(pids)
	if g.foreign {
		// CRIU seizes a foreign tree's tasks and leaves them stopped;
		// giving it back continues those the lease found running.
		g.stopped = g.stopped[:0]
		pids, _ := cg.Procs()
		for _, pid := range pids {
			if st, err := proc.ReadStat(pid); err == nil && (st.State == 'T' || st.State == 't') {
				g.stopped = append(g.stopped, pid)
			}
		}
	}
	st, err := cg.State()
	if err != nil {
		return false, err
	}
	return st == freezer.Frozen || st == freezer.Freezing, nil
}

// GiveBack waits (a minute at most) for a CRIU that outlived the lease's
// holder to let go of the job (CRIU thaws a cgroup it found frozen once it
// has seized the tasks, and freezes it again when it lets them go), then
// puts the job back as it was.
func (g *guarded) IsFrozen() (bool, error) {
	cg, err := cgroup.Open(g.cgroup)
	if err != nil {
		return false, err
	}
	st, err := cg.State()
	return st == freezer.Frozen || st == freezer.Freezing, err
}

func (g *guarded) GiveBack(ctx context.Context, wasFrozen bool) error {
	cg, err := cgroup.Open(g.cgroup)
	if err != nil {
		return err
	}
	pids, _ := cg.Procs()
	criu := proc.Tracers(pids)
	for t := range g.tracers {
		delete(criu, t)
	}
	if len(criu) > 0 && !proc.WaitGone(criu, time.Minute) {
		g.log.Warn("a tracer of the job's tasks is still there after a minute; giving the job back anyway")
	}
	if wasFrozen {
		return cg.Freeze(ctx)
	}
	if g.foreign {
		pids, _ := cg.Procs()
		for _, pid := range pids {
			if pid != g.initPID && !slices.Contains(g.stopped, pid) {
				_ = unix.Kill(pid, unix.SIGCONT)
			}
		}
	}
	return cg.Thaw(ctx)
}

func (g *guarded) End(ctx context.Context, reason string) error {
	rec, err := g.s.Load(g.name)
	if err != nil || rec.InitPID != g.initPID || !rec.InitAlive() {
		return nil // ended already, or the record moved on
	}
	return g.s.EndAs(ctx, g.name, reason, g.log)
}

func (g *guarded) Note(op, kept string) {
	_, err := g.s.UpdateLive(g.name, func(r *Record) error {
		if r.InitPID != g.initPID || r.Status == Exited {
			return errStale // moved on, or ended: nothing is under way
		}
		r.Operation = op
		if kept != "" {
			r.Operation = kept
		}
		return nil
	})
	if err != nil {
		g.log.Warn("recording the operation under way", "op", op, "err", err)
	}
}
