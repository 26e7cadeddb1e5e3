package restore

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/ferry-cr/ferry/internal/criu"
	"golang.org/x/sys/unix"
)

// Post-copy (CRIU lazy pages) on the restoring side. A lazy checkpoint
// holds every image but the tree's private memory, so it is small; CRIU's
// lazy-pages daemon and the restore both read it from one directory (the
// daemon once per task, the restore once: a --stream cannot serve a file
// twice), and the daemon fetches the memory from the source's CRIU over
// the network while the restored tree faults it in.

// LazyPages is a running `criu lazy-pages` daemon.
type LazyPages = criu.Daemon

// StartLazyPages starts CRIU's lazy-pages daemon on the unpacked lazy
// checkpoint in images, fetching memory over pages (a connected socket,
// ferry's end of the link to the source's page server, which the daemon
// inherits as --ps-socket: an address it connected to could have been
// taken first by any local process), and returns once it listens for the
// restore, in work (the restore's CRIU must work there too). The caller
// may close pages once it returns; the daemon has its own copy. The
// daemon exits once every page has been copied into the restored tree
// (status 0) or when it fails. Before it listens it reads two images,
// inventory.img and pstree.img; mm-PID.img and pagemap-PID.img it reads
// once the restore has connected.
//
// hold, when not nil, is inherited too and never used: the caller passes
// the other end of pages' socketpair when it relays that pair itself, so
// that the relay's death (its process killed) is no end of the page
// socket for the daemon. A daemon that sees its page socket end exits,
// and the kernel then fills every page the restored tree still lacks
// with zeros: the tree would run on memory that never came. Held, the
// daemon waits instead, and the tree's faults with it, until the copy is
// dropped (a restarted serve's Recover).
func StartLazyPages(ctx context.Context, b *criu.Binary, images, work string, pages, hold *os.File) (*LazyPages, error) {
	files := []*os.File{pages}
	if hold != nil {
		files = append(files, hold)
	}
	return criu.Command{Path: b.Path, Args: []string{"lazy-pages", "--images-dir", images, "--work-dir", work,
		"--log-file", "lazy-pages.log", "-v2", "--page-server", "--ps-socket", strconv.Itoa(int(criu.ExtraFD(0)))},
		ExtraFiles: files}.StartReady(ctx)
}

// EndLazyPagesIn ends the lazy-pages daemons that serve the lazy
// checkpoint in dir (a copy's Record.RestoreFrom) and returns their pids.
// It is for a daemon whose serve was killed: such a daemon holds both
// ends of its page socket (see StartLazyPages), so it waits for ever
// rather than end when its serve dies. Each daemon has a checkpoint
// directory of its own, so this ends no daemon another copy still needs.
// The caller ends the restored tree first: ended before it, the daemon
// would let the tree's missing pages read as zeros.
func EndLazyPagesIn(dir string) []int {
	dir = filepath.Clean(dir)
	if dir == "/" || dir == "." {
		return nil
	}
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	var ended []int
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		args := strings.Split(string(b), "\x00")
		if !slices.Contains(args, "lazy-pages") || !slices.ContainsFunc(args, func(a string) bool {
			return a == dir || strings.HasPrefix(a, dir+"/")
		}) {
			continue
		}
		pid, err := strconv.Atoi(filepath.Base(filepath.Dir(p)))
		if err != nil || pid == os.Getpid() {
			continue
		}
		if unix.Kill(pid, unix.SIGKILL) == nil {
			ended = append(ended, pid)
		}
	}
	return ended
}
