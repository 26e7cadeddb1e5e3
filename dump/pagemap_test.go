package dump

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"

	"google.golang.org/protobuf/encoding/protowire"
)

func entry(fields ...uint64) []byte {
	var b []byte
	for i := 0; i < len(fields); i += 2 {
		b = protowire.AppendTag(b, protowire.Number(fields[i]), protowire.VarintType)
		b = protowire.AppendVarint(b, fields[i+1])
	}
	return b
}

func TestLazyPages(t *testing.T) {
	dir := t.TempDir()
	img := binary.LittleEndian.AppendUint32(nil, 0x54564319)
	img = binary.LittleEndian.AppendUint32(img, 0x56084025)
	for _, m := range [][]byte{
		entry(1, 1),                             // head: pages_id
		entry(1, 0x400000, 2, 0, 4, 4, 5, 3),    // present, 3 pages (CRIU 4 layout)
		entry(1, 0x800000, 2, 0, 4, 2, 5, 4096), // lazy, 4096 pages
		entry(1, 0x900000, 2, 7, 4, 2),          // lazy, older layout: 7 pages
	} {
		img = binary.LittleEndian.AppendUint32(img, uint32(len(m)))
		img = append(img, m...)
	}
	if err := os.WriteFile(filepath.Join(dir, "pagemap-1.img"), img, 0o600); err != nil {
		t.Fatal(err)
	}
	if got := lazyPages(dir); got != 4096+7 {
		t.Fatalf("lazyPages = %d, want %d", got, 4096+7)
	}
}
