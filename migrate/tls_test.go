package migrate

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	pb "github.com/ferry-cr/ferry/proto"
)

var (
	goodToken  = []byte("0123456789abcdef-the-shared-token")
	otherToken = []byte("fedcba9876543210-another-token!!")
)

// pair runs the server's handshake on one end of a loopback TCP
// connection and the client's on the other.
func pair(t *testing.T, sv *Server, token []byte, pki PKI) (srvErr, cliErr error, cli *conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	done := make(chan error, 1)
	go func() {
		nc, err := ln.Accept()
		if err != nil {
			done <- err
			return
		}
		defer nc.Close()
		_, err = sv.authenticate(nc)
		done <- err
	}()
	nc, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	c, _, cliErr := clientHandshake(nc, token, pki, "127.0.0.1")
	return <-done, cliErr, c
}

func TestHandshakeProvesBothWays(t *testing.T) {
	sv := &Server{Token: goodToken, Caps: Capabilities{LazyPages: true}}
	srvErr, cliErr, c := pair(t, sv, goodToken, PKI{})
	if srvErr != nil || cliErr != nil {
		t.Fatalf("same token: server %v, client %v", srvErr, cliErr)
	}
	if _, ok := c.c.(*tls.Conn); !ok || c.limit != maxMessage {
		t.Fatalf("the link after the handshake: %T, limit %d", c.c, c.limit)
	}
	if v := c.c.(*tls.Conn).ConnectionState().Version; v != tls.VersionTLS13 {
		t.Fatalf("TLS version %x", v)
	}
	srvErr, cliErr, _ = pair(t, sv, otherToken, PKI{})
	if srvErr == nil || !errors.Is(cliErr, ErrAuth) || !strings.Contains(cliErr.Error(), "wrong token") {
		t.Fatalf("wrong token: server %v, client %v", srvErr, cliErr)
	}
}

// fakeDest is a destination that runs TLS and the preamble like ferry
// serve but holds no token: it accepts any proof and answers with proof
// (nil: a random one). It returns what it received inside TLS after the
// source's Auth.
func fakeDest(t *testing.T, nc net.Conn, proofFor func(tls.ConnectionState) []byte) []*pb.Envelope {
	t.Helper()
	_ = nc.SetDeadline(time.Now().Add(10 * time.Second))
	if err := writeFrame(nc, &pb.Envelope{Msg: &pb.Envelope_Hello{Hello: &pb.Hello{Version: ProtocolVersion}}}); err != nil {
		t.Error(err)
		return nil
	}
	cfg, _ := PKI{}.tlsConfig(true, "")
	tc := tls.Server(nc, cfg)
	if err := tc.Handshake(); err != nil {
		t.Error(err)
		return nil
	}
	c := newConn(tc)
	if _, err := c.recv(5 * time.Second); err != nil {
		t.Error(err)
		return nil
	}
	p := make([]byte, 32)
	if proofFor != nil {
		p = proofFor(tc.ConnectionState())
	}
	_ = c.send(&pb.Envelope{Msg: &pb.Envelope_Hello{Hello: &pb.Hello{Version: ProtocolVersion, Proof: p,
		Capabilities: &pb.Capabilities{LazyPages: true, EarlyRestore: true, Prepares: true}}}}, 5*time.Second)
	var got []*pb.Envelope
	for {
		m, err := c.recv(2 * time.Second)
		var ab *abortError
		if errors.As(err, &ab) {
			got = append(got, &pb.Envelope{Msg: &pb.Envelope_Abort{Abort: &pb.Abort{Reason: ab.reason}}})
			continue
		}
		if err != nil {
			return got
		}
		got = append(got, m)
	}
}

// A destination that cannot prove the token, or proves it for another
// session (a relay forwarding a real destination's proof), is refused
// before the source says anything of a job.
func TestImpostorDestinationGetsNothing(t *testing.T) {
	for name, proofFor := range map[string]func(tls.ConnectionState) []byte{
		"random proof": nil,
		"the source's own proof reflected": func(cs tls.ConnectionState) []byte {
			p, _ := proof(goodToken, proofSource, cs)
			return p
		},
		"a proof of another session": func(tls.ConnectionState) []byte {
			p, _ := proof(goodToken, proofDest, fakeState(t))
			return p
		},
	} {
		t.Run(name, func(t *testing.T) {
			a, b := net.Pipe()
			defer a.Close()
			got := make(chan []*pb.Envelope, 1)
			go func() { defer b.Close(); got <- fakeDest(t, b, proofFor) }()
			_, _, err := clientHandshake(a, goodToken, PKI{}, "")
			if !errors.Is(err, ErrAuth) || !strings.Contains(err.Error(), "did not prove") {
				t.Fatalf("handshake with an impostor: %v", err)
			}
			a.Close()
			for _, m := range <-got {
				if m.GetAbort() == nil {
					t.Fatalf("the impostor received %T", m.GetMsg())
				}
			}
		})
	}
}

