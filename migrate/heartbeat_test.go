package migrate

import (
	"net"
	"strings"
	"testing"
	"time"

	pb "github.com/ferry-cr/ferry/proto"
	gproto "google.golang.org/protobuf/proto"
)

// A source hears heartbeats while the destination restores, and its wait
// for Restored outlasts the silence bound; a destination that goes silent
// is given up after the bound, however long the restore may take.
func TestRecvWordHeartbeats(t *testing.T) {
	t.Setenv("FERRY_PEER_SILENCE", "300ms")
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	src, dst := newConn(a), newConn(b)
	go func() {
		for range 4 {
			time.Sleep(150 * time.Millisecond)
			_ = dst.send(&pb.Envelope{Msg: &pb.Envelope_Restoring{Restoring: &pb.Restoring{}}}, time.Second)
		}
		_ = dst.send(&pb.Envelope{Msg: &pb.Envelope_Restored{Restored: &pb.Restored{Name: "j"}}}, time.Second)
	}()
	t0 := time.Now()
	m, err := recvWord(src, time.Minute, true)
	if err != nil || m.GetRestored().GetName() != "j" {
		t.Fatalf("after heartbeats: %v %v, want Restored", m, err)
	}
	if d := time.Since(t0); d < 500*time.Millisecond {
		t.Fatalf("returned after %s, before the heartbeats were over", d)
	}

	// Silent: one heartbeat, then nothing.
	go func() {
		_ = dst.send(&pb.Envelope{Msg: &pb.Envelope_Restoring{Restoring: &pb.Restoring{}}}, time.Second)
	}()
	t0 = time.Now()
	_, err = recvWord(src, time.Minute, true)
	if err == nil || !strings.Contains(err.Error(), "went silent") {
		t.Fatalf("a silent destination: %v", err)
	}
	if d := time.Since(t0); d > 5*time.Second {
		t.Fatalf("gave up after %s, want about the silence bound", d)
	}
}

func TestHeartbeatSends(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	src, dst := newConn(a), newConn(b)
	got := make(chan *pb.Envelope, 1)
	go func() {
		m, _ := src.recv(10 * time.Second)
		got <- m
	}()
	stop := heartbeat(dst)
	select {
	case m := <-got:
		if m.GetRestoring() == nil {
			t.Fatalf("heartbeat sent %v", m)
		}
	case <-time.After(2 * heartbeatEvery):
		t.Fatal("no heartbeat")
	}
	stop()
}

// A heartbeat is told from every other message by its size alone (a relay
// that sees only TLS records can tell it: see test/migrate_secure_test.go,
// heartbeatRecord): 3 bytes of Envelope behind the 4-byte length.
func TestHeartbeatSize(t *testing.T) {
	b, err := gproto.Marshal(&pb.Envelope{Msg: &pb.Envelope_Restoring{Restoring: &pb.Restoring{}}})
	if err != nil || len(b) != 3 {
		t.Fatalf("a Restoring envelope is %d bytes (%v), want 3", len(b), err)
	}
	r, _ := gproto.Marshal(&pb.Envelope{Msg: &pb.Envelope_Restored{Restored: &pb.Restored{Name: "j"}}})
	if len(r) <= len(b) {
		t.Fatalf("a Restored is no longer than a heartbeat")
	}
}
