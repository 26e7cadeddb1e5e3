package criu

import (
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// A lazy dump serves pages out of pipes that CRIU grows to 4 MiB; past
// fs.pipe-max-size that needs CAP_SYS_RESOURCE, which some machines
// withhold even from root (CRIU then fails with "page-pipe: tee:
// Operation not permitted"). RaisePipeMax lifts the limit for as long as
// a lazy dump runs and puts the old value back after the last one. Streams
// served to a restore take it too, to 16 MiB (StreamPipeSize).

// LazyPipeSize is the pipe size a lazy dump needs.
const LazyPipeSize = 4 << 20

var (
	pipeMaxPath  = "/proc/sys/fs/pipe-max-size"
	pipeMaxState = "/run/ferry-pipe-max-size" // the value to put back; held shared by each raiser
	pipeMaxLock  = "/run/ferry-pipe-max-size.lock"
)

// RaisePipeMax makes fs.pipe-max-size at least n until release is
// called. Concurrent ferries share the raise: each holds a shared lock on
// the state file for as long as it needs the raise, and whoever releases
// last (its exclusive lock succeeds) restores the value saved by the
// first. Raising and releasing each hold a second lock, for moments only:
// a raiser never waits for another's dump to end (an exclusive lock taken
// on the state file itself waited for every shared holder: a second
// post-copy migration out of a host waited for the first one's whole
// transfer, 55 s in a chaos run).
func RaisePipeMax(n int) (release func(), err error) {
	unlock, err := lockFile(pipeMaxLock, unix.LOCK_EX)
	if err != nil {
		return nil, err
	}
	defer unlock()
	f, err := os.OpenFile(pipeMaxState, os.O_RDWR|os.O_CREATE|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, err
	}
	fd := int(f.Fd())
	// Shared holders only, and no raise or release under way (both hold
	// the lock above): this does not wait.
	if err := unix.Flock(fd, unix.LOCK_SH); err != nil {
		f.Close()
		return nil, err
	}
	cur, err := readInt(pipeMaxPath)
	if err != nil {
		f.Close()
		return nil, err
	}
	if cur < n {
		saved, _ := readInt(pipeMaxState)
		if saved == 0 {
			if err := os.WriteFile(pipeMaxState, []byte(strconv.Itoa(cur)+"\n"), 0o600); err != nil {
				f.Close()
				return nil, err
			}
		}
		if err := os.WriteFile(pipeMaxPath, []byte(strconv.Itoa(n)), 0o644); err != nil {
			f.Close()
			return nil, fmt.Errorf("raising fs.pipe-max-size to %d for lazy pages: %w", n, err)
		}
	}
	return func() {
		defer f.Close()
		unlock, err := lockFile(pipeMaxLock, unix.LOCK_EX)
		if err != nil {
			return
		}
		defer unlock()
		// No raiser can take a shared lock meanwhile: this succeeds only
		// if ours is the last.
		if unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB) != nil {
			return // another lazy dump still needs it
		}
		if saved, err := readInt(pipeMaxState); err == nil && saved > 0 {
			if os.WriteFile(pipeMaxPath, []byte(strconv.Itoa(saved)), 0o644) == nil {
				_ = f.Truncate(0)
			}
		}
	}, nil
}

// lockFile takes how (a flock operation) on path, made if missing, until
// the returned unlock.
func lockFile(path string, how int) (unlock func(), err error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, err
	}
	for {
		err = unix.Flock(int(f.Fd()), how)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, err
	}
	return func() { f.Close() }, nil
}

// PipeMaxSize is fs.pipe-max-size: the largest pipe a process without
// CAP_SYS_RESOURCE may ask for.
func PipeMaxSize() (int, error) { return readInt(pipeMaxPath) }

func readInt(path string) (int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(strings.TrimSpace(string(b)))
}
