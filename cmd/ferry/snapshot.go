package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/ferry-cr/ferry/dump"
	"github.com/ferry-cr/ferry/internal/criu"
	"github.com/ferry-cr/ferry/internal/job"
	"github.com/ferry-cr/ferry/restore"
	"github.com/ferry-cr/ferry/store"
)

// The snapshot store's commands: snapshots, prune, and the --store forms
// of checkpoint, restore, verify and run.

var storeFlag = &cli.StringFlag{Name: "store", Usage: "snapshot store: a `DIR`, or s3://BUCKET/PREFIX (default: ROOT/store)"}

var (
	checkpointEveryFlag = &cli.DurationFlag{Name: "checkpoint-every", Usage: "add a snapshot to the store every `D` (e.g. 30m; 0: none)"}
	keepFlag            = &cli.IntFlag{Name: "keep", Usage: "with --checkpoint-every: keep the newest `N` snapshots of the job"}
)

// periodicPolicy is --checkpoint-every D [--keep N]: nil when neither is
// given, a policy with Every 0 for an explicit --checkpoint-every 0.
func periodicPolicy(c *cli.Context, s *job.Registry, verb string) (*job.SnapshotPolicy, error) {
	if !c.IsSet("checkpoint-every") && !c.IsSet("keep") {
		return nil, nil
	}
	d := c.Duration("checkpoint-every")
	if d == 0 && !c.IsSet("keep") {
		return &job.SnapshotPolicy{}, nil
	}
	if d < time.Second {
		return nil, usageError{fmt.Errorf("%s: --checkpoint-every must be at least 1s (and --keep needs it)", verb)}
	}
	dir, err := storeDir(c, s)
	if err != nil {
		return nil, err
	}
	return &job.SnapshotPolicy{Store: dir, Every: d, Keep: c.Int("keep")}, nil
}

// storeDir is --store, or the store beside the job records. An S3 URL
// (s3://BUCKET/PREFIX) passes unchanged; a directory is made absolute,
// since job records and the shim's periodic snapshots keep it.
func storeDir(c *cli.Context, s *job.Registry) (string, error) {
	dir := c.String("store")
	if store.IsS3URL(dir) {
		return strings.TrimRight(dir, "/"), nil
	}
	if dir == "" {
		dir = filepath.Join(s.Root, "store")
	}
	return filepath.Abs(dir)
}

// openStore opens the snapshot store --store names; create makes it when
// it does not exist yet (only what adds snapshots may).
func openStore(c *cli.Context, s *job.Registry, create bool) (*store.Store, string, error) {
	dir, err := storeDir(c, s)
	if err != nil {
		return nil, "", err
	}
	st, err := store.Open(c.Context, dir, store.Options{Logger: slog.Default(), NoCreate: !create})
	if err != nil {
		return nil, "", withCode(fmt.Errorf("opening snapshot store %s: %w", dir, err), exitStore)
	}
	return st, dir, nil
}

var snapshotsCommand = &cli.Command{
	Name:      "snapshots",
	Usage:     "list the snapshots in a store",
	ArgsUsage: "[JOB]",
	Flags:     []cli.Flag{storeFlag, &cli.BoolFlag{Name: "json", Usage: "print as JSON"}},
	Action: func(c *cli.Context) error {
		if c.NArg() > 1 {
			return usageError{errors.New("snapshots: at most one JOB")}
		}
		s, err := registry(c)
		if err != nil {
			return err
		}
		st, _, err := openStore(c, s, false)
		if err != nil {
			return err
		}
		defer st.Close()
		snaps, err := st.Snapshots(c.Context, c.Args().First())
		if err != nil {
			return withCode(err, exitStore)
		}
		if c.Bool("json") {
			if snaps == nil {
				snaps = []store.Snapshot{}
			}
			return writeJSON(c, snaps)
		}
		tw := tabwriter.NewWriter(c.App.Writer, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "JOB\tSNAPSHOT\tTIME\tSIZE\tNEW\tSTORED")
		for _, sn := range snaps {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", sn.Job, sn.ID, sn.Time.Local().Format(time.DateTime),
				humanBytes(sn.RawBytes), humanBytes(sn.NewBytes), humanBytes(sn.StoredBytes))
		}
		return tw.Flush()
	},
}

