package test

// The secure migration link, tried as an attacker would: an impostor
// destination, a relay in the middle, a byte flipped in flight, a
// recording relay, peers of the old protocol, floods of connections that
// never prove the token, and local users near the destination's relays.

import (
	"bufio"
	"bytes"
	"crypto/ed25519"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	gproto "google.golang.org/protobuf/proto"

	pb "github.com/ferry-cr/ferry/proto"
)

// The protocol as package migrate documents it, written out again here so
// that the tests check the documented protocol, not the code's own idea.
const (
	secVersion       = 4
	secExporterLabel = "EXPORTER-ferry-migrate"
	secProofSource   = "ferry-migrate v4 source"
	secProofDest     = "ferry-migrate v4 destination"
)

func secProof(token []byte, label string, cs tls.ConnectionState) []byte {
	ekm, err := cs.ExportKeyingMaterial(secExporterLabel, nil, 32)
	if err != nil {
		panic(err)
	}
	h := hmac.New(sha256.New, token)
	h.Write([]byte(label))
	h.Write([]byte{0})
	h.Write(ekm)
	return h.Sum(nil)
}

// secCert is a throwaway self-signed certificate.
func secCert(t *testing.T) tls.Certificate {
	t.Helper()
	pub, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, pub, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

func secTLS(t *testing.T) *tls.Config {
	cert := secCert(t)
	return &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert},
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil },
		ClientAuth:           tls.RequireAnyClientCert, InsecureSkipVerify: true}
}

func secWrite(w io.Writer, m *pb.Envelope) error {
	b, err := gproto.Marshal(m)
	if err != nil {
		return err
	}
	_, err = w.Write(append(binary.LittleEndian.AppendUint32(nil, uint32(len(b))), b...))
	return err
}

func secRead(r io.Reader) (*pb.Envelope, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err
	}
	n := binary.LittleEndian.Uint32(hdr[:])
	if n > 8<<20 {
		return nil, fmt.Errorf("frame of %d bytes", n)
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(r, b); err != nil {
		return nil, err
	}
	m := &pb.Envelope{}
	return m, gproto.Unmarshal(b, m)
}

// secServerSide plays a destination up to TLS: the clear-text Hello, then
// the TLS server handshake.
func secServerSide(t *testing.T, nc net.Conn) (*tls.Conn, error) {
	if err := secWrite(nc, &pb.Envelope{Msg: &pb.Envelope_Hello{Hello: &pb.Hello{Version: secVersion}}}); err != nil {
		return nil, err
	}
	tc := tls.Server(nc, secTLS(t))
	return tc, tc.Handshake()
}

// secClientSide plays a source up to TLS.
func secClientSide(t *testing.T, nc net.Conn) (*tls.Conn, error) {
	m, err := secRead(nc)
	if err != nil {
		return nil, err
	}
	if v := m.GetHello().GetVersion(); v != secVersion {
		return nil, fmt.Errorf("clear-text hello of version %d", v)
	}
	tc := tls.Client(nc, secTLS(t))
	return tc, tc.Handshake()
}

// listenIn serves each connection on addr (in namespace ns) with handle
// until the test ends.
func listenIn(t *testing.T, ns, addr string, handle func(net.Conn)) {
	t.Helper()
	var ln net.Listener
	if err := inNetns(t, ns, func() (err error) { ln, err = net.Listen("tcp", addr); return err }); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() { defer c.Close(); handle(c) })
		}
	}()
}

// dialIn connects to addr from namespace ns, from local address from
// (empty: any).
func dialIn(t *testing.T, ns, addr, from string) (net.Conn, error) {
	var c net.Conn
	err := inNetns(t, ns, func() (err error) {
		d := net.Dialer{Timeout: 5 * time.Second}
		d.SetMultipathTCP(false) // plain TCP, which CRIU can carry
		if from != "" {
			d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(from)}
		}
		c, err = d.Dial("tcp", addr)
		return err
	})
	return c, err
}

// secJob starts job name on src (in namespace ns) with canary in its
// environment, hence in its memory, and returns its first sum.
func secJob(t *testing.T, src *env, ns, w, name, mib, canary string) string {
	t.Helper()
	if r := src.runFerry([]string{"nsenter", "--net=/run/netns/" + ns}, []string{"FERRY_TEST_CANARY=" + canary},
		"run", "--name", name, "--", w, "memory", mib); r.code != 0 {
		t.Fatalf("run: %s", r)
	}
	src.waitLines(name, "verify ", 1)
	return src.lines(name, "sum ")[0]
}

