package job

import (
	"errors"
	"fmt"
)

// Errors callers tell apart with errors.Is.
var (
	ErrNotFound        = errors.New("no such job")
	ErrExists          = errors.New("job name already in use")
	ErrInvalidName     = errors.New("invalid job name (use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit)")
	ErrCommandNotFound = errors.New("command not found")
	ErrNotRunning      = errors.New("job is not running")
	ErrStart           = errors.New("job did not start")
	// ErrOwnerGone is the cause of a restore the shim gave up because
	// the ferry that asked for it died first (see RestoreRequest).
	ErrOwnerGone = errors.New("the ferry that asked for this restore is gone")
)

// NameError ties one of the errors above to the job name it is about.
type NameError struct {
	Name string
	Err  error
}

func (e *NameError) Error() string { return fmt.Sprintf("job %q: %s", e.Name, e.Err) }

func (e *NameError) Unwrap() error { return e.Err }
