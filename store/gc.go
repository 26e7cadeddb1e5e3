package store

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"slices"
	"strings"
)

// repackLiveFraction: GC rewrites a pack whose live blobs take less than
// this fraction of its blob bytes, and deletes it. At one half, GC never
// writes more than it frees, and a store's packs are never more than about
// half dead after a GC.
const repackLiveFraction = 0.5

// GCReport says what a garbage collection found and did.
type GCReport struct {
	Snapshots     int   // snapshot records whose chunks were kept
	LiveBlobs     int64 // chunks and ref lists kept
	LiveBytes     int64 // their stored size
	MissingChunks int64 // referenced by a snapshot but not in the store (run Verify)
	PacksDeleted  int   // packs removed, including those repacked
	PacksRepacked int   // packs whose live blobs were copied out first
	PacksWritten  int   // packs written by repacking
	BlobsDeleted  int64
	BytesFreed    int64    // pack bytes deleted minus pack bytes written
	TempRemoved   int      // leftovers of interrupted writes
	TempBytes     int64    // their size
	SkippedPacks  []string // packs left alone: their index or a live blob is unreadable
}

// PruneReport says what Prune removed.
type PruneReport struct {
	Removed []Snapshot // oldest first
	Kept    int
	GC      GCReport
}

// Prune keeps the newest keep snapshots of job (of every job when job is
// ""), removes the others' records, then collects garbage. It holds the
// store's lock exclusive, waiting (bounded by ctx) until no snapshot is
// being added or read.
func (s *Store) Prune(ctx context.Context, job string, keep int) (PruneReport, error) {
	var rep PruneReport
	if keep < 0 {
		return rep, fmt.Errorf("keeping %d snapshots: must be 0 or more", keep)
	}
	if err := s.checkOpen(); err != nil {
		return rep, err
	}
	if job != "" {
		if err := CheckJobName(job); err != nil {
			return rep, err
		}
	}
	check, unlock, err := s.lock(ctx, true)
	if err != nil {
		return rep, err
	}
	defer func() { err = errors.Join(err, unlock()) }()
	snaps, err := s.Snapshots(ctx, job)
	if err != nil {
		return rep, err
	}
	byJob := make(map[string][]Snapshot)
	for _, sn := range snaps {
		byJob[sn.Job] = append(byJob[sn.Job], sn)
	}
	for _, list := range byJob {
		n := max(len(list)-keep, 0)
		for _, sn := range list[:n] {
			// Each record is gone for good (unlink, fsync) before GC
			// may delete its chunks: a record must never outlive them.
			if err := check(); err != nil {
				return rep, err
			}
			if err := s.be.Delete(ctx, recordName(sn.Job, sn.ID)); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return rep, fmt.Errorf("removing snapshot %q of job %q: %w", sn.ID, sn.Job, err)
			}
			rep.Removed = append(rep.Removed, sn)
		}
		rep.Kept += len(list) - n
	}
	slices.SortFunc(rep.Removed, func(a, b Snapshot) int { return a.Time.Compare(b.Time) })
	rep.GC, err = s.gc(ctx, check)
	return rep, err
}

// Delete removes one snapshot's record (id exactly; use Find for a
// prefix). Its chunks stay until the next GC.
func (s *Store) Delete(ctx context.Context, job, id string) (err error) {
	if err := s.checkOpen(); err != nil {
		return err
	}
	if err := CheckJobName(job); err != nil {
		return err
	}
	if checkComponent(id) != nil {
		return fmt.Errorf("snapshot %q of job %q: %w", id, job, ErrNoSnapshot)
	}
	check, unlock, err := s.lock(ctx, true)
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, unlock()) }()
	if err := check(); err != nil {
		return err
	}
	if err := s.be.Delete(ctx, recordName(job, id)); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("snapshot %q of job %q: %w", id, job, ErrNoSnapshot)
		}
		return err
	}
	return nil
}

