package restore

import (
	"context"
	"net"
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
// checkpoint in images, fetching memory from the page server at pages (a
// TCP address: ferry's end of the link to the source), and returns once
// it listens for the restore, in work (the restore's CRIU must work
// there too). It exits once every page has been copied into the restored
// tree (status 0) or when it fails. Before it listens it reads two
// images, inventory.img and pstree.img; mm-PID.img and pagemap-PID.img
// it reads once the restore has connected.
func StartLazyPages(ctx context.Context, b *criu.Binary, images, work string, pages *net.TCPAddr) (*LazyPages, error) {
	return criu.Command{Path: b.Path, Args: []string{"lazy-pages", "--images-dir", images, "--work-dir", work,
		"--log-file", "lazy-pages.log", "-v2", "--page-server", "--address", pages.IP.String(),
		"--port", strconv.Itoa(pages.Port)}}.StartReady(ctx)
}