var pruneCommand = &cli.Command{
	Name:      "prune",
	Usage:     "keep the newest snapshots of each job and free what no snapshot needs",
	ArgsUsage: "[JOB]",
	Description: `Removes all but the newest --keep snapshots of JOB (of every job when none
is given), then collects garbage: chunks no remaining snapshot refers to
are deleted. It waits for snapshots being added to finish (the store's
lock), so it is safe beside a running "ferry checkpoint --store".`,
	Flags: []cli.Flag{storeFlag,
		&cli.IntFlag{Name: "keep", Required: true, Usage: "snapshots to keep per job"},
		&cli.BoolFlag{Name: "json", Usage: "print the report as JSON"},
	},
	Action: func(c *cli.Context) error {
		if c.NArg() > 1 {
			return usageError{errors.New("prune: at most one JOB")}
		}
		s, err := registry(c)
		if err != nil {
			return err
		}
		st, dir, err := openStore(c, s, false)
		if err != nil {
			return err
		}
		defer st.Close()
		rep, err := st.Prune(c.Context, c.Args().First(), c.Int("keep"))
		if err != nil {
			return withCode(err, exitStore)
		}
		if c.Bool("json") {
			return writeJSON(c, rep)
		}
		fmt.Fprintf(c.App.Writer, "pruned %s: %d snapshots removed, %d kept; %s freed\n",
			dir, len(rep.Removed), rep.Kept, humanBytes(rep.GC.BytesFreed))
		return nil
	},
}

// verifyStore is `ferry verify --store DIR`.
func verifyStore(c *cli.Context) error {
	s, err := registry(c)
	if err != nil {
		return err
	}
	st, dir, err := openStore(c, s, false)
	if err != nil {
		return err
	}
	defer st.Close()
	rep, err := st.Verify(c.Context)
	if err != nil {
		return withCode(err, exitStore)
	}
	if !rep.OK() {
		for _, p := range rep.Problems {
			fmt.Fprintf(c.App.ErrWriter, "%s\n", p)
		}
		more := ""
		if rep.MoreProblems > 0 {
			more = fmt.Sprintf(" (and %d more)", rep.MoreProblems)
		}
		return withCode(fmt.Errorf("%s: %d problems%s: %w", dir, len(rep.Problems), more, store.ErrCorrupt), exitBadCheckpoint)
	}
	fmt.Fprintf(c.App.Writer, "%s: ok, %d snapshots, %d packs, %d chunks (%s stored, %s raw) all match\n",
		dir, rep.Snapshots, rep.Packs, rep.Blobs, humanBytes(rep.StoredBytes), humanBytes(rep.RawBytes))
	return nil
}

// snapshotJob adds a snapshot of job name to st: the job runs on unless
// end, in which case it is ended once the snapshot is durable.
func snapshotJob(ctx context.Context, c *cli.Context, s *job.Registry, st *store.Store, name string, end bool) (*dump.Result, error) {
	bin, err := criuFor(ctx, c)
	if err != nil {
		return nil, err
	}
	meter, err := newMeter(c, "checkpoint")
	if err != nil {
		return nil, err
	}
	res, err := dump.Job(ctx, s, name, dump.Options{
		Progress:       meter,
		Criu:           bin,
		Store:          storeSink{st},
		LeaveRunning:   !end,
		TCPEstablished: c.Bool("tcp-established"),
		FileLocks:      c.Bool("file-locks"),
		ExtUnixSk:      c.Bool("ext-unix-sk"),
		FerryVersion:   versionString(),
		Logger:         slog.Default(),
		LogDir:         filepath.Join(s.Root, "logs"),
		CgroupRoot:     c.String("cgroup-root"),
		CriuLogLevel:   criuLogLevel(c),
	})
	meter.Done(err)
	if err != nil {
		return nil, withCode(err, exitCheckpoint)
	}
	return res, nil
}

