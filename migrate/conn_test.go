package migrate

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"

	gproto "google.golang.org/protobuf/proto"

	pb "github.com/ferry-cr/ferry/proto"
)

// sendData writes what proto.Marshal would, and recv reads Data messages
// back without protobuf, whatever their size; other messages still go
// through protobuf.
func TestDataFastPath(t *testing.T) {
	for _, size := range []int{1, 127, 128, 16383, 16384, dataChunk} {
		p := bytes.Repeat([]byte{0xA5, 0x5A, 7}, size/3+1)[:size]
		want, err := gproto.Marshal(&pb.Envelope{Msg: &pb.Envelope_Data{Data: &pb.Data{Bytes: p}}})
		if err != nil {
			t.Fatal(err)
		}
		a, b := net.Pipe()
		ca, cb := newConn(a), newConn(b)
		go func() {
			_ = ca.sendData(p, time.Minute)
			_ = ca.send(&pb.Envelope{Msg: &pb.Envelope_DataEnd{DataEnd: &pb.DataEnd{Bytes: uint64(size)}}}, time.Minute)
		}()
		// The frame on the wire is proto.Marshal's.
		var hdr [4]byte
		if _, err := io.ReadFull(cb.r, hdr[:]); err != nil {
			t.Fatal(err)
		}
		frame := make([]byte, binary.LittleEndian.Uint32(hdr[:]))
		if _, err := io.ReadFull(cb.r, frame); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(frame, want) {
			t.Fatalf("%d bytes: sendData wrote %d bytes unlike proto.Marshal's %d", size, len(frame), len(want))
		}
		if got, ok := dataBytes(frame); !ok || !bytes.Equal(got, p) {
			t.Fatalf("%d bytes: dataBytes = %d bytes, %v", size, len(got), ok)
		}
		if m, err := cb.recv(time.Minute); err != nil || m.GetDataEnd().GetBytes() != uint64(size) {
			t.Fatalf("%d bytes: DataEnd after Data: %v, %v", size, m, err)
		}
		a.Close()
		b.Close()
	}
	// Truncated or foreign frames are left to protobuf.
	for _, bad := range [][]byte{nil, {tagEnvelopeData}, {tagEnvelopeData, 3, tagDataBytes, 5, 1}, {0x0A, 0}} {
		if _, ok := dataBytes(bad); ok {
			t.Errorf("dataBytes accepted %x", bad)
		}
	}
}

// An interruption cuts the connection for good: the send in progress on a
// stalled link fails at once, and so does every later data send or
// receive, which would otherwise set a fresh deadline and wait it out.
func TestCutOffStaysCut(t *testing.T) {
	a, b := net.Pipe() // nobody reads b: the link is stalled
	defer a.Close()
	defer b.Close()
	c := newConn(a)
	blocked := make(chan error, 1)
	go func() { blocked <- c.sendData(make([]byte, 1<<20), time.Minute) }()
	time.Sleep(50 * time.Millisecond)
	c.cutOff()
	select {
	case err := <-blocked:
		if err == nil {
			t.Fatal("a send on a stalled link succeeded")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("cutOff did not end the send in progress")
	}
	start := time.Now()
	if err := c.sendData([]byte("more"), time.Minute); !errors.Is(err, errCut) {
		t.Errorf("sendData after cutOff: %v", err)
	}
	if _, err := c.recv(time.Minute); !errors.Is(err, errCut) {
		t.Errorf("recv after cutOff: %v", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("calls after cutOff took %v", d)
	}
	c.keep()
	go func() { _, _ = b.Read(make([]byte, 64)) }()
	if err := c.send(&pb.Envelope{Msg: &pb.Envelope_Abort{Abort: &pb.Abort{Reason: "x"}}}, time.Second); err != nil {
		t.Errorf("a control message after keep: %v", err)
	}
}

// readWithin bounds the receive already waiting: a post-copy
// destination's reader waits with the restore's long deadline, and a link
// that died meanwhile must end it within a silence of the restore's end,
// not at that deadline.
func TestReadWithinBoundsTheWaitingRecv(t *testing.T) {
	a, b := net.Pipe() // b never writes: the link is dead
	defer a.Close()
	defer b.Close()
	c := newConn(a)
	got := make(chan error, 1)
	go func() {
		_, err := c.recv(10 * time.Minute)
		got <- err
	}()
	time.Sleep(50 * time.Millisecond) // the recv waits with its own deadline
	c.readWithin(100 * time.Millisecond)
	select {
	case err := <-got:
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("recv ended with %v, want its deadline", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("readWithin did not bound the recv in progress")
	}
}
