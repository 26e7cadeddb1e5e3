package migrate

import (
	"bytes"
	"encoding/binary"
	"io"
	"net"
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