// criuFor is findCriu under ctx (a final snapshot runs after the
// command's own context has ended).
func criuFor(ctx context.Context, c *cli.Context) (*criu.Binary, error) {
	return criu.Find(ctx, criu.FindOptions{
		Flag:            c.String("criu"),
		Env:             os.Getenv("FERRY_CRIU"),
		ProvisionedDirs: criu.DefaultProvisionedPaths(),
	})
}

func printSnapshot(c *cli.Context, res *dump.Result, dir string) {
	sn := snapshotOf(res)
	state := "still running"
	if res.JobEnded {
		state = "ended"
	}
	fmt.Fprintf(c.App.Writer, "snapshot %s@%s in %s: %d processes, %s memory; %s raw, %s new, %s stored; frozen %s, total %s; job %s\n",
		sn.Job, sn.ID, dir, res.Processes, humanBytes(res.Memory), humanBytes(sn.RawBytes), humanBytes(sn.NewBytes),
		humanBytes(sn.StoredBytes), res.Frozen.Round(time.Millisecond), res.Total.Round(time.Millisecond), state)
}

// checkpointToStore is `ferry checkpoint JOB --store DIR [--keep N]`.
func checkpointToStore(c *cli.Context, s *job.Registry, name string) error {
	st, dir, err := openStore(c, s, true)
	if err != nil {
		return err
	}
	defer st.Close()
	keep := keepFor(c, s, name, dir)
	res, err := snapshotJob(c.Context, c, s, st, name, !c.Bool("leave-running") && c.IsSet("leave-running"))
	if err != nil {
		return err
	}
	// Pruned before anything is printed: a reader of our output that is
	// gone (a shim that ended with its job) must not cost the policy.
	perr := pruneAfter(c, st, name, keep)
	if c.Bool("json") {
		if err := writeJSON(c, res); err != nil {
			return err
		}
	} else {
		printSnapshot(c, res, dir)
	}
	return perr
}

// keepFor is how many snapshots of job name the store in dir keeps after
// a snapshot: --keep when given, else the job's own periodic policy for
// that store (run --keep, or carried on by restore --store); 0 keeps all.
func keepFor(c *cli.Context, s *job.Registry, name, dir string) int {
	if c.IsSet("keep") {
		return c.Int("keep")
	}
	rec, err := s.Load(name)
	if err != nil || rec.Snapshots == nil || filepath.Clean(rec.Snapshots.Store) != filepath.Clean(dir) {
		return 0
	}
	return rec.Snapshots.Keep
}

// pruneAfter applies keep (0: none) to job name's snapshots once a
// snapshot has committed. It runs to the end even if ferry was meanwhile
// interrupted: the snapshot is taken, and the policy holds after every
// one; the store's lock bounds it to the snapshots being added.
func pruneAfter(c *cli.Context, st *store.Store, name string, keep int) error {
	if keep <= 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(c.Context), 5*time.Minute)
	defer cancel()
	if _, err := st.Prune(ctx, name, keep); err != nil {
		return withCode(fmt.Errorf("snapshot taken, but pruning: %w", err), exitStore)
	}
	return nil
}

