package freezer

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

const (
	// v2PollInterval is how often cgroup.events is re-read when no inotify
	// event arrives: the waitTime of opencontainers/cgroups fs2/freezer.go
	// (runc b93666ebc). inotify normally wakes the wait much earlier.
	v2PollInterval = 10 * time.Millisecond
	// v2MaxEventWakeups is added to the poll-count bound of waitFrozen for
	// wake-ups by inotify. cgroup.events changes only when "populated" or
	// "frozen" flip, a handful of times per freeze.
	v2MaxEventWakeups = 100
	// v2FirstPause is the first wait between two reads, doubled up to
	// v2PollInterval (v2FirstWaits sleeps, 12.7 ms in all), after which
	// inotify joins in. A freeze or thaw of a job mostly completes within
	// a few hundred µs of the write, and the kernel sends a cgroup file's
	// change notifications from a work queue, at most one per 10 ms
	// (CGROUP_FILE_NOTIFY_MIN_INTV): waiting on inotify from the start,
	// ferry freeze took 5-17 ms where the state had changed after 0.3 ms,
	// and a migration's freeze is its job's downtime.
	v2FirstPause = 100 * time.Microsecond
	v2FirstWaits = 7
)

// freezeV2 writes 1 to cgroup.freeze and waits for "frozen 1" in
// cgroup.events. The write is asynchronous: reading cgroup.freeze back only
// shows that it was accepted. The kernel doc (cgroup-v2.rst): "Freezing of
// the cgroup may take some time; when this action is completed, the
// 'frozen' value in the cgroup.events control file will be updated to '1'".
// Unlike fs2's setFreezer, nothing here leaves cgroup.freeze at 1 on
// failure: Freeze thaws.
func freezeV2(ctx context.Context, dir string) (State, error) {
	if err := writeCgroupFile(dir, v2FreezeFile, "1"); err != nil {
		return Undefined, classify(err)
	}
	n, err := waitFrozen(ctx, dir, true)
	if err != nil {
		return Freezing, err
	}
	if n > 1 {
		slog.DebugContext(ctx, fmt.Sprintf("frozen after %d retries", n), "cgroup", dir)
	}
	return Frozen, nil
}

// thawV2 writes 0 to cgroup.freeze and waits for "frozen 0".
func thawV2(ctx context.Context, dir string) error {
	if err := writeCgroupFile(dir, v2FreezeFile, "0"); err != nil {
		return classify(err)
	}
	// cgroup.events shows the effective state: it stays "frozen 1" while
	// an ancestor is frozen, whatever this cgroup's cgroup.freeze says.
	// The root cgroup has no cgroup.events; errors mean "don't know".
	if f, err := readFrozen(filepath.Dir(dir)); err == nil && f {
		return ErrFrozenByAncestor
	}
	n, err := waitFrozen(ctx, dir, false)
	if err != nil {
		return err
	}
	if n > 1 {
		slog.DebugContext(ctx, fmt.Sprintf("thawed after %d retries", n), "cgroup", dir)
	}
	return nil
}

// stateV2 combines cgroup.freeze (the cgroup's own setting) with the
// "frozen" key of cgroup.events (the effective state, ancestors included).
func stateV2(dir string) (State, error) {
	frozen, err := readFrozen(dir)
	if err != nil {
		return Undefined, err
	}
	if frozen {
		return Frozen, nil
	}
	s, err := readTrimmed(dir, v2FreezeFile)
	if err != nil {
		return Undefined, err
	}
	switch s {
	case "0":
		return Thawed, nil
	case "1":
		return Freezing, nil
	}
	return Undefined, fmt.Errorf("unexpected %s value %q", v2FreezeFile, s)
}

// readFrozen reads the "frozen" key of dir's cgroup.events. Each call opens
// and reads the file afresh, rather than seeking under a live bufio.Scanner
// as fs2's waitFrozen does (which works only because the file fits in one
// read).
func readFrozen(dir string) (bool, error) {
	data, err := readCgroupFile(dir, v2EventsFile)
	if err != nil {
		return false, classify(err)
	}
	for line := range strings.Lines(string(data)) {
		v, ok := strings.CutPrefix(strings.TrimSpace(line), "frozen ")
		if !ok {
			continue
		}
		switch v {
		case "0":
			return false, nil
		case "1":
			return true, nil
		}
		return false, fmt.Errorf("unexpected %q in %s", line, v2EventsFile)
	}
	return false, fmt.Errorf("%w: no \"frozen\" key in %s", ErrNotSupported, filepath.Join(dir, v2EventsFile))
}

