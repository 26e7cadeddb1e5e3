package store

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
)

// maxProblems bounds the problems a VerifyReport lists (a broken pack
// under many snapshots could otherwise produce millions); the rest are
// counted in MoreProblems.
const maxProblems = 1000

// verifyRun is how much of a pack Verify reads at once.
const verifyRun = 4 << 20

// Problem is one failed check.
type Problem struct {
	Object string // the pack or snapshot record concerned
	Offset int64  // of the blob in the pack; -1 when not about one
	Digest string // the chunk or ref list concerned, when one is
	Job    string // for problems of a snapshot
	ID     string
	File   string
	Err    error
}

// String formats the problem for a person: what, where, why.
func (p Problem) String() string {
	if p.Job != "" {
		if p.File != "" {
			return fmt.Sprintf("snapshot %s/%s: file %q: %s", p.Job, p.ID, p.File, p.Err)
		}
		return fmt.Sprintf("snapshot %s/%s: %s", p.Job, p.ID, p.Err)
	}
	var ce *CorruptError
	if errors.As(p.Err, &ce) && ce.Object == p.Object {
		return p.Err.Error() // names the object, offset and chunk already
	}
	return fmt.Sprintf("%s: %s", p.Object, p.Err)
}

// VerifyReport says what Verify checked and found.
type VerifyReport struct {
	Packs        int
	Blobs        int64 // chunks and ref lists decompressed and rehashed
	StoredBytes  int64 // pack bytes read
	RawBytes     int64 // bytes after decompression
	Snapshots    int
	Refs         int64 // chunk references resolved
	Problems     []Problem
	MoreProblems int // problems found beyond the listed ones
}

// OK reports whether Verify found nothing wrong.
func (r *VerifyReport) OK() bool { return len(r.Problems) == 0 }

type verifier struct {
	mu  sync.Mutex
	rep *VerifyReport
	bad map[digest]string // digest -> pack whose copy is bad
}

func (v *verifier) add(p Problem) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if len(v.rep.Problems) >= maxProblems {
		v.rep.MoreProblems++
		return
	}
	v.rep.Problems = append(v.rep.Problems, p)
}

// Verify checks the whole store: every pack's header, index and
// checksum; every blob decompresses and hashes to its digest; every
// snapshot record reads; and every reference of every snapshot resolves
// to a good blob of the right length. It holds the lock shared (GC cannot
// run; snapshots may be added meanwhile and are checked if listed in
// time). The error matches ErrCorrupt when the report lists problems.
func (s *Store) Verify(ctx context.Context) (rep VerifyReport, err error) {
	if err := s.checkOpen(); err != nil {
		return rep, err
	}
	unlock, err := s.lk.Lock(ctx, false)
	if err != nil {
		return rep, err
	}
	defer func() { err = errors.Join(err, unlock()) }()
	// Records first, then the index: every pack a listed record needs
	// was committed before the record, so the index has it even when
	// another process is adding snapshots meanwhile.
	records, err := s.be.List(ctx, "snapshots/")
	if err != nil {
		return rep, err
	}
	if err := s.refresh(ctx); err != nil {
		return rep, err
	}
	v := &verifier{rep: &rep, bad: make(map[digest]string)}
	if err := s.verifyPacks(ctx, v); err != nil {
		return rep, err
	}
	if err := s.verifySnapshots(ctx, v, records); err != nil {
		return rep, err
	}
	if n := len(rep.Problems) + rep.MoreProblems; n > 0 {
		return rep, fmt.Errorf("verifying store: %d problems: %w", n, ErrCorrupt)
	}
	return rep, nil
}

// verifyPacks checks every pack, Workers at a time.
func (s *Store) verifyPacks(ctx context.Context, v *verifier) error {
	objs, err := s.be.List(ctx, "packs/")
	if err != nil {
		return err
	}
	v.rep.Packs = len(objs)
	work := make(chan string)
	var wg sync.WaitGroup
	for range s.opts.Workers {
		wg.Go(func() {
			for name := range work {
				s.verifyPack(ctx, name, v)
			}
		})
	}
	for _, o := range objs {
		if ctx.Err() != nil {
			break
		}
		work <- o.Name
	}
	close(work)
	wg.Wait()
	return ctx.Err()
}

