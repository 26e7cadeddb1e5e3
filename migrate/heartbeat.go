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

// heartbeat sends Restoring on c every heartbeatEvery until the returned
// stop is called, but only while the peer is heard from: once nothing has
// arrived on c for peerSilence (the stream stalled, or the work that
// follows it hangs), the beats stop, and a source waiting on them gives
// up in turn. A beat that said only "this process is alive" would hold a
// source frozen for as long as a stuck restore lasts.
func heartbeat(c *conn) (stop func()) {
	done := make(chan struct{})
	ended := make(chan struct{})
	go func() {
		defer close(ended)
		t := time.NewTicker(heartbeatEvery)
		defer t.Stop()
		lastRx, heard := c.rx.Load(), time.Now()
		for {
			select {
			case <-done:
				return
			case now := <-t.C:
				if rx := c.rx.Load(); rx != lastRx {
					lastRx, heard = rx, now
				}
				if now.Sub(heard) >= peerSilence() {
					continue // no progress to speak of
				}
			}
			if c.send(&pb.Envelope{Msg: &pb.Envelope_Restoring{Restoring: &pb.Restoring{}}}, stepTimeout) != nil {
				return
			}
		}
	}()
	return func() {
		close(done)
		<-ended
	}
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
