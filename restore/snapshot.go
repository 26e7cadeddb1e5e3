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
)

// FromSnapshot restores snapshot snap of store st as a job of s. The
// snapshot is rebuilt into a scratch directory (tmpfs when there is room:
// every chunk is checked against its hash on the way) and restored from
// there like a directory checkpoint; the directory goes once CRIU is done
// with it. opts.Checkpoint is ignored. A job that took periodic snapshots
// (ferry run --checkpoint-every) carries on taking them into the same
// store unless opts.Snapshots says otherwise: a requeued batch job keeps
// its policy without being given it again.
//
// The snapshot comes through the Snapshot interface: restore does not
// know the snapshot store (package store), whose reader the caller opens.
func FromSnapshot(ctx context.Context, s *job.Registry, r Snapshot, opts Options) (*job.Record, error) {
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
			return nil, fmt.Errorf("reading %s from the store: %w", r, err)
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
		if p := m.Periodic; p != nil && p.EveryNs > 0 {
			opts.Snapshots = &job.SnapshotPolicy{Store: opts.StoreDir, Every: checkpoint.Every(p), Keep: int(p.Keep)}
		}
	}
	opts.Checkpoint = dir
	return Job(ctx, s, opts)
}

// Snapshot is one snapshot of a store, open for reading: its files, each
// checked against its hashes as it is read, and its meta (the
// checkpoint's manifest). The snapshot store's reader is one; String
// names the snapshot (JOB@ID).
type Snapshot interface {
	Names() []string
	Size(name string) int64
	Open(name string) (io.ReadCloser, error)
	Meta() []byte
	Close() error
	String() string
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
func scratchFor(r Snapshot) string {
	var need int64
	for _, name := range r.Names() {
		need += r.Size(name)
	}
	if free, _ := shmRoom(shmDir); free > 2*need+64<<20 {
		return shmDir
	}
	return os.TempDir()
}

// shmRoom says how many bytes the file system of dir has free, and
// whether it is a tmpfs (0 and false when it cannot say).
func shmRoom(dir string) (free int64, tmpfs bool) {
	var sf unix.Statfs_t
	if unix.Statfs(dir, &sf) != nil {
		return 0, false
	}
	return int64(sf.Bavail) * int64(sf.Bsize), sf.Type == unix.TMPFS_MAGIC
}

func extract(r Snapshot, dir, name string, opts Options) error {
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