func newCanary() string {
	b := make([]byte, 12)
	_, _ = rand.Read(b)
	return "ferry-canary-" + hex.EncodeToString(b)
}

// assertNothingRunsOn fails unless every job of dest has exited.
func assertNothingRunsOn(t *testing.T, dest *env) {
	t.Helper()
	eventually(t, 20*time.Second, "nothing to run on the destination", func() bool {
		for _, v := range dest.list() {
			if v.State != "exited" {
				return false
			}
		}
		return true
	})
}

func TestMigrateSecure(t *testing.T) {
	requireCriu(t)
	w := buildWorkload(t)
	h := newHosts(t)
	src, dst := newEnv(t), newEnv(t)
	tokenText := "correct horse battery staple 42"
	token := writeToken(t, tokenText)
	listen := net.JoinHostPort(h.addrB, "7200")
	srv := dst.serve(h.b, listen, token)
	canary := newCanary()
	sum := secJob(t, src, h.a, w, "sj", "16", canary)

	t.Run("an impostor destination gets nothing of the job and is refused", func(t *testing.T) {
		// It speaks the protocol but holds no token: it takes any proof
		// and answers with a made-up one.
		var mu sync.Mutex
		var got []string
		var raw bytes.Buffer
		imp := net.JoinHostPort(h.addrB, "7201")
		listenIn(t, h.b, imp, func(nc net.Conn) {
			_ = nc.SetDeadline(time.Now().Add(60 * time.Second))
			tc, err := secServerSide(t, nc)
			if err != nil {
				return
			}
			r := io.TeeReader(tc, &lockedWriter{&mu, &raw})
			if _, err := secRead(r); err != nil { // the source's Auth
				return
			}
			fake := make([]byte, 32)
			_, _ = rand.Read(fake)
			_ = secWrite(tc, &pb.Envelope{Msg: &pb.Envelope_Hello{Hello: &pb.Hello{Version: secVersion, Proof: fake,
				Capabilities: &pb.Capabilities{LazyPages: true, EarlyRestore: true, Prepares: true}}}})
			for {
				m, err := secRead(r)
				if err != nil {
					return
				}
				mu.Lock()
				got = append(got, fmt.Sprintf("%T", m.GetMsg()))
				mu.Unlock()
			}
		})
		before, _ := src.verifyLines("sj")
		r := src.ferryIn(h.a, "migrate", "sj", "--to", imp, "--token-file", token, "--mode", "stop-copy", "--compress", "none")
		if r.code != 20 || !strings.Contains(r.stderr, "did not prove it holds the token") || strings.Count(strings.TrimSpace(r.stderr), "\n") != 0 {
			t.Fatalf("migrate to an impostor: %s", r)
		}
		t.Log(r.stderr)
		time.Sleep(200 * time.Millisecond) // the impostor reads what came
		mu.Lock()
		defer mu.Unlock()
		for _, m := range got {
			if m != "*proto.Envelope_Abort" {
				t.Errorf("the impostor received %s after the handshake", m)
			}
		}
		if bytes.Contains(raw.Bytes(), []byte("sj")) || bytes.Contains(raw.Bytes(), []byte(canary)) {
			t.Errorf("the impostor learnt of the job: %q", raw.Bytes())
		}
		assertKeptHere(t, src, dst, "sj", sum, before)
	})

	t.Run("a relay in the middle can neither pass the proofs nor offer its own job", func(t *testing.T) {
		relayAddr := net.JoinHostPort(h.addrB, "7202")
		offered := make(chan error, 1)
		listenIn(t, h.b, relayAddr, func(down net.Conn) {
			_ = down.SetDeadline(time.Now().Add(60 * time.Second))
			upRaw, err := dialIn(t, h.b, listen, "")
			if err != nil {
				offered <- err
				return
			}
			defer upRaw.Close()
			_ = upRaw.SetDeadline(time.Now().Add(60 * time.Second))
			up, err := secClientSide(t, upRaw)
			if err != nil {
				offered <- err
				return
			}
			dn, err := secServerSide(t, down)
			if err != nil {
				offered <- err
				return
			}
			// Forward the source's proof, and the destination's answer.
			auth, err := secRead(dn)
			if err == nil {
				err = secWrite(up, auth)
			}
			if err != nil {
				offered <- err
				return
			}
			if reply, err := secRead(up); err == nil {
				_ = secWrite(dn, reply)
			}
			// Then push a job of our own.
			err = secWrite(up, &pb.Envelope{Msg: &pb.Envelope_Offer{Offer: &pb.Offer{Job: "evil", Mode: "stop-copy"}}})
			if err == nil {
				_ = secWrite(up, &pb.Envelope{Msg: &pb.Envelope_Data{Data: &pb.Data{Bytes: []byte("not a checkpoint")}}})
				var m *pb.Envelope
				if m, err = secRead(up); err == nil {
					err = fmt.Errorf("the destination answered the relay's offer: %v", m)
				}
			}
			offered <- err
		})
		before, _ := src.verifyLines("sj")
		r := src.ferryIn(h.a, "migrate", "sj", "--to", relayAddr, "--token-file", token, "--mode", "stop-copy")
		if r.code != 20 {
			t.Fatalf("migrate through a relay: %s", r)
		}
		t.Log(r.stderr)
		select {
		case err := <-offered:
			if err == nil || strings.Contains(err.Error(), "answered the relay's offer") {
				t.Fatalf("the relay's own offer: %v", err)
			}
			t.Logf("the relay's offer: %v", err)
		case <-time.After(30 * time.Second):
			t.Fatal("the relay never finished")
		}
		eventually(t, 5*time.Second, "the refusal in the serve log", func() bool {
			return strings.Contains(srv.text(), "relay in the middle")
		})
		if l := dst.list(); len(l) != 0 {
			t.Fatalf("the destination has jobs after a relayed attempt: %v", l)
		}
		assertKeptHere(t, src, dst, "sj", sum, before)
	})

	t.Run("one byte flipped in flight fails the migration cleanly", func(t *testing.T) {
		via := net.JoinHostPort(h.addrB, "7203")
		stop := proxy(t, h.b, via, listen, func(c, d net.Conn) {
			defer c.Close()
			defer d.Close()
			go func() { _, _ = io.Copy(c, d) }()
			// Flip one bit 2 MiB into the source's bytes: inside the
			// image stream.
			if _, err := io.CopyN(d, c, 2<<20); err != nil {
				return
			}
			b := make([]byte, 1)
			if _, err := io.ReadFull(c, b); err != nil {
				return
			}
			b[0] ^= 0x10
			if _, err := d.Write(b); err != nil {
				return
			}
			_, _ = io.Copy(d, c)
		})
		defer stop()
		before, _ := src.verifyLines("sj")
		r := src.ferryIn(h.a, "migrate", "sj", "--to", via, "--token-file", token, "--mode", "stop-copy", "--compress", "none")
		if r.code != 19 || !strings.Contains(r.stderr, "keeps running here") {
			t.Fatalf("migrate with a flipped byte: %s", r)
		}
		t.Log(r.stderr)
		assertNothingRunsOn(t, dst)
		assertKeptHere(t, src, dst, "sj", sum, before)
	})

	t.Run("certificates add to the token, never replace it", func(t *testing.T) {
		dir := t.TempDir()
		ca := secCA(t, dir, "ca")
		dcert, dkey := ca.issue(t, dir, "dest", h.addrB)
		scert, skey := ca.issue(t, dir, "src", h.addrA)
		other := secCA(t, dir, "other")
		ocert, okey := other.issue(t, dir, "stranger", h.addrA)
		pkiListen := net.JoinHostPort(h.addrB, "7205")
		pkiDst := newEnv(t)
		pkiDst.serveWith(h.b, pkiListen, token, []string{"--tls-cert", dcert, "--tls-key", dkey, "--tls-ca", ca.path})
		bad := writeToken(t, "not the token, but long enough")
		before, _ := src.verifyLines("sj")
		for what, args := range map[string][]string{
			"no certificate":                         {"--token-file", token},
			"a certificate of another CA":            {"--token-file", token, "--tls-cert", ocert, "--tls-key", okey, "--tls-ca", ca.path},
			"the CA's certificate but a wrong token": {"--token-file", bad, "--tls-cert", scert, "--tls-key", skey, "--tls-ca", ca.path},
		} {
			r := src.ferryIn(h.a, append([]string{"migrate", "sj", "--to", pkiListen, "--mode", "stop-copy"}, args...)...)
			if r.code != 20 {
				t.Fatalf("%s: %s", what, r)
			}
			t.Logf("%s: %s", what, strings.TrimSpace(r.stderr))
		}
		if l := pkiDst.list(); len(l) != 0 {
			t.Fatalf("the destination has jobs: %v", l)
		}
		assertKeptHere(t, src, pkiDst, "sj", sum, before)
	})

	t.Run("a recording relay finds no clear text of the job's memory", func(t *testing.T) {
		// The canary is in the job's memory: a plain checkpoint shows it.
		plain := filepath.Join(t.TempDir(), "plain.ferry")
		if r := src.ferryIn(h.a, "checkpoint", "sj", "-o", plain, "--leave-running", "--compress", "none"); r.code != 0 {
			t.Fatalf("checkpoint: %s", r)
		}
		if b, _ := os.ReadFile(plain); !bytes.Contains(b, []byte(canary)) {
			t.Fatal("the canary is not in the job's checkpoint: this test would prove nothing")
		}
		var rec bytes.Buffer
		var mu sync.Mutex
		via := net.JoinHostPort(h.addrB, "7204")
		stop := proxy(t, h.b, via, listen, func(c, d net.Conn) {
			defer c.Close()
			defer d.Close()
			go func() { _, _ = io.Copy(io.MultiWriter(c, &lockedWriter{&mu, &rec}), d) }()
			_, _ = io.Copy(io.MultiWriter(d, &lockedWriter{&mu, &rec}), c)
		})
		before, _ := src.verifyLines("sj")
		r := src.ferryIn(h.a, "migrate", "sj", "--to", via, "--token-file", token, "--mode", "stop-copy", "--compress", "none")
		stop()
		if r.code != 0 {
			t.Fatalf("migrate through a recording relay: %s", r)
		}
		dst.assertContinues("sj", sum, before[len(before)-1])
		mu.Lock()
		defer mu.Unlock()
		if rec.Len() < 4<<20 {
			t.Fatalf("the relay recorded only %d bytes", rec.Len())
		}
		if bytes.Contains(rec.Bytes(), []byte(canary)) {
			t.Fatal("the job's memory crossed the link in clear text")
		}
		if bytes.Contains(rec.Bytes(), []byte(tokenText)) {
			t.Fatal("the token crossed the link")
		}
	})
}

