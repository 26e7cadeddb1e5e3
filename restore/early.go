package restore

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferry-cr/ferry/image"
	"github.com/ferry-cr/ferry/internal/checkpoint"
	"github.com/ferry-cr/ferry/internal/criu"
)

// EarlyLazy lays out a lazy restore that starts before its checkpoint
// has come: a post-copy destination starts CRIU's lazy-pages daemon and
// the restore's CRIU (their start-up, exec and kernel probing, is tens of
// ms each) while the source is still dumping, from the stream's first
// record, and lets them go on once the rest has arrived.
//
//   - Dir holds the manifest as the first record gave it and, once they
//     run, the restore's serve socket and the daemon's socket and logs.
//     The restore (Options.LazyImages, LazyReady) is held at its first
//     image until Fill is done.
//   - Images receives the checkpoint (Fill), from which the restore is
//     served.
//   - Daemon is the daemon's images directory. The two images it reads
//     before it listens are FIFOs, so it waits in open(2) until Fill
//     feeds them; the images it reads later (per task, once the restore
//     has connected) are hard links into Images.
type EarlyLazy struct {
	Dir, Images, Daemon string

	feeds  []*fifoFeed // one per earlyDaemonImages
	closed chan struct{}
	wg     sync.WaitGroup
	once   sync.Once
}

// lazySocket is the socket the lazy-pages daemon listens on, in its work
// directory (CRIU's LAZY_PAGES_SOCK_NAME).
const lazySocket = "lazy-pages.socket"

// earlyDaemonImages are the images `criu lazy-pages` reads before it
// listens (check_img_inventory and read_pstree_image, in that order).
var earlyDaemonImages = []string{"inventory.img", "pstree.img"}

// NewEarlyLazy makes the directories in the tmpfs when it has room (see
// earlyBase), else in base (or, when base is too deep for a socket's
// path, in /run/ferry-serve), and writes m (the stream's first record:
// everything the restore's command line needs) as Dir's manifest.
func NewEarlyLazy(base string, m *checkpoint.Manifest) (*EarlyLazy, error) {
	// Dir holds two unix sockets.
	dir, err := tempServeDir(earlyBase(base), "lazy-", max(len(criu.ServeSocket), len(lazySocket)))
	if err != nil {
		return nil, err
	}
	e := &EarlyLazy{Dir: dir, Images: filepath.Join(dir, "images"), Daemon: filepath.Join(dir, "daemon"),
		closed: make(chan struct{})}
	if err := e.prepare(m); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	for _, name := range earlyDaemonImages {
		f := &fifoFeed{path: filepath.Join(e.Daemon, name), opened: make(chan struct{}), data: make(chan []byte, 1)}
		e.feeds = append(e.feeds, f)
		e.wg.Go(func() { f.run(e.closed) })
	}
	return e, nil
}

// earlyBase picks where a lazy restore's directories go: earlyTmpfs when
// it is a tmpfs with room, else base. The images are small (the memory
// stays behind), but they are written while the job is stopped: 25 of
// them took 2-5 ms longer on this project's ext4 machines than on tmpfs,
// and once a journal commit held them for 600 ms. Scratch names let the
// next ferry sweep what a killed serve left there (ScratchBases).
func earlyBase(base string) string {
	if free, tmpfs := shmRoom(earlyTmpfs); tmpfs && free > 64<<20 {
		return earlyTmpfs
	}
	return base
}

// earlyTmpfs is the tmpfs earlyBase prefers (a variable for the tests).
var earlyTmpfs = shmDir

// DaemonWaiting is closed once the daemon waits for its first image: its
// start-up is over.
func (e *EarlyLazy) DaemonWaiting() <-chan struct{} { return e.feeds[0].opened }

func (e *EarlyLazy) prepare(m *checkpoint.Manifest) error {
	for _, d := range []string{e.Images, e.Daemon} {
		if err := os.Mkdir(d, 0o700); err != nil {
			return err
		}
	}
	for _, name := range earlyDaemonImages {
		if err := unix.Mkfifo(filepath.Join(e.Daemon, name), 0o600); err != nil {
			return fmt.Errorf("making %s: %w", name, err)
		}
	}
	return checkpoint.WriteHead(e.Dir, m)
}

// Fill unpacks the checkpoint a into Images, checks it against its own
// manifest, links the daemon's later images, and starts feeding the
// daemon's first two (each FIFO once the daemon opens it). It returns
// the checkpoint's manifest.
func (e *EarlyLazy) Fill(a *image.Archive) (*checkpoint.Manifest, error) {
	m, err := unpackArchive(a, e.Images)
	if err != nil {
		return nil, err
	}
	for name := range m.Files {
		if slices.Contains(earlyDaemonImages, name) {
			continue
		}
		if err := os.Link(filepath.Join(e.Images, name), filepath.Join(e.Daemon, name)); err != nil {
			return nil, err
		}
	}
	for i, name := range earlyDaemonImages {
		data, err := os.ReadFile(filepath.Join(e.Images, name))
		if err != nil {
			return nil, fmt.Errorf("the lazy checkpoint has no %s: %w", name, checkpoint.ErrIncomplete)
		}
		e.feeds[i].data <- data
	}
	return m, nil
}

// fifoFeed writes one image into a FIFO the daemon reads it from.
type fifoFeed struct {
	path   string
	opened chan struct{} // closed once the daemon has the FIFO open
	data   chan []byte   // the image, once it has come
}

// run opens the FIFO for writing as soon as a reader (the daemon, which
// opens it at the end of its start-up and waits there) has it open,
// checking every millisecond until then, and writes the image once it
// has come; closed ends either wait. The daemon's open returns once run
// has opened its end, and its reads wait for the data.
func (f *fifoFeed) run(closed <-chan struct{}) {
	var fd int
	for {
		var err error
		if fd, err = unix.Open(f.path, unix.O_WRONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0); err == nil {
			break
		}
		if err != unix.ENXIO { // ENXIO: no reader yet
			return
		}
		select {
		case <-closed:
			return
		case <-time.After(time.Millisecond):
		}
	}
	// Blocking writes: the daemon reads as it goes, and a daemon that is
	// gone fails them (EPIPE).
	err := unix.SetNonblock(fd, false)
	w := os.NewFile(uintptr(fd), f.path)
	defer w.Close()
	close(f.opened)
	select {
	case data := <-f.data:
		if err == nil {
			_, _ = w.Write(data)
		}
	case <-closed:
		// Closing our end unwritten: the daemon reads an empty image and
		// fails, if it still runs.
	}
}

// Close ends the feeds and removes Dir. The daemon must be gone by then:
// a feed writing to it would wait for it.
func (e *EarlyLazy) Close() {
	e.once.Do(func() { close(e.closed) })
	e.wg.Wait()
	os.RemoveAll(e.Dir)
}

// unpackArchive writes the files of a into dir, which must exist and be
// empty, and returns the checkpoint's manifest, checked against them.
func unpackArchive(a *image.Archive, dir string) (*checkpoint.Manifest, error) {
	for _, name := range a.Names() {
		if name != filepath.Base(name) || name == "." || name == ".." {
			return nil, fmt.Errorf("image stream names a file %q outside its directory: %w", name, image.ErrCorrupt)
		}
		f, err := os.OpenFile(filepath.Join(dir, name), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return nil, err
		}
		_, err = a.WriteTo(name, f)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return nil, fmt.Errorf("unpacking %s: %w", name, err)
		}
	}
	return checkpoint.Load(dir)
}