// fakeState is the state of a real TLS 1.3 session between two other
// ends.
func fakeState(t *testing.T) tls.ConnectionState {
	t.Helper()
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	scfg, _ := PKI{}.tlsConfig(true, "")
	ccfg, _ := PKI{}.tlsConfig(false, "")
	go func() { _ = tls.Server(a, scfg).Handshake() }()
	tc := tls.Client(b, ccfg)
	if err := tc.Handshake(); err != nil {
		t.Fatal(err)
	}
	return tc.ConnectionState()
}

// A relay that ends TLS on each side and forwards the proofs both ways
// gets neither accepted: each proof is bound to the session it was made
// in.
func TestRelayCannotPassProofs(t *testing.T) {
	sv := &Server{Token: goodToken}
	srvA, srvB := net.Pipe() // relay <-> real destination
	cliA, cliB := net.Pipe() // source <-> relay
	srvDone := make(chan error, 1)
	go func() { defer srvB.Close(); _, err := sv.authenticate(srvB); srvDone <- err }()
	relayDone := make(chan string, 1)
	go func() {
		defer cliB.Close()
		defer srvA.Close()
		// Towards the destination: a source.
		if _, err := readFrame(srvA); err != nil {
			relayDone <- err.Error()
			return
		}
		ccfg, _ := PKI{}.tlsConfig(false, "")
		up := tls.Client(srvA, ccfg)
		if err := up.Handshake(); err != nil {
			relayDone <- err.Error()
			return
		}
		// Towards the source: a destination.
		_ = writeFrame(cliB, &pb.Envelope{Msg: &pb.Envelope_Hello{Hello: &pb.Hello{Version: ProtocolVersion}}})
		scfg, _ := PKI{}.tlsConfig(true, "")
		down := tls.Server(cliB, scfg)
		if err := down.Handshake(); err != nil {
			relayDone <- err.Error()
			return
		}
		u, d := newConn(up), newConn(down)
		auth, err := d.recv(5 * time.Second)
		if err != nil {
			relayDone <- err.Error()
			return
		}
		_ = u.send(auth, 5*time.Second)
		reply, err := u.recv(5 * time.Second)
		if err != nil {
			relayDone <- "destination: " + err.Error()
			return
		}
		_ = d.send(reply, 5*time.Second)
		// Whatever the destination said, try an offer of our own.
		err = u.send(&pb.Envelope{Msg: &pb.Envelope_Offer{Offer: &pb.Offer{Job: "evil", Mode: "stop-copy"}}}, 5*time.Second)
		if err == nil {
			_, err = u.recv(5 * time.Second)
		}
		relayDone <- "offer: " + errString(err)
	}()
	_, _, err := clientHandshake(cliA, goodToken, PKI{}, "")
	cliA.Close()
	if !errors.Is(err, ErrAuth) {
		t.Fatalf("source through a relay: %v", err)
	}
	if err := <-srvDone; err == nil || !strings.Contains(err.Error(), "wrong token") {
		t.Fatalf("destination through a relay: %v", err)
	}
	if r := <-relayDone; !strings.Contains(r, "offer: ") || strings.HasSuffix(r, "offer: <nil>") {
		t.Fatalf("the relay's own offer: %s", r)
	}
}

func errString(err error) string {
	if err == nil {
		return "<nil>"
	}
	return err.Error()
}