// secAuthority is a test CA.
type secAuthority struct {
	path string
	cert *x509.Certificate
	key  ed25519.PrivateKey
}

func secPEM(t *testing.T, path, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

func secCA(t *testing.T, dir, name string) *secAuthority {
	t.Helper()
	pub, key, _ := ed25519.GenerateKey(rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, pub, key)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	a := &secAuthority{path: filepath.Join(dir, name+".pem"), cert: c, key: key}
	secPEM(t, a.path, "CERTIFICATE", der)
	return a
}

// issue writes a certificate for ip and its key, and returns their paths.
func (a *secAuthority) issue(t *testing.T, dir, name, ip string) (string, string) {
	t.Helper()
	pub, key, _ := ed25519.GenerateKey(rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP(ip)}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, a.cert, pub, a.key)
	if err != nil {
		t.Fatal(err)
	}
	kb, _ := x509.MarshalPKCS8PrivateKey(key)
	cert, keyPath := filepath.Join(dir, name+".pem"), filepath.Join(dir, name+".key")
	secPEM(t, cert, "CERTIFICATE", der)
	secPEM(t, keyPath, "PRIVATE KEY", kb)
	return cert, keyPath
}

type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(b)
}

// A peer of the old protocol (3: authentication in clear, no TLS) is
// refused by both sides, each with one line naming both versions.
func TestMigrateOldPeer(t *testing.T) {
	requireCriu(t)
	w := buildWorkload(t)
	h := newHosts(t)
	src, dst := newEnv(t), newEnv(t)
	token := writeToken(t, "correct horse battery staple 42")
	listen := net.JoinHostPort(h.addrB, "7210")
	srv := dst.serve(h.b, listen, token)

	t.Run("an old destination", func(t *testing.T) {
		sum := secJob(t, src, h.a, w, "oj", "8", newCanary())
		heard := make(chan *pb.Envelope, 1)
		old := net.JoinHostPort(h.addrB, "7211")
		listenIn(t, h.b, old, func(nc net.Conn) {
			_ = nc.SetDeadline(time.Now().Add(30 * time.Second))
			// What a version 3 serve says first, in clear.
			_ = secWrite(nc, &pb.Envelope{Msg: &pb.Envelope_Hello{Hello: &pb.Hello{Version: 3, Nonce: make([]byte, 32), Host: "old",
				Capabilities: &pb.Capabilities{LazyPages: true}}}})
			m, _ := secRead(nc)
			heard <- m
		})
		before, _ := src.verifyLines("oj")
		r := src.ferryIn(h.a, "migrate", "oj", "--to", old, "--token-file", token)
		if r.code != 29 || !strings.Contains(r.stderr, "speaks migration protocol 3, this ferry 4") || strings.Count(strings.TrimSpace(r.stderr), "\n") != 0 {
			t.Fatalf("migrate to an old destination: %s", r)
		}
		t.Log(r.stderr)
		if m := <-heard; !strings.Contains(m.GetAbort().GetReason(), "protocol version 3, this source speaks 4") {
			t.Fatalf("the old destination heard %v", m)
		}
		assertKeptHere(t, src, dst, "oj", sum, before)
	})

	t.Run("an old source", func(t *testing.T) {
		nc, err := dialIn(t, h.a, listen, "")
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		_ = nc.SetDeadline(time.Now().Add(30 * time.Second))
		// What a version 3 source does with a Hello of another version.
		m, err := secRead(nc)
		if err != nil || m.GetHello().GetVersion() != secVersion {
			t.Fatalf("serve's first message: %v, %v", m, err)
		}
		if len(m.GetHello().GetNonce()) != 0 || m.GetHello().GetHost() != "" || m.GetHello().GetCapabilities() != nil {
			t.Errorf("serve told a stranger more than its version in clear: %v", m)
		}
		_ = secWrite(nc, &pb.Envelope{Msg: &pb.Envelope_Abort{Abort: &pb.Abort{Reason: "protocol version 4, this source speaks 3"}}})
		eventually(t, 10*time.Second, "serve to log the refusal", func() bool {
			return strings.Contains(srv.text(), "refused a migration") && strings.Contains(srv.text(), "this source speaks 3")
		})
		for _, l := range strings.Split(srv.text(), "\n") {
			if strings.Contains(l, "this source speaks 3") {
				t.Log(l)
			}
		}
	})
}

