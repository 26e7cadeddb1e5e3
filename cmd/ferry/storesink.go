package main

import (
	"context"

	"github.com/ferry-cr/ferry/dump"
	"github.com/ferry-cr/ferry/store"
)

// storeSink hands the snapshot store to dump, which knows only its
// SnapshotStore interface.
type storeSink struct{ st *store.Store }

func (s storeSink) Begin(ctx context.Context, job string) (dump.SnapshotWriter, error) {
	w, err := s.st.Begin(ctx, job)
	if err != nil {
		return nil, err
	}
	return storeWriter{w}, nil
}

type storeWriter struct{ *store.Writer }

func (w storeWriter) Commit(meta []byte) (any, int64, error) {
	snap, err := w.Writer.Commit(meta)
	return snap, snap.StoredBytes, err
}

// snapshotOf is the snapshot a store checkpoint added.
func snapshotOf(res *dump.Result) store.Snapshot {
	snap, _ := res.Snapshot.(store.Snapshot)
	return snap
}
