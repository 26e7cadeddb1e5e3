package restore

import (
	"context"
	"os"
	"strconv"

	"github.com/ferry-cr/ferry/internal/criu"
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
func StartLazyPages(ctx context.Context, b *criu.Binary, images, work string, pages *os.File) (*LazyPages, error) {
	return criu.Command{Path: b.Path, Args: []string{"lazy-pages", "--images-dir", images, "--work-dir", work,
		"--log-file", "lazy-pages.log", "-v2", "--page-server", "--ps-socket", strconv.Itoa(int(criu.ExtraFD(0)))},
		ExtraFiles: []*os.File{pages}}.StartReady(ctx)
}