// serveProc starts `ferry serve` in namespace ns under sh (first runs
// before it, e.g. a ulimit) and returns its process and log.
func (e *env) serveProc(ns, listen, token, first string, args ...string) (*exec.Cmd, *server) {
	e.t.Helper()
	s := &server{log: filepath.Join(e.t.TempDir(), "serve.log")}
	f, err := os.Create(s.log)
	if err != nil {
		e.t.Fatal(err)
	}
	defer f.Close()
	line := first + ` exec "$0" "$@"`
	cmd := exec.Command("nsenter", append([]string{"--net=/run/netns/" + ns, "sh", "-c", line, ferryBin, "--root", e.root,
		"serve", "--listen", listen, "--token-file", token}, args...)...)
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	s.pid = cmd.Process.Pid
	reapLazyDaemonsAtEnd(e.t, s.pid)
	e.t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	eventually(e.t, 10*time.Second, "ferry serve to listen", func() bool { return strings.Contains(s.text(), "serving migrations") })
	return cmd, s
}

// procStatus reads one "Key: N kB" field of /proc/PID/status.
func procStatus(t *testing.T, pid int, key string) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, key+":"); ok {
			n, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return n << 10
		}
	}
	t.Fatalf("no %s in /proc/%d/status", key, pid)
	return 0
}

