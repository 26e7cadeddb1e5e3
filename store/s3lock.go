package store

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
)

// The S3 backend's store-wide lock: a reader-writer lock made of lease
// objects, because object storage has no flock. doc.go states the protocol
// and why it is safe; in short:
//
//   - a holder writes its marker, locks/shared/ID or locks/exclusive/ID,
//     then lists locks/; it renews the marker (PUT again) every
//     s3LeaseTTL/4 and deletes it when done;
//   - a marker whose last write (its LastModified, the server's clock) is
//     s3LeaseTTL older than the lister's own marker is dead: its holder
//     was killed or cut off;
//   - shared: granted if no live exclusive marker is listed; otherwise it
//     withdraws its marker and tries again later (writers yield to GC);
//   - exclusive: granted once no live marker but its own is listed; it
//     waits, keeping its marker, while shared ones remain or only
//     exclusive ones that sort after its own; it withdraws and retries
//     when one sorts before it.
//
// Each side writes before it lists, and S3 lists what was written before
// the list began (strong read-after-write consistency), so of a writer
// and a GC that start together at least one sees the other.
const (
	// s3LeaseTTL is how long a marker lives without renewal. A killed
	// writer delays the next GC by this much, never more.
	s3LeaseTTL = 60 * time.Second
	// s3LockPollMin and s3LockPollMax bound the wait between lists.
	s3LockPollMin = 100 * time.Millisecond
	s3LockPollMax = 2 * time.Second
)

// LeaseLocker is implemented by backends whose lock is a lease that can
// lapse while it is held (a holder that was cut off from the server for
// longer than the lease). check reports whether the lease has been held
// without a gap so far; a writer calls it before it writes its record and
// GC before every delete, so that neither acts on a lock others may
// already consider released.
type LeaseLocker interface {
	LockLease(ctx context.Context, exclusive bool) (check, unlock func() error, err error)
}

type s3Lease struct {
	b    *s3Backend
	name string
	body []byte

	mu        sync.Mutex
	lastRenew time.Time // start of the last successful PUT of the marker
	lapsed    bool      // two renewals were further apart than ttl/2
	stop      chan struct{}
	wg        sync.WaitGroup
	once      sync.Once
}

// Lock implements Locker.
func (b *s3Backend) Lock(ctx context.Context, exclusive bool) (func() error, error) {
	_, unlock, err := b.LockLease(ctx, exclusive)
	return unlock, err
}

// LockLease implements LeaseLocker.
func (b *s3Backend) LockLease(ctx context.Context, exclusive bool) (check, unlock func() error, err error) {
	var rnd [6]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		return nil, nil, err
	}
	kind := "shared/"
	if exclusive {
		kind = "exclusive/"
	}
	host, _ := os.Hostname()
	l := &s3Lease{
		b:    b,
		name: locksPrefix + kind + time.Now().UTC().Format("20060102T150405.000000Z") + "-" + hex.EncodeToString(rnd[:]),
		body: fmt.Appendf(nil, "host=%s pid=%d since=%s\n", host, os.Getpid(), time.Now().UTC().Format(time.RFC3339Nano)),
		stop: make(chan struct{}),
	}
	if err := l.acquire(ctx, exclusive); err != nil {
		return nil, nil, err
	}
	l.wg.Go(l.renewLoop)
	return l.check, l.release, nil
}

// put writes the marker (anew or to renew it).
func (l *s3Lease) put(ctx context.Context) error {
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, l.b.lease/4)
	defer cancel()
	_, err := l.b.cli.PutObject(ctx, &s3.PutObjectInput{
		Bucket: &l.b.bucket, Key: l.b.key(l.name),
		Body: strings.NewReader(string(l.body)), ContentLength: aws.Int64(int64(len(l.body))),
	})
	if err != nil {
		return s3Err("writing lock", l.name, err)
	}
	l.mu.Lock()
	if !l.lastRenew.IsZero() && start.Sub(l.lastRenew) > l.b.lease/2 {
		l.lapsed = true
	}
	l.lastRenew = start
	l.mu.Unlock()
	return nil
}

