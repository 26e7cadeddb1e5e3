package dump

import (
	"encoding/binary"
	"os"
	"path/filepath"

	"google.golang.org/protobuf/encoding/protowire"
)

// peLazy marks a pagemap entry whose pages a lazy dump left in the
// tree's memory for the destination to fetch (CRIU's PE_LAZY).
const peLazy = 2

// lazyPages counts the pages of a lazy dump in dir that were left to be
// fetched: the pagemap images' entries marked PE_LAZY. (CRIU's own
// statistics restart when its page server starts and so lose the count.)
func lazyPages(dir string) int64 {
	paths, _ := filepath.Glob(filepath.Join(dir, "pagemap-*.img"))
	var n int64
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil || len(b) < 8 {
			continue
		}
		b = b[8:] // the image's two magic numbers
		for first := true; len(b) >= 4; first = false {
			size := int(binary.LittleEndian.Uint32(b))
			if len(b) < 4+size {
				break
			}
			msg := b[4 : 4+size]
			b = b[4+size:]
			if !first { // the first is the pagemap head
				if pages, flags := pagemapEntry(msg); flags&peLazy != 0 {
					n += int64(pages)
				}
			}
		}
	}
	return n
}

// pagemapEntry reads a pagemap_entry's page count and flags. CRIU 4
// moved the count from compat_nr_pages (2, uint32) to nr_pages (5,
// uint64), which go-criu v7's generated type does not know, so the
// message is read field by field.
func pagemapEntry(msg []byte) (pages, flags uint64) {
	var compat uint64
	for len(msg) > 0 {
		num, typ, n := protowire.ConsumeTag(msg)
		if n < 0 {
			break
		}
		msg = msg[n:]
		if typ != protowire.VarintType {
			if n = protowire.ConsumeFieldValue(num, typ, msg); n < 0 {
				break
			}
			msg = msg[n:]
			continue
		}
		v, n := protowire.ConsumeVarint(msg)
		if n < 0 {
			break
		}
		msg = msg[n:]
		switch num {
		case 2:
			compat = v
		case 4:
			flags = v
		case 5:
			pages = v
		}
	}
	if pages == 0 {
		pages = compat
	}
	return pages, flags
}