func (s *Store) verifyPack(ctx context.Context, name string, v *verifier) {
	packProblem := func(err error) {
		p := Problem{Object: name, Offset: -1, Err: err}
		var ce *CorruptError
		if errors.As(err, &ce) {
			p.Offset, p.Digest = ce.Offset, ce.Digest
		}
		v.add(p)
	}
	obj, err := s.be.Open(ctx, name)
	if err != nil {
		packProblem(err)
		return
	}
	defer obj.Close()
	entries, err := readPackIndex(obj, name)
	if err != nil {
		packProblem(err)
		return
	}
	var buf, scratch []byte
	var blobs, storedBytes, rawBytes int64
	for i := 0; i < len(entries); {
		if ctx.Err() != nil {
			return
		}
		// Read a run of consecutive blobs at once.
		start := entries[i].off
		j := i
		for j < len(entries) && entries[j].off+entries[j].stored-start <= verifyRun {
			j++
		}
		j = max(j, i+1)
		end := entries[j-1].off + entries[j-1].stored
		if cap(buf) < int(end-start) {
			buf = make([]byte, end-start)
		}
		buf = buf[:end-start]
		if _, err := obj.ReadAt(buf, int64(start)); err != nil {
			packProblem(corrupt(name, int64(start), zeroRef, "reading blobs", err))
			return
		}
		for _, e := range entries[i:j] {
			raw, err := s.checkBlob(name, e, buf[e.off-start:e.off-start+e.stored], scratch)
			if err != nil {
				packProblem(err)
				v.mu.Lock()
				v.bad[e.d] = name
				v.mu.Unlock()
				continue
			}
			if e.codec != codecNone {
				scratch = raw[:0]
			}
			blobs++
			storedBytes += int64(e.stored)
			rawBytes += int64(e.raw)
		}
		i = j
	}
	v.mu.Lock()
	v.rep.Blobs += blobs
	v.rep.StoredBytes += storedBytes
	v.rep.RawBytes += rawBytes
	v.mu.Unlock()
}

// resolve checks that the index holds a good copy of d with raw bytes
// (0: any length).
func (s *Store) resolve(v *verifier, d digest, raw int) error {
	l, ok := s.lookup(d)
	if !ok {
		return corrupt("", -1, d, "not in the store", nil)
	}
	v.mu.Lock()
	badIn, bad := v.bad[d]
	v.mu.Unlock()
	if bad && badIn == l.pack.name {
		return corrupt(l.pack.name, int64(l.off), d, "its blob is corrupt", nil)
	}
	if raw > 0 && int(l.raw) != raw {
		return corrupt(l.pack.name, int64(l.off), d, fmt.Sprintf("%d bytes, want %d", l.raw, raw), nil)
	}
	return nil
}

func (s *Store) verifySnapshots(ctx context.Context, v *verifier, records []ObjectInfo) error {
	for _, o := range records {
		if err := ctx.Err(); err != nil {
			return err
		}
		parts := strings.Split(o.Name, "/")
		if len(parts) != 3 {
			v.add(Problem{Object: o.Name, Offset: -1, Err: fmt.Errorf("stray object: %w", ErrCorrupt)})
			continue
		}
		rec, err := s.readRecord(ctx, o.Name)
		if err != nil {
			v.add(Problem{Object: o.Name, Offset: -1, Job: parts[1], ID: parts[2], Err: err})
			continue
		}
		v.rep.Snapshots++
		for _, f := range rec.Files {
			p := Problem{Object: o.Name, Offset: -1, Job: rec.Job, ID: rec.Id, File: f.Name}
			if err := checkFileRecord(f); err != nil {
				p.Err = fmt.Errorf("%w: %w", err, ErrCorrupt)
				v.add(p)
				continue
			}
			if err := s.verifyFile(ctx, v, p, f.ChunkSize, f.Size, f.RefLists); err != nil {
				p.Err = err
				v.add(p)
			}
		}
	}
	return nil
}

// verifyFile resolves every reference of one file; the first missing or
// bad chunk of each ref list is reported (with its index in the file),
// the ones after it are counted in the same problem.
func (s *Store) verifyFile(ctx context.Context, v *verifier, p Problem, chunkSize uint32, size uint64, lists [][]byte) error {
	cs := uint64(chunkSize)
	total := (size + cs - 1) / cs
	var idx uint64
	for _, l := range lists {
		d := digest(l)
		if err := s.resolve(v, d, 0); err != nil {
			return fmt.Errorf("ref list for chunks from %d: %w", idx, err)
		}
		raw, err := s.readBlob(ctx, d)
		if err != nil {
			return fmt.Errorf("ref list for chunks from %d: %w", idx, err)
		}
		refs, err := decodeRefList(raw)
		if err != nil {
			return corrupt("", -1, d, fmt.Sprintf("ref list for chunks from %d", idx), err)
		}
		var first error
		var nbad int
		for _, r := range refs {
			want := int(cs)
			if idx == total-1 {
				want = int(size - idx*cs)
			}
			if idx >= total {
				return corrupt("", -1, d, fmt.Sprintf("ref lists hold more than the file's %d chunks", total), nil)
			}
			if r != zeroRef {
				v.mu.Lock()
				v.rep.Refs++
				v.mu.Unlock()
				if err := s.resolve(v, r, want); err != nil {
					if first == nil {
						first = fmt.Errorf("chunk %d (bytes %d-%d): %w", idx, idx*cs, idx*cs+uint64(want)-1, err)
					}
					nbad++
				}
			}
			idx++
		}
		if first != nil {
			if nbad > 1 {
				first = fmt.Errorf("%w (and %d more bad chunks in this ref list)", first, nbad-1)
			}
			q := p
			q.Err = first
			v.add(q)
		}
	}
	if idx != total {
		return corrupt("", -1, zeroRef, fmt.Sprintf("ref lists hold %d of the file's %d chunks", idx, total), nil)
	}
	return nil
}