// remove deletes the marker, even after ctx ended.
func (l *s3Lease) remove(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	if _, err := l.b.cli.DeleteObject(ctx, &s3.DeleteObjectInput{Bucket: &l.b.bucket, Key: l.b.key(l.name)}); err != nil {
		return s3Err("removing lock", l.name, err)
	}
	// Withdrawn while waiting: the next put starts a new lease.
	l.mu.Lock()
	l.lastRenew = time.Time{}
	l.mu.Unlock()
	return nil
}

func (l *s3Lease) acquire(ctx context.Context, exclusive bool) error {
	wait := s3LockPollMin
	sleep := func() error {
		t := time.NewTimer(wait)
		defer t.Stop()
		// Never so long that the marker would miss its renewal.
		wait = min(2*wait, s3LockPollMax, l.b.lease/8)
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for the store lock: %w: %w", ErrBusy, ctx.Err())
		case <-t.C:
			return nil
		}
	}
	for {
		if err := l.put(ctx); err != nil {
			return err
		}
	listing:
		for {
			infos, err := l.b.list(ctx, locksPrefix)
			if err != nil {
				return errors.Join(err, l.remove(ctx))
			}
			now := time.Now()
			for _, o := range infos {
				if o.name == l.name {
					now = o.mod // the server's clock, not ours
				}
			}
			var shared, exclBefore, exclAfter int
			var dead []string
			for _, o := range infos {
				if o.name == l.name {
					continue
				}
				if now.Sub(o.mod) >= l.b.lease {
					dead = append(dead, o.name)
					continue
				}
				switch {
				case strings.HasPrefix(o.name, locksPrefix+"shared/"):
					shared++
				case !strings.HasPrefix(o.name, locksPrefix+"exclusive/"):
				case o.name < l.name:
					exclBefore++
				default:
					exclAfter++
				}
			}
			switch {
			case !exclusive && exclBefore+exclAfter == 0:
				return nil
			case exclusive && shared+exclBefore+exclAfter == 0:
				// Markers of dead holders are removed by the one
				// process that may: the exclusive holder. A holder
				// that was only cut off finds its lease lapsed.
				for _, name := range dead {
					_, _ = l.b.cli.DeleteObject(ctx, &s3.DeleteObjectInput{Bucket: &l.b.bucket, Key: l.b.key(name)})
				}
				return nil
			case !exclusive || exclBefore > 0:
				// Yield: withdraw the marker, come back later.
				if err := l.remove(ctx); err != nil {
					return err
				}
				if err := sleep(); err != nil {
					return err
				}
				break listing
			}
			// Exclusive, first in line: wait for the others to go,
			// keeping the marker fresh so that new writers wait.
			if err := sleep(); err != nil {
				return errors.Join(err, l.remove(ctx))
			}
			l.mu.Lock()
			due := time.Since(l.lastRenew) > l.b.lease/4
			l.mu.Unlock()
			if due {
				if err := l.put(ctx); err != nil {
					return errors.Join(err, l.remove(ctx))
				}
			}
		}
	}
}

func (l *s3Lease) renewLoop() {
	t := time.NewTicker(l.b.lease / 4)
	defer t.Stop()
	for {
		select {
		case <-l.stop:
			return
		case <-t.C:
		}
		// A failed renewal is retried at the next tick; check reports
		// the lease lapsed once renewals are too far apart.
		_ = l.put(context.Background())
	}
}

// check reports whether the lease has been held without a gap in which
// others could have taken it for dead.
func (l *s3Lease) check() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.lapsed || time.Since(l.lastRenew) > l.b.lease/2 {
		return fmt.Errorf("the store's lease %s lapsed (not renewed for more than %s; the S3 server was unreachable or this host stalled): %w",
			l.name, l.b.lease/2, ErrBusy)
	}
	return nil
}

func (l *s3Lease) release() error {
	var err error
	l.once.Do(func() {
		close(l.stop)
		l.wg.Wait()
		err = l.remove(context.Background())
	})
	return err
}
