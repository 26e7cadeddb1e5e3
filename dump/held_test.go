package dump

import (
	"bytes"
	"io"
	"math/rand/v2"
	"os"
	"testing"

	"github.com/ferry-cr/ferry/image"
	pb "github.com/ferry-cr/ferry/proto"
)

// Pages files held back in pipes come out whole and in order after every
// other file, behind a REMAINING record, however many pipes they took;
// other files pass straight through.
func TestHeldPagesGoLast(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	big := make([]byte, 40<<20+123) // more than one holding pipe, and not whole pages
	for i := range big {
		big[i] = byte(r.Uint32())
	}
	small := []byte("the root's few pages")

	var out bytes.Buffer
	iw, err := image.NewWriter(&out, &pb.Manifest{Job: "j"}, image.WriterOptions{NoDigests: true, NoCompress: true})
	if err != nil {
		t.Fatal(err)
	}
	held := &heldFiles{}
	defer held.close()
	// As the capture does: CRIU writes each file into a pipe, and the
	// copy goes through the file's ReadFrom.
	feed := func(name string, data []byte) {
		t.Helper()
		var w io.WriteCloser
		if isPages(name) {
			w = held.create(name)
		} else {
			fw, err := iw.Create(name)
			if err != nil {
				t.Fatal(err)
			}
			w = fw
		}
		pr, pw, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		go func() { pw.Write(data); pw.Close() }()
		n, err := io.Copy(w, pr)
		pr.Close()
		if err != nil || n != int64(len(data)) {
			t.Fatalf("%s: %d of %d bytes: %v", name, n, len(data), err)
		}
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
	}
	feed("pages-1.img", small)
	feed("core-1.img", []byte("core"))
	feed("pages-2.img", big)
	feed("inventory.img", []byte("inventory"))
	if got, sizes := held.names(); len(got) != 2 || got[0] != "pages-1.img" || got[1] != "pages-2.img" ||
		sizes[0] != uint64(len(small)) || sizes[1] != uint64(len(big)) {
		t.Fatalf("held %v, sizes %v", got, sizes)
	}
	if err := held.send(iw); err != nil {
		t.Fatal(err)
	}
	if err := iw.Close(); err != nil {
		t.Fatal(err)
	}

	rd, err := image.NewReader(bytes.NewReader(out.Bytes()))
	if err != nil {
		t.Fatal(err)
	}
	var order []string
	files := map[string][]byte{}
	for {
		c, err := rd.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if len(order) == 0 || order[len(order)-1] != c.File {
			order = append(order, c.File)
		}
		files[c.File] = append(files[c.File], c.Data...)
	}
	want := []string{"core-1.img", "inventory.img", "pages-1.img", "pages-2.img"}
	if len(order) != len(want) {
		t.Fatalf("stream order %v, want %v", order, want)
	}
	for i := range want {
		if order[i] != want[i] {
			t.Fatalf("stream order %v, want %v", order, want)
		}
	}
	if !bytes.Equal(files["pages-2.img"], big) || !bytes.Equal(files["pages-1.img"], small) {
		t.Error("held pages came back different")
	}
	a, err := image.StreamArchive(bytes.NewReader(out.Bytes()))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	if got := a.Remaining(); len(got) != 2 {
		t.Errorf("REMAINING names %v", got)
	}
}