// waitFrozen waits until cgroup.events says "frozen 1" (want true) or
// "frozen 0", and returns how many times it had to wait.
//
// cgroup.events raises IN_MODIFY (and POLLPRI) when a key changes
// (cgroups(7)); runc watches it the same way for "populated"
// (notify_v2_linux.go). Here it joins in only after the first, short
// sleeps (v2FirstPause): a change that falls between the last of them
// and the watch costs one poll interval at most. Every wait is also capped at
// v2PollInterval, so the loop keeps working as a 10 ms poll when inotify
// is unavailable or misses an event. The loop ends at ctx's deadline; its
// iteration count is bounded as well, by the deadline divided by the poll
// interval plus v2MaxEventWakeups and v2FirstWaits.
func waitFrozen(ctx context.Context, dir string, want bool) (int, error) {
	// The watch is set up only once the first, short waits are over:
	// most waits end before it would be used, and closing an inotify
	// instance waits for an SRCU grace period (fsnotify_destroy_group),
	// which took 13 ms here. It is closed in the background.
	var w *eventsWatch
	defer func() {
		if w != nil {
			go w.close()
		}
	}()
	budget := DefaultTimeout
	if deadline, ok := ctx.Deadline(); ok {
		budget = time.Until(deadline)
	}
	maxIter := int(budget/v2PollInterval) + v2MaxEventWakeups + v2FirstWaits
	pause := v2FirstPause
	for i := range maxIter {
		frozen, err := readFrozen(dir)
		if err != nil {
			return i, err
		}
		if frozen == want {
			return i, nil
		}
		if err := ctx.Err(); err != nil {
			return i, err
		}
		if pause < v2PollInterval {
			_ = sleep(ctx, pause)
		} else {
			if w == nil {
				w = watchEvents(dir)
			}
			w.wait(ctx, pause)
		}
		pause = min(2*pause, v2PollInterval)
	}
	return maxIter, fmt.Errorf("%s not \"frozen %d\" after %d reads", v2EventsFile, b2i(want), maxIter)
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// eventsWatch is an inotify watch on one cgroup.events file; fd is -1 when
// inotify could not be set up, and wait then simply sleeps.
type eventsWatch struct{ fd int }

func watchEvents(dir string) *eventsWatch {
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		return &eventsWatch{fd: -1}
	}
	_, err = retryOnEINTR2(func() (int, error) {
		return unix.InotifyAddWatch(fd, filepath.Join(dir, v2EventsFile), unix.IN_MODIFY)
	})
	if err != nil {
		unix.Close(fd)
		return &eventsWatch{fd: -1}
	}
	return &eventsWatch{fd: fd}
}

func (w *eventsWatch) close() {
	if w.fd >= 0 {
		unix.Close(w.fd)
		w.fd = -1
	}
}

// wait returns after an inotify event, after d, or when ctx is done,
// whichever comes first.
func (w *eventsWatch) wait(ctx context.Context, d time.Duration) {
	if deadline, ok := ctx.Deadline(); ok {
		d = min(d, time.Until(deadline))
	}
	if d <= 0 {
		// The deadline has passed but the context's timer may not have
		// fired yet: wait for it rather than spin through the loop bound.
		<-ctx.Done()
		return
	}
	if w.fd < 0 {
		_ = sleep(ctx, d)
		return
	}
	ts := unix.NsecToTimespec(int64(d))
	fds := []unix.PollFd{{Fd: int32(w.fd), Events: unix.POLLIN}}
	n, err := retryOnEINTR2(func() (int, error) { return unix.Ppoll(fds, &ts, nil) })
	if err != nil || n == 0 {
		return
	}
	// Drain the queued events; what they say does not matter, the caller
	// re-reads the file. The fd is non-blocking, so this ends with EAGAIN;
	// the bound is for safety.
	var buf [4096]byte
	for range 16 {
		if _, err := unix.Read(w.fd, buf[:]); err != nil && !errors.Is(err, unix.EINTR) {
			return
		}
	}
}