// GC deletes the chunks no snapshot refers to. It holds the store's lock
// exclusive (waiting, bounded by ctx, for writers and readers to finish),
// so every chunk a writer relied on is in a committed snapshot by then.
// It removes leftovers of interrupted writes, deletes packs with no live
// blob, and rewrites packs that are mostly dead. If any snapshot's record
// or ref list cannot be read, GC deletes nothing: it cannot know what
// that snapshot needs.
func (s *Store) GC(ctx context.Context) (rep GCReport, err error) {
	if err := s.checkOpen(); err != nil {
		return rep, err
	}
	check, unlock, err := s.lock(ctx, true)
	if err != nil {
		return rep, err
	}
	defer func() { err = errors.Join(err, unlock()) }()
	return s.gc(ctx, check)
}

// gc collects garbage under the exclusive lock; check says whether that
// lock is still held and is asked before every delete.
func (s *Store) gc(ctx context.Context, check func() error) (GCReport, error) {
	var rep GCReport
	if err := s.refresh(ctx); err != nil {
		return rep, err
	}
	if tc, ok := s.be.(TempCleaner); ok {
		if err := check(); err != nil {
			return rep, err
		}
		n, size, err := tc.RemoveTemp(ctx)
		rep.TempRemoved, rep.TempBytes = n, size
		if err != nil {
			return rep, err
		}
	}
	live, err := s.mark(ctx, &rep)
	if err != nil {
		return rep, err
	}
	return rep, s.sweep(ctx, live, &rep, check)
}

// mark returns every digest a snapshot refers to: ref lists and the
// chunks they list.
func (s *Store) mark(ctx context.Context, rep *GCReport) (map[digest]struct{}, error) {
	objs, err := s.be.List(ctx, "snapshots/")
	if err != nil {
		return nil, err
	}
	live := make(map[digest]struct{})
	for _, o := range objs {
		if strings.Count(o.Name, "/") != 2 {
			continue
		}
		rec, err := s.readRecord(ctx, o.Name)
		if err != nil {
			return nil, fmt.Errorf("collecting garbage: snapshot record %q: %w (nothing was deleted; remove the snapshot or repair the store)", o.Name, err)
		}
		rep.Snapshots++
		for _, f := range rec.Files {
			if err := checkFileRecord(f); err != nil {
				return nil, fmt.Errorf("collecting garbage: snapshot record %q: %w: %w", o.Name, err, ErrCorrupt)
			}
			for _, l := range f.RefLists {
				d := digest(l)
				if _, seen := live[d]; seen {
					continue // an identical list (same file, same content) was marked
				}
				live[d] = struct{}{}
				raw, err := s.readBlob(ctx, d)
				if err != nil {
					return nil, fmt.Errorf("collecting garbage: ref list of %q in %q: %w (nothing was deleted)", f.Name, o.Name, err)
				}
				refs, err := decodeRefList(raw)
				if err != nil {
					return nil, fmt.Errorf("collecting garbage: ref list of %q in %q: %w: %w", f.Name, o.Name, err, ErrCorrupt)
				}
				for _, r := range refs {
					if r == zeroRef {
						continue
					}
					if _, seen := live[r]; seen {
						continue
					}
					live[r] = struct{}{}
					if _, ok := s.lookup(r); !ok {
						rep.MissingChunks++
					}
				}
			}
		}
		if err := ctx.Err(); err != nil {
			return nil, err
		}
	}
	return live, nil
}