// secHandshake runs a source's whole handshake over nc with token and
// returns the destination's Hello.
func secHandshake(t *testing.T, nc net.Conn, token []byte) (*pb.Hello, error) {
	tc, err := secClientSide(t, nc)
	if err != nil {
		return nil, err
	}
	if err := secWrite(tc, &pb.Envelope{Msg: &pb.Envelope_Auth{Auth: &pb.Auth{Version: secVersion, Mac: secProof(token, secProofSource, tc.ConnectionState())}}}); err != nil {
		return nil, err
	}
	m, err := secRead(tc)
	if err != nil {
		return nil, err
	}
	if !hmac.Equal(m.GetHello().GetProof(), secProof(token, secProofDest, tc.ConnectionState())) {
		return nil, fmt.Errorf("no proof from the destination: %v", m)
	}
	return m.GetHello(), nil
}

// ferry serve under connections that never prove the token: they cost it
// bounded memory, they do not stop a real migration, and running out of
// descriptors pauses it rather than ending it.
func TestServeFlood(t *testing.T) {
	requireCriu(t)
	w := buildWorkload(t)
	h := newHosts(t)
	src, dst := newEnv(t), newEnv(t)
	tokenText := "correct horse battery staple 42"
	token := writeToken(t, tokenText)

	t.Run("unauthenticated connections cost bounded memory", func(t *testing.T) {
		// Listening on every address of its host, so that the flood can
		// come from many loopback addresses and fill every place.
		cmd, srv := dst.serveProc(h.b, "0.0.0.0:7220", token, "")
		pid := cmd.Process.Pid
		base := procStatus(t, pid, "VmRSS")
		// 100 connections from 13 addresses, each through TLS and then
		// claiming a 4 MiB message and sending 256 KiB of it.
		var wg sync.WaitGroup
		var conns []net.Conn
		var mu sync.Mutex
		var tlsOK atomic.Int64
		for i := range 100 {
			wg.Go(func() {
				nc, err := dialIn(t, h.b, "127.0.0.1:7220", fmt.Sprintf("127.0.0.%d", 2+i%13))
				if err != nil {
					return
				}
				mu.Lock()
				conns = append(conns, nc)
				mu.Unlock()
				_ = nc.SetDeadline(time.Now().Add(30 * time.Second))
				tc, err := secClientSide(t, nc)
				if err != nil {
					return
				}
				tlsOK.Add(1)
				_, _ = tc.Write(append([]byte{0, 0, 0x40, 0}, make([]byte, 256<<10)...))
			})
		}
		wg.Wait()
		peak := procStatus(t, pid, "VmHWM")
		t.Logf("serve: %d KiB resident before, peak %d KiB after 100 connections (%d through TLS)", base>>10, peak>>10, tlsOK.Load())
		if tlsOK.Load() < 50 {
			t.Fatalf("only %d of 100 connections got through TLS: the flood did not reach the proof", tlsOK.Load())
		}
		// Version 3 buffered up to 4 MiB for each: 400 MiB.
		if peak-base > 64<<20 {
			t.Fatalf("100 unauthenticated connections took serve from %d to %d KiB", base>>10, peak>>10)
		}
		for _, c := range conns {
			c.Close()
		}
		if !strings.Contains(srv.text(), "limit 4096") {
			t.Errorf("serve did not refuse the large messages:\n%s", srv.text())
		}
	})

	t.Run("a real migration completes during a flood of idle and slow connections", func(t *testing.T) {
		listen := net.JoinHostPort(h.addrB, "7221")
		_, srv := dst.serveProc(h.b, listen, token, "")
		sum := secJob(t, src, h.a, w, "fj", "32", newCanary())
		stop := make(chan struct{})
		var wg sync.WaitGroup
		var opened atomic.Int64
		defer func() { close(stop); wg.Wait() }()
		// Idle connections (300) and slow ones (20, a byte every 200ms),
		// from the destination's own address, held until the end.
		for i := range 320 {
			wg.Go(func() {
				nc, err := dialIn(t, h.b, listen, h.addrB)
				if err != nil {
					return
				}
				defer nc.Close()
				opened.Add(1)
				if i < 300 {
					<-stop
					return
				}
				tick := time.NewTicker(200 * time.Millisecond)
				defer tick.Stop()
				for range 300 {
					select {
					case <-stop:
						return
					case <-tick.C:
						if _, err := nc.Write([]byte{22}); err != nil {
							return
						}
					}
				}
			})
		}
		eventually(t, 30*time.Second, "the flood to connect", func() bool { return opened.Load() >= 200 })
		before, _ := src.verifyLines("fj")
		r := src.ferryIn(h.a, "migrate", "fj", "--to", listen, "--token-file", token, "--mode", "stop-copy")
		if r.code != 0 {
			t.Fatalf("migrate during a flood: %s\nserve: %s", r, srv.text())
		}
		dst.assertContinues("fj", sum, before[len(before)-1])
		if !strings.Contains(srv.text(), "too many have not proved the token") {
			t.Errorf("serve did not close excess connections:\n%s", srv.text())
		}
	})

	t.Run("a connection that does not prove the token is closed at the handshake deadline", func(t *testing.T) {
		listen := net.JoinHostPort(h.addrB, "7223")
		_, srv := dst.serveProc(h.b, listen, token, "")
		for _, slow := range []bool{false, true} {
			nc, err := dialIn(t, h.a, listen, "")
			if err != nil {
				t.Fatal(err)
			}
			t0 := time.Now()
			_ = nc.SetReadDeadline(time.Now().Add(60 * time.Second))
			if _, err := secRead(nc); err != nil { // the clear-text hello
				t.Fatal(err)
			}
			if slow {
				// A TLS record header, a byte at a time.
				go func() {
					for _, b := range []byte{22, 3, 1, 0, 200} {
						time.Sleep(time.Second)
						if _, err := nc.Write([]byte{b}); err != nil {
							return
						}
					}
				}()
			}
			_, err = nc.Read(make([]byte, 1))
			nc.Close()
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				t.Fatalf("serve kept a connection that proved nothing (slow: %v) for a minute", slow)
			}
			t.Logf("slow %v: closed by serve after %v (%v)", slow, time.Since(t0).Round(time.Second), err)
		}
		eventually(t, 5*time.Second, "the refusals in the log", func() bool { return strings.Count(srv.text(), "refused a migration") >= 2 })
	})

	t.Run("out of descriptors, serve pauses and then accepts again", func(t *testing.T) {
		listen := net.JoinHostPort(h.addrB, "7222")
		// 40 descriptors, and room for more unauthenticated connections
		// than that: the flood runs serve out of descriptors.
		cmd, srv := dst.serveProc(h.b, listen, token, "ulimit -n 40 &&", "--max-pending", "500", "--max-pending-per-host", "500")
		var conns []net.Conn
		for range 80 {
			nc, err := dialIn(t, h.b, listen, "")
			if err != nil {
				break
			}
			conns = append(conns, nc)
		}
		eventually(t, 20*time.Second, "serve to run out of descriptors", func() bool {
			return strings.Contains(srv.text(), "accepting a connection failed")
		})
		for _, c := range conns {
			c.Close()
		}
		if !alive(cmd.Process.Pid) {
			t.Fatalf("serve exited: %s", srv.text())
		}
		// Accepting again: a real handshake succeeds.
		var err error
		for range 50 {
			var nc net.Conn
			if nc, err = dialIn(t, h.a, listen, ""); err == nil {
				_ = nc.SetDeadline(time.Now().Add(15 * time.Second))
				_, err = secHandshake(t, nc, []byte(tokenText))
				nc.Close()
			}
			if err == nil {
				break
			}
			time.Sleep(200 * time.Millisecond)
		}
		if err != nil {
			t.Fatalf("no handshake after the descriptors came back: %v\n%s", err, srv.text())
		}
		if !alive(cmd.Process.Pid) {
			t.Fatalf("serve exited: %s", srv.text())
		}
	})
}

