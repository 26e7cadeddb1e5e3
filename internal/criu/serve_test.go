package criu

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"

	imgstreamer "github.com/checkpoint-restore/go-criu/v7/crit/images/img-streamer"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"
)

// A served image reaches CRIU through a 16 MiB pipe even where
// fs.pipe-max-size is lower (the raise lasts while the stream is served,
// and the limit is back after), and arrives whole. The test plays CRIU's
// side of criu restore --stream.
func TestServeGrowsPipesPastTheLimit(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("raising fs.pipe-max-size needs root")
	}
	before, err := PipeMaxSize()
	if err != nil {
		t.Skip(err)
	}
	if before >= StreamPipeSize {
		t.Skipf("fs.pipe-max-size is %d here already: nothing to raise", before)
	}
	dir := t.TempDir()
	srv, err := ListenServe(dir)
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("pages of a restored job "), 1<<16)
	served := make(chan error, 1)
	go func() {
		served <- srv.Serve(context.Background(), func(name string) (func(io.Writer) error, bool) {
			if name != "pages-1.img" {
				return nil, false
			}
			return func(w io.Writer) error { _, err := w.Write(data); return err }, true
		})
	}()

	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: filepath.Join(dir, ServeSocket), Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	req, _ := proto.Marshal(&imgstreamer.ImgStreamerRequestEntry{Filename: proto.String("pages-1.img")})
	if _, err := c.Write(append(binary.LittleEndian.AppendUint32(nil, uint32(len(req))), req...)); err != nil {
		t.Fatal(err)
	}
	var n [4]byte
	if _, err := io.ReadFull(c, n[:]); err != nil {
		t.Fatal(err)
	}
	reply := make([]byte, binary.LittleEndian.Uint32(n[:]))
	if _, err := io.ReadFull(c, reply); err != nil {
		t.Fatal(err)
	}
	var r imgstreamer.ImgStreamerReplyEntry
	if err := proto.Unmarshal(reply, &r); err != nil || !r.GetExists() {
		t.Fatalf("the server's answer: %v %v", &r, err)
	}
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	rd := os.NewFile(uintptr(p[0]), "pipe")
	defer rd.Close()
	if _, _, err := c.WriteMsgUnix([]byte{0}, unix.UnixRights(p[1]), nil); err != nil {
		t.Fatal(err)
	}
	unix.Close(p[1])
	got, err := io.ReadAll(rd)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("the image came as %d bytes (%v), want %d", len(got), err, len(data))
	}
	size, err := unix.FcntlInt(uintptr(p[0]), unix.F_GETPIPE_SZ, 0)
	if err != nil || size != StreamPipeSize {
		t.Fatalf("CRIU's pipe holds %d bytes (%v), want %d", size, err, StreamPipeSize)
	}
	c.Close()
	if err := <-served; err != nil {
		t.Fatal(err)
	}
	// The raise is gone unless another ferry (a test running alongside)
	// holds one: then the last of them puts the value back.
	unlock, err := lockFile(pipeMaxLock, unix.LOCK_EX)
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	f, err := os.OpenFile(pipeMaxState, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB) != nil {
		t.Log("another ferry holds a raise of fs.pipe-max-size: not checking it went back")
		return
	}
	if after, _ := PipeMaxSize(); after >= StreamPipeSize {
		t.Fatalf("fs.pipe-max-size after the stream, with no raise held: %d (before: %d)", after, before)
	}
}