// A peer of protocol 3 is refused by both sides with the versions named;
// the old one hears why.
func TestOldProtocolRefused(t *testing.T) {
	t.Run("old source", func(t *testing.T) {
		a, b := net.Pipe()
		sv := &Server{Token: goodToken}
		done := make(chan error, 1)
		go func() { defer a.Close(); _, err := sv.authenticate(a); done <- err }()
		// What a version 3 source does: read the Hello, refuse its version.
		m, err := readFrame(b)
		if err != nil || m.GetHello().GetVersion() != ProtocolVersion || len(m.GetHello().GetNonce()) != 0 || m.GetHello().GetCapabilities() != nil {
			t.Fatalf("the clear-text hello: %v, %v", m, err)
		}
		_ = writeFrame(b, &pb.Envelope{Msg: &pb.Envelope_Abort{Abort: &pb.Abort{Reason: "protocol version 4, this source speaks 3"}}})
		err = <-done
		b.Close()
		if !errors.Is(err, ErrVersion) || !strings.Contains(err.Error(), "speaks 3") {
			t.Fatalf("serve with an old source: %v", err)
		}
	})
	t.Run("old destination", func(t *testing.T) {
		a, b := net.Pipe()
		got := make(chan *pb.Envelope, 1)
		go func() {
			defer b.Close()
			_ = writeFrame(b, &pb.Envelope{Msg: &pb.Envelope_Hello{Hello: &pb.Hello{Version: 3, Nonce: make([]byte, 32), Host: "old"}}})
			m, _ := readFrame(b)
			got <- m
		}()
		_, _, err := clientHandshake(a, goodToken, PKI{}, "")
		a.Close()
		if !errors.Is(err, ErrVersion) || !strings.Contains(err.Error(), "speaks migration protocol 3, this ferry 4") {
			t.Fatalf("source with an old destination: %v", err)
		}
		if m := <-got; !strings.Contains(m.GetAbort().GetReason(), "protocol version 3, this source speaks 4") {
			t.Fatalf("the old destination heard %v", m)
		}
	})
}

// Before the proof, a message of more than a few KiB is refused without
// being read, and nothing larger is buffered.
func TestHandshakeLimits(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	sv := &Server{Token: goodToken}
	done := make(chan error, 1)
	go func() { defer b.Close(); _, err := sv.authenticate(b); done <- err }()
	if _, err := readFrame(a); err != nil {
		t.Fatal(err)
	}
	ccfg, _ := PKI{}.tlsConfig(false, "")
	tc := tls.Client(a, ccfg)
	if err := tc.Handshake(); err != nil {
		t.Fatal(err)
	}
	// A frame that claims 4 MiB, then some of it.
	go func() { _, _ = tc.Write(append([]byte{0, 0, 0x40, 0}, make([]byte, 64<<10)...)) }()
	if err := <-done; err == nil || !strings.Contains(err.Error(), "limit 4096") {
		t.Fatalf("a large message before the proof: %v", err)
	}
}

func TestPendingCaps(t *testing.T) {
	var p pending
	addr := func(s string) net.Addr { a, _ := net.ResolveTCPAddr("tcp", s); return a }
	var rel []func()
	for i := range 3 {
		r, ok := p.admit(addr("10.0.0.1:1"), 5, 3)
		if !ok {
			t.Fatalf("connection %d of a host refused", i)
		}
		rel = append(rel, r)
	}
	if _, ok := p.admit(addr("10.0.0.1:2"), 5, 3); ok {
		t.Fatal("a 4th connection of one host let in (per-host cap 3)")
	}
	for i := range 2 {
		if _, ok := p.admit(addr("10.0.0.2:1"), 5, 3); !ok {
			t.Fatalf("another host's connection %d refused", i)
		}
	}
	if _, ok := p.admit(addr("10.0.0.3:1"), 5, 3); ok {
		t.Fatal("a 6th connection let in (cap 5)")
	}
	// IPv6 addresses of one /64 are one host.
	var p6 pending
	for i := range 3 {
		if _, ok := p6.admit(addr(fmt.Sprintf("[2001:db8::%d]:1", i+1)), 5, 2); ok != (i < 2) {
			t.Fatalf("IPv6 connection %d of one /64: let in %v", i, ok)
		}
	}
	rel[0]()
	rel[0]() // twice gives back one place
	if _, ok := p.admit(addr("10.0.0.3:1"), 5, 3); !ok {
		t.Fatal("a released place was not given back")
	}
	if _, ok := p.admit(addr("10.0.0.3:1"), 5, 3); ok {
		t.Fatal("a release counted twice")
	}
}

// flakyListener fails its first accepts as a process out of descriptors
// does, then hands out real connections.
type flakyListener struct {
	net.Listener
	mu    sync.Mutex
	fails int
}

func (l *flakyListener) Accept() (net.Conn, error) {
	l.mu.Lock()
	if l.fails > 0 {
		l.fails--
		l.mu.Unlock()
		return nil, &net.OpError{Op: "accept", Net: "tcp", Err: syscall.EMFILE}
	}
	l.mu.Unlock()
	return l.Listener.Accept()
}