// alive says whether process pid runs (a child that exited is a zombie
// until waited for).
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	_, rest, _ := strings.Cut(string(b), ") ")
	return !strings.HasPrefix(rest, "Z")
}

// listeners returns the TCP ports listening in namespace ns.
func listeners(t *testing.T, ns string) []string {
	out, err := exec.Command("nsenter", "--net=/run/netns/"+ns, "cat", "/proc/net/tcp", "/proc/net/tcp6").Output()
	if err != nil {
		t.Fatal(err)
	}
	var ports []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) > 3 && f[3] == "0A" { // TCP_LISTEN
			_, port, _ := strings.Cut(f[1], ":")
			p, _ := strconv.ParseInt(port, 16, 32)
			ports = append(ports, strconv.Itoa(int(p)))
		}
	}
	return ports
}

// unixSockets returns the paths of unix sockets bound under dir in
// namespace ns.
func unixSockets(t *testing.T, ns, dir string) []string {
	out, err := exec.Command("nsenter", "--net=/run/netns/"+ns, "cat", "/proc/net/unix").Output()
	if err != nil {
		t.Fatal(err)
	}
	var paths []string
	for _, l := range strings.Split(string(out), "\n") {
		f := strings.Fields(l)
		if len(f) >= 8 && strings.HasPrefix(f[7], dir) {
			paths = append(paths, f[7])
		}
	}
	return paths
}

