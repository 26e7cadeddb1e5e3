package migrate

import (
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	pb "github.com/ferry-cr/ferry/proto"
)

// A source that holds its job frozen waits on the destination twice: for
// Prepared (its restore is up) and for Restored (its copy exists). Either
// wait is bounded by silence, not by the length of the work: the
// destination sends Restoring every heartbeatEvery while it restores, and
// a source that hears nothing for peerSilence gives up and gives its job
// back (before the handover; after it, the documented in-doubt state).
// A restore that goes on sending heartbeats is bounded by restoreTimeout.
const heartbeatEvery = 5 * time.Second

// peerSilence is how long a source waits for a word from the destination
// while its job is frozen: stepTimeout, or FERRY_PEER_SILENCE (a Go
// duration, for tests).
func peerSilence() time.Duration {
	if d, err := time.ParseDuration(os.Getenv("FERRY_PEER_SILENCE")); err == nil && d > 0 {
		return d
	}
	return stepTimeout
}

// heartbeat sends Restoring on c every beatEvery until the returned
// stop is called, but only while the peer is heard from: once nothing has
// arrived on c for peerSilence (the stream stalled, or the work that
// follows it hangs), the beats stop, and a source waiting on them gives
// up in turn. A beat that said only "this process is alive" would hold a
// source frozen for as long as a stuck restore lasts.
func heartbeat(c *conn) (stop func()) {
	stop, _ = beat(c)
	return stop
}

// beat is heartbeat, and also says when the peer has given up on us:
// gaveUp is closed once the beats have stopped and peerSilence (and a
// second, for the link's delay) has passed since the last one, after
// which a peer that waits on them no longer does. A destination whose
// restore is stuck, or whose link died, ends that restore then: its
// source has given its job back, so the copy can never be the job, and
// the restore would otherwise hold it (a tree, a daemon, the connection)
// until its own timeout.
func beat(c *conn) (stop func(), gaveUp <-chan struct{}) {
	done := make(chan struct{})
	ended := make(chan struct{})
	given := make(chan struct{})
	go func() {
		defer close(ended)
		silence := peerSilence()
		t := time.NewTicker(beatEvery())
		defer t.Stop()
		lastRx, heard, sent := c.rx.Load(), time.Now(), time.Now()
		broken, told := false, false
		for {
			var now time.Time
			select {
			case <-done:
				return
			case now = <-t.C:
			}
			if rx := c.rx.Load(); rx != lastRx {
				lastRx, heard = rx, now
			}
			if !broken && now.Sub(heard) < silence {
				if c.send(&pb.Envelope{Msg: &pb.Envelope_Restoring{Restoring: &pb.Restoring{}}}, stepTimeout) == nil {
					sent = time.Now()
					continue
				}
				broken = true // the peer hears no more beats
			}
			if !told && time.Since(sent) >= silence+time.Second {
				close(given)
				told = true
			}
		}
	}()
	return func() {
		close(done)
		<-ended
	}, given
}

// beatEvery is how often a beat goes: heartbeatEvery, or more often
// where the peer's silence bound is shorter than three of them (tests).
func beatEvery() time.Duration {
	return min(heartbeatEvery, peerSilence()/3)
}

// recvWord reads the destination's next word that is not a heartbeat
// (nor a Prepared the caller did not wait for): at most peerSilence
// between any two messages, and at most total in all.
func recvWord(c *conn, total time.Duration, skipPrepared bool) (*pb.Envelope, error) {
	deadline := time.Now().Add(total)
	silence := peerSilence()
	for {
		wait := min(silence, time.Until(deadline))
		if wait <= 0 {
			return nil, fmt.Errorf("no answer within %s", total)
		}
		m, err := c.recv(wait)
		if err != nil {
			if time.Until(deadline) > 0 && isTimeout(err) {
				return nil, fmt.Errorf("the destination went silent for %s: %w", silence, err)
			}
			return nil, err
		}
		if m.GetRestoring() != nil || skipPrepared && m.GetPrepared() != nil {
			continue
		}
		return m, nil
	}
}

// isTimeout says whether err is a deadline that passed.
func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