// EMFILE pauses Serve; it does not end it.
func TestServeSurvivesAcceptErrors(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	fl := &flakyListener{Listener: ln, fails: 10}
	sv := &Server{Token: goodToken, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- sv.Serve(ctx, fl) }()
	nc, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	if _, _, err := clientHandshake(nc, goodToken, PKI{}, ""); err != nil {
		t.Fatalf("a handshake after 10 failed accepts: %v", err)
	}
	select {
	case err := <-served:
		t.Fatalf("Serve returned: %v", err)
	default:
	}
	cancel()
	select {
	case err := <-served:
		if err != nil {
			t.Fatalf("Serve after cancel: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Serve did not return after cancel")
	}
}

// pkiFiles writes a CA and, for each name, a certificate it signed for
// 127.0.0.1 (PEM files in dir), and returns their paths: ca, then cert and
// key per name.
func pkiFiles(t *testing.T, dir string, names ...string) (string, map[string][2]string) {
	t.Helper()
	caPub, caKey, _ := ed25519.GenerateKey(rand.Reader)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caPub, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	write := func(name, typ string, der []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	ca := write("ca.pem", "CERTIFICATE", caDER)
	out := map[string][2]string{}
	for i, n := range names {
		pub, key, _ := ed25519.GenerateKey(rand.Reader)
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(int64(2 + i)), Subject: pkix.Name{CommonName: n},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
			IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, KeyUsage: x509.KeyUsageDigitalSignature,
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, pub, caKey)
		if err != nil {
			t.Fatal(err)
		}
		kb, _ := x509.MarshalPKCS8PrivateKey(key)
		out[n] = [2]string{write(n+".pem", "CERTIFICATE", der), write(n+".key", "PRIVATE KEY", kb)}
	}
	return ca, out
}

// Certificates add to the token: under a CA, a peer needs both a
// certificate the CA issued and the token.
func TestPKIAddsToTheToken(t *testing.T) {
	dir := t.TempDir()
	ca, certs := pkiFiles(t, dir, "dest", "src")
	_, strangers := pkiFiles(t, t.TempDir(), "stranger")
	load := func(c [2]string, ca string) PKI {
		p, err := LoadPKI(c[0], c[1], ca)
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	sv := &Server{Token: goodToken, PKI: load(certs["dest"], ca)}
	if srvErr, cliErr, _ := pair(t, sv, goodToken, load(certs["src"], ca)); srvErr != nil || cliErr != nil {
		t.Fatalf("CA-issued certificates and the token: server %v, client %v", srvErr, cliErr)
	}
	if srvErr, cliErr, _ := pair(t, sv, otherToken, load(certs["src"], ca)); srvErr == nil || !errors.Is(cliErr, ErrAuth) {
		t.Fatalf("CA-issued certificates, wrong token: server %v, client %v", srvErr, cliErr)
	}
	if srvErr, cliErr, _ := pair(t, sv, goodToken, load(strangers["stranger"], ca)); srvErr == nil || !errors.Is(cliErr, ErrAuth) {
		t.Fatalf("a certificate of another CA: server %v, client %v", srvErr, cliErr)
	}
	if srvErr, cliErr, _ := pair(t, sv, goodToken, PKI{}); srvErr == nil || !errors.Is(cliErr, ErrAuth) {
		t.Fatalf("no certificate: server %v, client %v", srvErr, cliErr)
	}
	// The source checks the destination's certificate against the CA too.
	sv = &Server{Token: goodToken, PKI: load(strangers["stranger"], "")}
	if _, cliErr, _ := pair(t, sv, goodToken, load(certs["src"], ca)); !errors.Is(cliErr, ErrAuth) || !strings.Contains(cliErr.Error(), "certificate") {
		t.Fatalf("a destination with a certificate of another CA: %v", cliErr)
	}
	if _, err := LoadPKI(certs["src"][0], "", ""); err == nil {
		t.Fatal("--tls-cert without --tls-key accepted")
	}
}

// A flood of refusals logs ten lines a second, then says how many it
// left out.
func TestRefusalLogLimit(t *testing.T) {
	var r rateLimit
	logged := 0
	for range 25 {
		if _, ok := r.allow(); ok {
			logged++
		}
	}
	if logged != 10 {
		t.Fatalf("%d of 25 refusals in a second logged, want 10", logged)
	}
	r.second = r.second.Add(-time.Second) // a second later
	if n, ok := r.allow(); !ok || n != 15 {
		t.Fatalf("the next second: %d left out, %v", n, ok)
	}
}
