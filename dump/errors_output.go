package dump

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// ErrOutputLost means the checkpoint could not be written whole where it
// was sent, or not made durable there: a reader that quit (EPIPE), a full
// disk (ENOSPC), a failing write or fsync. The job was not ended for it:
// a checkpoint that is not whole must not cost the job.
var ErrOutputLost = errors.New("the checkpoint could not be written whole")

// OutputError is a write or sync of the checkpoint's output that failed:
// Output says where ("standard output" or a path).
type OutputError struct {
	Output string
	Err    error
}

func (e *OutputError) Error() string {
	return fmt.Sprintf("%s to %s: %v", ErrOutputLost, e.Output, e.Err)
}

// Unwrap gives both ErrOutputLost and the cause (syscall.EPIPE, ENOSPC...).
func (e *OutputError) Unwrap() []error { return []error{ErrOutputLost, e.Err} }

// outputName is how errors name out.
func outputName(out string) string {
	if out == "-" {
		return "standard output"
	}
	return out
}

// IsDevNull says whether f is the null device. The Go runtime opens
// /dev/null on any of the descriptors 0-2 that a program starts with
// closed, so a checkpoint sent to a closed standard output would vanish
// there unnoticed, and the job with it.
func IsDevNull(f *os.File) bool {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return false
	}
	if st.Mode&unix.S_IFMT != unix.S_IFCHR {
		return false
	}
	if st.Rdev == unix.Mkdev(1, 3) {
		return true
	}
	var null unix.Stat_t
	return unix.Stat("/dev/null", &null) == nil && null.Mode&unix.S_IFMT == unix.S_IFCHR && null.Rdev == st.Rdev
}

// syncIfFile makes w durable when it is a regular file (standard output
// redirected to one): a pipe or socket has nothing to sync, and once its
// reader has every byte nothing more can be promised.
func syncIfFile(w any) error {
	f, ok := w.(*os.File)
	if !ok {
		return nil
	}
	fi, err := f.Stat()
	if err != nil || !fi.Mode().IsRegular() {
		return nil
	}
	return f.Sync()
}