// checkpointAll is `ferry checkpoint --all --store DIR`: every running job
// gets a snapshot and is ended once it is durable (a reboot comes next);
// its record remembers the snapshot for `ferry restore --all`. A job whose
// snapshot fails keeps running.
func checkpointAll(c *cli.Context) error {
	return forAllJobs(c, "checkpoint --all", exitCheckpoint, true,
		func(s *job.Registry, rec *job.Record, _ string) bool {
			v := s.Inspect(rec)
			return v.State == "running" || v.State == "frozen"
		},
		func(s *job.Registry, st *store.Store, dir string, rec *job.Record) error {
			keep := keepFor(c, s, rec.Name, dir)
			res, err := snapshotJob(c.Context, c, s, st, rec.Name, true)
			if err != nil {
				return fmt.Errorf("%w (it keeps running)", err)
			}
			if err := pruneAfter(c, st, rec.Name, keep); err != nil {
				fmt.Fprintf(c.App.ErrWriter, "ferry: %s: %v\n", rec.Name, err)
			}
			if _, err := s.Update(rec.Name, func(r *job.Record) error {
				r.Resume = &job.ResumePoint{Store: dir, Snapshot: snapshotOf(res).ID}
				return nil
			}); err != nil {
				return fmt.Errorf("snapshot %s taken, but recording it for restore --all: %w", snapshotOf(res).ID, err)
			}
			printSnapshot(c, res, dir)
			return nil
		})
}

// forAllJobs runs do on every job of the store that pick selects, with
// the snapshot store open; a job that fails is reported on stderr and the
// others go on. verb and code make the error when any failed.
func forAllJobs(c *cli.Context, verb string, code int, create bool,
	pick func(s *job.Registry, rec *job.Record, dir string) bool,
	do func(s *job.Registry, st *store.Store, dir string, rec *job.Record) error) error {
	if err := requireRoot(); err != nil {
		return err
	}
	s, err := registry(c)
	if err != nil {
		return err
	}
	st, dir, err := openStore(c, s, create)
	if !create && errors.Is(err, store.ErrNoStore) {
		// restore --all at boot on a host that never took a snapshot.
		fmt.Fprintf(c.App.ErrWriter, "ferry: %s: no snapshot store, nothing to do\n", verb)
		return nil
	}
	if err != nil {
		return err
	}
	defer st.Close()
	recs, err := s.List()
	if err != nil {
		return err
	}
	var failed []string
	n := 0
	for _, rec := range recs {
		if !pick(s, rec, dir) {
			continue
		}
		n++
		if err := do(s, st, dir, rec); err != nil {
			fmt.Fprintf(c.App.ErrWriter, "ferry: %s: %v\n", rec.Name, err)
			failed = append(failed, rec.Name)
		}
	}
	if len(failed) > 0 {
		return withCode(fmt.Errorf("%s: %d of %d jobs failed: %s", verb, len(failed), n, strings.Join(failed, ", ")), code)
	}
	return nil
}

// restoreFromStore is `ferry restore --store DIR JOB[@SNAPSHOT]`.
func restoreFromStore(c *cli.Context) error {
	if err := exactArgs(c, 1, "JOB[@SNAPSHOT]"); err != nil {
		return err
	}
	if err := requireRoot(); err != nil {
		return err
	}
	s, err := registry(c)
	if err != nil {
		return err
	}
	if _, err := periodicPolicy(c, s, "restore"); err != nil {
		return err // a bad --checkpoint-every before anything is read
	}
	st, dir, err := openStore(c, s, false)
	if err != nil {
		return err
	}
	defer st.Close()
	jobName, id, _ := strings.Cut(c.Args().First(), "@")
	var snap store.Snapshot
	if id == "" {
		snap, err = st.Latest(c.Context, jobName)
	} else {
		snap, err = st.Find(c.Context, jobName, id)
	}
	if err != nil {
		return withCode(err, exitNoSnapshot)
	}
	rec, err := restoreSnapshot(c, s, st, dir, snap, c.String("name"))
	if err != nil {
		return err
	}
	fmt.Fprintln(c.App.Writer, rec.Name)
	if c.Bool("checkpoint-on-term") {
		return waitOrSnapshot(c, s, st, rec.Name)
	}
	return nil
}

