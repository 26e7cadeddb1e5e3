package store

import (
	"context"
	"io"
)

// Backend is where a store keeps its objects. Everything above it (chunking,
// dedup, the index, GC, verify) is backend-neutral; the interface is small
// enough for an object store: in the S3 backend, Create is a multipart
// upload whose Commit completes it, Open does range GETs, List is a
// prefix listing, Delete is a DELETE.
//
// Object names are slash-separated keys such as "config",
// "packs/3f/3f9a…" and "snapshots/JOB/ID". Objects are immutable: the store
// never overwrites one, it only creates and deletes.
type Backend interface {
	// Create starts a new object. Nothing is visible under name until
	// Commit returns nil; Commit fails if name exists already.
	Create(ctx context.Context, name string) (ObjectWriter, error)
	// Open opens a committed object for random reads. A missing object
	// is an error matching fs.ErrNotExist.
	Open(ctx context.Context, name string) (Object, error)
	// List returns the committed objects whose names begin with prefix,
	// sorted by name.
	List(ctx context.Context, prefix string) ([]ObjectInfo, error)
	// Delete removes an object; it is gone for good (durably) when
	// Delete returns. A missing object is an error matching
	// fs.ErrNotExist.
	Delete(ctx context.Context, name string) error
}

// ObjectWriter writes one new object.
type ObjectWriter interface {
	io.Writer
	// Commit makes the object durable and visible under its name, in
	// one atomic step.
	Commit() error
	// Abort discards what was written. It is safe after Commit (then it
	// does nothing) and may be called more than once.
	Abort() error
}

// Object is a committed object open for reading.
type Object interface {
	io.ReaderAt
	Size() int64
	Close() error
}

// ObjectInfo names a committed object.
type ObjectInfo struct {
	Name string
	Size int64
}

// Locker is the store-wide lock. Adding a snapshot and reading one hold
// it shared; garbage collection holds it exclusive, so it never runs while
// a writer may still refer to a chunk no committed snapshot holds yet.
// Locking stays a backend concern: the directory backend uses flock(2);
// the S3 backend leases (s3lock.go, doc.go), which also implement
// LeaseLocker.
type Locker interface {
	// Lock waits until the lock is granted or ctx ends; the error then
	// matches ErrBusy and ctx.Err(). unlock releases it.
	Lock(ctx context.Context, exclusive bool) (unlock func() error, err error)
}

// TempCleaner is implemented by backends that keep in-progress objects
// somewhere (a tmp directory, multipart uploads). GC calls it while it
// holds the exclusive lock, when no writer can be running.
type TempCleaner interface {
	RemoveTemp(ctx context.Context) (objects int, bytes int64, err error)
}