// Post-copy's page link: encrypted like the control connection, and
// relayed on the destination without anything another local user could
// reach: no TCP listener but serve's, unix sockets only in 0700
// directories.
func TestMigratePostCopySecure(t *testing.T) {
	w, h, src, dst, token := postCopyHosts(t)
	listen := net.JoinHostPort(h.addrB, "7230")
	dst.serve(h.b, listen, token)
	canary := newCanary()
	sum := secJob(t, src, h.a, w, "pj", "64", canary)

	var rec bytes.Buffer
	var mu sync.Mutex
	var links atomic.Int64
	via := net.JoinHostPort(h.addrB, "7231")
	stop := proxy(t, h.b, via, listen, func(c, d net.Conn) {
		links.Add(1)
		defer c.Close()
		defer d.Close()
		go func() { _, _ = io.Copy(io.MultiWriter(c, &lockedWriter{&mu, &rec}), d) }()
		_, _ = io.Copy(io.MultiWriter(d, &lockedWriter{&mu, &rec}), c)
	})
	// Watch the destination's listeners and sockets while it migrates.
	done := make(chan struct{})
	var seen sync.Map
	var watched sync.WaitGroup
	watched.Go(func() {
		for range 3000 {
			for _, p := range listeners(t, h.b) {
				seen.Store("tcp:"+p, true)
			}
			for _, p := range unixSockets(t, h.b, dst.root) {
				seen.Store("unix:"+p, true)
			}
			select {
			case <-done:
				return
			case <-time.After(5 * time.Millisecond):
			}
		}
	})
	before, _ := src.verifyLines("pj")
	r := src.ferryIn(h.a, "migrate", "pj", "--to", via, "--token-file", token, "--mode", "post-copy", "--compress", "none", "--json")
	close(done)
	watched.Wait()
	stop()
	if r.code != 0 {
		t.Fatalf("post-copy: %s", r)
	}
	dst.assertContinues("pj", sum, before[len(before)-1])
	if links.Load() != 2 {
		t.Errorf("%d connections went through the relay, want the control connection and the page link", links.Load())
	}
	mu.Lock()
	if rec.Len() < 32<<20 {
		t.Errorf("the relay recorded only %d bytes", rec.Len())
	}
	if bytes.Contains(rec.Bytes(), []byte(canary)) {
		t.Error("the job's memory crossed a link in clear text")
	}
	mu.Unlock()
	seen.Range(func(k, _ any) bool {
		key := k.(string)
		t.Log("seen on the destination:", key)
		switch {
		case key == "tcp:7230" || key == "tcp:7231": // serve, and this test's relay
		case strings.HasPrefix(key, "tcp:"):
			t.Errorf("something listened on TCP port %s of the destination during the migration", strings.TrimPrefix(key, "tcp:"))
		case strings.HasPrefix(key, "unix:"):
			// Every directory from the root down must be closed to others.
			for d := filepath.Dir(strings.TrimPrefix(key, "unix:")); len(d) > len(dst.root); d = filepath.Dir(d) {
				if st, err := os.Stat(d); err == nil && (st.Mode().Perm()&0o077 != 0 || st.Sys().(*syscall.Stat_t).Uid != 0) {
					t.Errorf("socket %s lies in %s, mode %04o, owner %d", key, d, st.Mode().Perm(), st.Sys().(*syscall.Stat_t).Uid)
				}
			}
		}
		return true
	})
}

