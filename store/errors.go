package store

import (
	"errors"
	"fmt"
)

// Errors callers tell apart with errors.Is; a CLI maps each to an exit
// status.
var (
	// ErrNoSnapshot: no snapshot matches the job and id asked for.
	ErrNoSnapshot = errors.New("no such snapshot")
	// ErrAmbiguous: an id prefix matches more than one snapshot.
	ErrAmbiguous = errors.New("snapshot id prefix is ambiguous")
	// ErrBusy: the store's lock was not granted before the context ended
	// (a garbage collection holds it, or snapshots are being added).
	ErrBusy = errors.New("store is busy")
	// ErrCorrupt: a pack, a blob or a record fails its checks, or a
	// snapshot refers to a chunk the store does not hold.
	ErrCorrupt = errors.New("store is corrupt")
	// ErrBadName: a job or file name is not a valid file name component.
	ErrBadName = errors.New("invalid name")
	// ErrNotStore: the directory exists and holds something else.
	ErrNotStore = errors.New("not a ferry snapshot store")
	// ErrNoStore: Options.NoCreate, and there is no store to open.
	ErrNoStore = errors.New("no snapshot store there")
	// ErrUnsupportedVersion: the store, a pack or a record was written by
	// a newer ferry.
	ErrUnsupportedVersion = errors.New("unsupported store format version")
	// ErrTooLarge: a length exceeds its named limit.
	ErrTooLarge = errors.New("length exceeds its limit")
	// ErrClosed: the Writer, Reader or Store was already closed.
	ErrClosed = errors.New("already closed")
	// ErrUnavailable: the store's server refused the credentials, the
	// bucket does not exist, or the server cannot be reached.
	ErrUnavailable = errors.New("snapshot store unavailable")
	// ErrExists: a file name was created twice in one snapshot.
	ErrExists = errors.New("already exists")
)

// NameError ties ErrBadName (or ErrExists) to the name it is about.
type NameError struct {
	Kind string // "job" or "file"
	Name string
	Err  error
}

// Error implements error.
func (e *NameError) Error() string { return fmt.Sprintf("%s name %q: %s", e.Kind, e.Name, e.Err) }

// Unwrap lets errors.Is find ErrBadName or ErrExists.
func (e *NameError) Unwrap() error { return e.Err }

// CorruptError locates a failed check; it matches ErrCorrupt.
type CorruptError struct {
	Object string // backend name of the pack or record, when known
	Offset int64  // of the blob in the pack, -1 when not about a blob
	Digest string // hex digest of the chunk, when about one
	Reason string
	Err    error // underlying cause, if any
}

// Error implements error.
func (e *CorruptError) Error() string {
	s := "corrupt"
	if e.Object != "" {
		s += fmt.Sprintf(" %q", e.Object)
	}
	if e.Offset >= 0 {
		s += fmt.Sprintf(" at offset %d", e.Offset)
	}
	if e.Digest != "" {
		s += fmt.Sprintf(" (chunk %s)", e.Digest)
	}
	s += ": " + e.Reason
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	return s
}

// Unwrap lets errors.Is find ErrCorrupt and the cause.
func (e *CorruptError) Unwrap() []error {
	if e.Err != nil {
		return []error{ErrCorrupt, e.Err}
	}
	return []error{ErrCorrupt}
}

func corrupt(object string, offset int64, d digest, reason string, err error) *CorruptError {
	ce := &CorruptError{Object: object, Offset: offset, Reason: reason, Err: err}
	if d != (digest{}) {
		ce.Digest = d.String()
	}
	return ce
}

// UnavailableError says in one line why a remote store cannot be used; it
// matches ErrUnavailable.
type UnavailableError struct{ Reason string }

// Error implements error.
func (e *UnavailableError) Error() string { return e.Reason }

// Is lets errors.Is find ErrUnavailable.
func (e *UnavailableError) Is(target error) bool { return target == ErrUnavailable }
