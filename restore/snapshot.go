package restore

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/ferry-cr/ferry/internal/checkpoint"
	"github.com/ferry-cr/ferry/internal/job"
	"github.com/ferry-cr/ferry/internal/scratch"
	"github.com/ferry-cr/ferry/store"
)

// FromSnapshot restores snapshot snap of store st as a job of s. The
// snapshot is rebuilt into a scratch directory (tmpfs when there is room:
// every chunk is checked against its hash on the way) and restored from
// there like a directory checkpoint; the directory goes once CRIU is done
// with it. opts.Checkpoint is ignored. A job that took periodic snapshots
// (ferry run --checkpoint-every) carries on taking them into the same
// store unless opts.Snapshots says otherwise: a requeued batch job keeps
// its policy without being given it again.
func FromSnapshot(ctx context.Context, s *job.Registry, st *store.Store, snap store.Snapshot, opts Options) (*job.Record, error) {
	r, err := st.OpenSnapshot(ctx, snap)
	if err != nil {
		return nil, err
	}
	defer r.Close()
	dir, err := scratch.Dir(scratchFor(r), "snapshot")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	var total int64
	for _, name := range r.Names() {
		total += r.Size(name)
	}
	opts.Progress.SetTotal(total)
	for _, name := range r.Names() {
		if err := extract(r, dir, name, opts); err != nil {
			return nil, fmt.Errorf("reading %s@%s from the store: %w", snap.Job, snap.ID, err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, checkpoint.ManifestFile), r.Meta(), 0o600); err != nil {
		return nil, err
	}
	if opts.Snapshots == nil && opts.StoreDir != "" {
		m, err := checkpoint.LoadManifest(dir)
		if err != nil {
			return nil, err
		}
		if p := m.Periodic; p != nil && p.Every > 0 {
			opts.Snapshots = &job.SnapshotPolicy{Store: opts.StoreDir, Every: p.Every, Keep: p.Keep}
		}
	}
	opts.Checkpoint = dir
	return Job(ctx, s, opts)
}

// shmDir is the tmpfs where a snapshot is rebuilt when there is room.
const shmDir = "/dev/shm"

// ScratchBases are the directories a restore with Options.ServeDir
// serveDir makes scratch space in (package scratch), named after the
// ferry process that owns it: what a killed restore left there is for the
// next ferry command to sweep.
func ScratchBases(serveDir string) []string {
	return []string{shmDir, os.TempDir(), shortServeDir, serveDir}
}

// scratchFor picks where a snapshot is rebuilt: /dev/shm when it has
// room for it twice over, else the system's temporary directory. Either
// way the directory is scratch space (package scratch), so what a killed
// restore leaves is swept by the next ferry command.
func scratchFor(r *store.Reader) string {
	var need int64
	for _, name := range r.Names() {
		need += r.Size(name)
	}
	var sf unix.Statfs_t
	if unix.Statfs(shmDir, &sf) == nil && int64(sf.Bavail)*int64(sf.Bsize) > 2*need+64<<20 {
		return shmDir
	}
	return os.TempDir()
}

func extract(r *store.Reader, dir, name string, opts Options) error {
	if name != filepath.Base(name) || name == checkpoint.ManifestFile {
		return fmt.Errorf("the snapshot holds a file named %q", name)
	}
	src, err := r.Open(name)
	if err != nil {
		return err
	}
	defer src.Close()
	f, err := os.OpenFile(filepath.Join(dir, name), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(opts.Progress.Writer(f), src); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