// cutAfterRestoredTLS is cutAfterRestored (migrate_fail_test.go) for the
// secure link, where a relay cannot read the messages, only count TLS
// records: it forwards the destination's records one by one and cuts both
// connections right after the first application-data record the
// destination sends once the source has sent 1 MiB (the bulk of its
// checkpoint): that is the Restored (each message is one record; in
// stop-copy nothing else comes from the destination between the Prepared,
// before the dump, and the Restored, but the heartbeats, Restoring, which
// are told by their size: an empty message, 7 bytes with its length, so
// a record of 7+17 bytes in TLS 1.3; a Restored names the job and is
// longer).
func cutAfterRestoredTLS(c, d net.Conn) {
	defer c.Close()
	defer d.Close()
	src := &countingReader{r: c}
	go func() { _, _ = io.Copy(d, src) }()
	r := bufio.NewReader(d)
	// The clear-text Hello.
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return
	}
	body := make([]byte, binary.LittleEndian.Uint32(hdr[:])&0xffff)
	if _, err := io.ReadFull(r, body); err != nil {
		return
	}
	if _, err := c.Write(append(hdr[:], body...)); err != nil {
		return
	}
	for {
		rec := make([]byte, 5)
		if _, err := io.ReadFull(r, rec); err != nil {
			return
		}
		rec = append(rec, make([]byte, binary.BigEndian.Uint16(rec[3:5]))...)
		if _, err := io.ReadFull(r, rec[5:]); err != nil {
			return
		}
		bulk := src.n.Load() >= 1<<20
		if _, err := c.Write(rec); err != nil {
			return
		}
		if bulk && rec[0] == 23 && len(rec) != 5+heartbeatRecord {
			return
		}
	}
}

// heartbeatRecord is the payload of a TLS 1.3 record holding one
// Restoring: its 7 bytes, the content type and the 16-byte tag.
const heartbeatRecord = 7 + 1 + 16

type countingReader struct {
	r io.Reader
	n atomic.Int64
}

func (c *countingReader) Read(b []byte) (int, error) {
	n, err := c.r.Read(b)
	c.n.Add(int64(n))
	return n, err
}
