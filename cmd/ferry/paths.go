package main

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/ferry-cr/ferry/dump"
	"github.com/ferry-cr/ferry/internal/checkpoint"
)

// probeOutput makes sure a file can be created beside out before the job
// is touched: a directory that exists but takes no new files (/proc, a
// read-only mount) is a bad output (17), not a failed checkpoint.
// dump's own check covers a missing directory or a file in its place.
func probeOutput(out string) error {
	if out == "-" {
		return nil
	}
	dir := filepath.Dir(out)
	if st, err := os.Stat(dir); err != nil || !st.IsDir() {
		return nil
	}
	f, err := os.CreateTemp(dir, ".ferry-probe-")
	if err != nil {
		var pe *fs.PathError
		if errors.As(err, &pe) {
			err = pe.Err
		}
		return fmt.Errorf("%w: no file can be created in %q: %v", dump.ErrBadOutput, dir, err)
	}
	name := f.Name()
	f.Close()
	return os.Remove(name)
}

// checkRestoreSource refuses, as not a checkpoint (14), a path that can
// be neither a checkpoint file nor a directory nor a pipe to read one
// from: a device such as /dev/zero, a socket.
func checkRestoreSource(path string) error {
	if path == "-" {
		return nil
	}
	st, err := os.Stat(path)
	if err != nil {
		return nil // restore says what is missing
	}
	switch m := st.Mode(); {
	case m.IsRegular(), m.IsDir(), m&fs.ModeNamedPipe != 0:
		return nil
	}
	return fmt.Errorf("%q: %w: it is a %s, not a .ferry file or a checkpoint directory (use - for standard input)", path, checkpoint.ErrNotCheckpoint, kindOf(st.Mode()))
}

func kindOf(m fs.FileMode) string {
	switch {
	case m&fs.ModeCharDevice != 0:
		return "character device"
	case m&fs.ModeDevice != 0:
		return "block device"
	case m&fs.ModeSocket != 0:
		return "socket"
	}
	return "special file"
}