// restoreSnapshot restores snap of st (in dir) as job name. The restored
// job carries on the periodic snapshots it took, into dir, unless
// --checkpoint-every says otherwise.
func restoreSnapshot(c *cli.Context, s *job.Registry, st *store.Store, dir string, snap store.Snapshot, name string) (*job.Record, error) {
	policy, err := periodicPolicy(c, s, "restore")
	if err != nil {
		return nil, err
	}
	bin, err := findCriu(c)
	if err != nil {
		return nil, err
	}
	meter, err := newMeter(c, "restore")
	if err != nil {
		return nil, err
	}
	meter.SetPhase("restoring")
	r, err := st.OpenSnapshot(c.Context, snap)
	if err != nil {
		meter.Done(err)
		return nil, withCode(fmt.Errorf("restoring %s@%s: %w", snap.Job, snap.ID, err), exitRestore)
	}
	rec, err := restore.FromSnapshot(c.Context, s, r, restore.Options{
		Progress:   meter,
		Criu:       bin,
		ServeDir:   filepath.Join(s.Root, "serve"),
		Name:       name,
		CgroupRoot: c.String("cgroup-root"),
		Logger:     slog.Default(),
		Snapshots:  policy,
		StoreDir:   dir,
	})
	meter.Done(err)
	if err != nil {
		return nil, withCode(fmt.Errorf("restoring %s@%s: %w", snap.Job, snap.ID, err), exitRestore)
	}
	return rec, nil
}

// restoreAll is `ferry restore --all --store DIR`: every job that
// `checkpoint --all` ended into this store comes back from its snapshot.
// A job that already runs again is left alone, so running it twice is
// harmless.
func restoreAll(c *cli.Context) error {
	if c.NArg() != 0 {
		return usageError{errors.New("restore --all takes no CHECKPOINT")}
	}
	return forAllJobs(c, "restore --all", exitRestore, false,
		func(_ *job.Registry, rec *job.Record, dir string) bool {
			return rec.Resume != nil && rec.Resume.Store == dir && rec.Status == job.Exited && !rec.InitAlive()
		},
		func(s *job.Registry, st *store.Store, dir string, rec *job.Record) error {
			snap, err := st.Find(c.Context, rec.Name, rec.Resume.Snapshot)
			if err == nil {
				_, err = restoreSnapshot(c, s, st, dir, snap, rec.Name)
			}
			if err != nil {
				return err
			}
			fmt.Fprintf(c.App.Writer, "restored %s from %s@%s\n", rec.Name, snap.Job, snap.ID)
			return nil
		})
}

// waitOrSnapshot stays with job name until it exits (returning its exit
// status) or this ferry is sent SIGTERM or SIGINT (what a batch scheduler
// sends before preemption or at the time limit): then it takes a final
// snapshot into st, ends the job once the snapshot is durable, and exits
// with exitSnapshotted, so a batch script knows to requeue, and the
// requeued job resumes with `ferry restore --store`.
func waitOrSnapshot(c *cli.Context, s *job.Registry, st *store.Store, name string) error {
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-c.Context.Done():
			ctx, cancel := context.WithTimeout(context.WithoutCancel(c.Context), 10*time.Minute)
			defer cancel()
			dir, _ := storeDir(c, s)
			keep := keepFor(c, s, name, dir)
			res, err := snapshotJob(ctx, c, s, st, name, true)
			if err != nil {
				return fmt.Errorf("final snapshot on termination: %w", err)
			}
			// The final snapshot is one like any other: the job's --keep
			// holds after it too.
			if err := pruneAfter(c, st, name, keep); err != nil {
				fmt.Fprintf(c.App.ErrWriter, "ferry: %v\n", err)
			}
			printSnapshot(c, res, dir)
			return cli.Exit("", exitSnapshotted)
		case <-tick.C:
			rec, err := s.Load(name)
			if err != nil {
				return err
			}
			if rec.Status == job.Exited && !rec.InitAlive() {
				if rec.Exit != nil && rec.Exit.Code != 0 {
					return cli.Exit("", rec.Exit.Code)
				}
				return nil
			}
		}
	}
}