// sweep deletes dead packs and repacks mostly dead ones. A blob is live
// when a snapshot refers to it and the index holds this copy: a second
// copy (two writers stored the same new chunk at once) is dead.
func (s *Store) sweep(ctx context.Context, live map[digest]struct{}, rep *GCReport, check func() error) error {
	s.mu.RLock()
	packs := make([]*packInfo, 0, len(s.packs))
	for _, p := range s.packs {
		packs = append(packs, p)
	}
	for name := range s.bad {
		rep.SkippedPacks = append(rep.SkippedPacks, name)
	}
	s.mu.RUnlock()
	slices.SortFunc(packs, func(a, b *packInfo) int { return strings.Compare(a.name, b.name) })

	type repack struct {
		p    *packInfo
		keep []packEntry
		all  []packEntry
	}
	var repacks []repack
	for _, p := range packs {
		if err := ctx.Err(); err != nil {
			return err
		}
		entries, err := s.loadPackIndex(ctx, p.name)
		if err != nil {
			s.log.Warn("store: gc skips a pack it cannot read", "pack", p.name, "err", err)
			rep.SkippedPacks = append(rep.SkippedPacks, p.name)
			continue
		}
		var keep []packEntry
		var liveBytes, blobBytes int64
		s.mu.RLock()
		for _, e := range entries {
			blobBytes += int64(e.stored)
			if _, ok := live[e.d]; !ok {
				continue
			}
			if l, ok := s.index[e.d]; ok && l.pack.name == p.name {
				keep = append(keep, e)
				liveBytes += int64(e.stored)
			}
		}
		s.mu.RUnlock()
		rep.LiveBlobs += int64(len(keep))
		rep.LiveBytes += liveBytes
		switch {
		case len(keep) == 0:
			if err := s.deletePack(ctx, p, entries, 0, rep, check); err != nil {
				return err
			}
		case float64(liveBytes) < repackLiveFraction*float64(blobBytes):
			repacks = append(repacks, repack{p: p, keep: keep, all: entries})
		}
	}
	if len(repacks) == 0 {
		return nil
	}

	// Copy the live blobs of every pack to repack into new packs, each
	// blob checked on the way (a bad one is not copied, and its pack is
	// kept). New packs are durable before any old one is deleted: a crash
	// in between leaves duplicates, which the next GC removes.
	var nb *packBuilder
	sealNew := func() error {
		if nb == nil {
			return nil
		}
		info, err := nb.seal()
		if err != nil {
			return fmt.Errorf("writing pack %q: %w", nb.name, err)
		}
		s.addPack(info, nb.entries, true)
		rep.PacksWritten++
		rep.BytesFreed -= info.size
		nb = nil
		return nil
	}
	abortNew := func() {
		if nb != nil {
			nb.ow.Abort()
		}
	}
	var done []repack
	var scratch []byte
	for _, r := range repacks {
		h, err := s.acquire(ctx, r.p.name)
		if err != nil {
			abortNew()
			return err
		}
		ok := true
		for _, e := range r.keep {
			stored := make([]byte, e.stored)
			if _, err := h.obj.ReadAt(stored, int64(e.off)); err != nil {
				ok = false
				s.log.Warn("store: gc cannot read a live chunk; its pack is kept", "pack", r.p.name, "offset", e.off, "err", err)
				break
			}
			if _, err := s.checkBlob(r.p.name, e, stored, scratch); err != nil {
				ok = false
				s.log.Warn("store: gc found a corrupt live chunk; its pack is kept (run verify)", "err", err)
				break
			}
			if nb == nil {
				if nb, err = s.newPackBuilder(ctx); err != nil {
					s.release(h)
					return err
				}
			}
			if err := nb.add(e.d, stored, int(e.raw), e.codec); err != nil {
				s.release(h)
				abortNew()
				return fmt.Errorf("writing pack %q: %w", nb.name, err)
			}
			if int64(nb.off) >= s.opts.PackSize {
				if err := sealNew(); err != nil {
					s.release(h)
					return err
				}
			}
		}
		s.release(h)
		if !ok {
			rep.SkippedPacks = append(rep.SkippedPacks, r.p.name)
			continue
		}
		done = append(done, r)
	}
	if err := sealNew(); err != nil {
		return err
	}
	for _, r := range done {
		if err := s.deletePack(ctx, r.p, r.all, len(r.keep), rep, check); err != nil {
			return err
		}
		rep.PacksRepacked++
	}
	return nil
}

// deletePack deletes a pack and forgets the blobs the index placed in it.
// moved blobs were copied to a new pack first.
func (s *Store) deletePack(ctx context.Context, p *packInfo, entries []packEntry, moved int, rep *GCReport, check func() error) error {
	if err := check(); err != nil {
		return err
	}
	if err := s.be.Delete(ctx, p.name); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	s.mu.Lock()
	for _, e := range entries {
		if l, ok := s.index[e.d]; ok && l.pack.name == p.name {
			delete(s.index, e.d)
		}
	}
	delete(s.packs, p.name)
	s.mu.Unlock()
	s.dropHandle(p.name)
	rep.PacksDeleted++
	rep.BlobsDeleted += int64(len(entries) - moved)
	rep.BytesFreed += p.size
	return nil
}
