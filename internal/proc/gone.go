package proc

import (
	"errors"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Gone returns a channel that is closed once the task pid that started at
// start has exited, and a stop that ends the watch (call it when the
// answer no longer matters; it returns at once, and the watch lets its
// pidfd go within goneEvery). A task that is already gone, or whose pid now
// names another task, reads as gone at once. The watch polls a pidfd, so
// it hears the exit within a few milliseconds without being the task's
// parent; where pidfds are missing (Linux < 5.3) it reads /proc every
// goneEvery instead.
func Gone(pid int, start uint64) (gone <-chan struct{}, stop func()) {
	ch, done := make(chan struct{}), make(chan struct{})
	var once sync.Once
	fd, err := unix.PidfdOpen(pid, 0)
	// Opened first, checked second: a pidfd of a reused pid would
	// otherwise watch the wrong task.
	if !Alive(pid, start) {
		if err == nil {
			unix.Close(fd)
		}
		close(ch)
		return ch, func() {}
	}
	go func() {
		if err == nil {
			defer unix.Close(fd)
		}
		for {
			select {
			case <-done:
				return
			default:
			}
			if err == nil {
				fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
				n, perr := unix.Poll(fds, int(goneEvery/time.Millisecond))
				if perr != nil && !errors.Is(perr, unix.EINTR) {
					err = perr // fall back to reading /proc
				}
				if n > 0 {
					close(ch)
					return
				}
				continue
			}
			if !Alive(pid, start) {
				close(ch)
				return
			}
			select {
			case <-done:
				return
			case <-time.After(goneEvery):
			}
		}
	}()
	return ch, func() { once.Do(func() { close(done) }) }
}

// goneEvery is how often Gone looks again where it cannot wait, and how
// long a stopped watch may still hold its pidfd.
const goneEvery = 100 * time.Millisecond
