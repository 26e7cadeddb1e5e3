package migrate

// The secure link: every migration connection (the control connection
// and a post-copy page link alike) runs TLS 1.3, and both ends prove that
// they hold the token for this TLS session before anything of a job
// crosses it. See the package documentation for the reasoning.

import (
	"bytes"
	"crypto/ed25519"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"time"

	gproto "google.golang.org/protobuf/proto"

	pb "github.com/ferry-cr/ferry/proto"
)

// Limits of the handshake. Until a peer has proved the token it gets
// small buffers, messages of a few KiB and a few seconds in all.
const (
	handshakeTimeout = 10 * time.Second // the whole handshake, TLS and proofs
	handshakeMessage = 4 << 10          // the largest message before the proof
	handshakeBuffer  = 4 << 10          // the read buffer before the proof
)

// The proofs: HMAC-SHA256 keyed by the token over a label and the TLS
// session's exported keying material (RFC 8446 section 7.5). The labels
// differ by direction, so that neither proof can be reflected as the
// other, and name the protocol version.
const (
	exporterLabel = "EXPORTER-ferry-migrate"
	proofSource   = "ferry-migrate v4 source"
	proofDest     = "ferry-migrate v4 destination"
)

// ErrVersion is a peer that speaks another version of the migration
// protocol; neither side goes on.
var ErrVersion = errors.New("migration peer speaks another protocol version")

// PKI is what a site with certificates adds to the token (--tls-cert,
// --tls-key, --tls-ca). It never replaces the token's proof.
type PKI struct {
	// Cert is presented to peers instead of a fresh self-signed one.
	Cert *tls.Certificate
	// CA, when set, is the only issuer (with intermediates the peer
	// sends) of peer certificates this host accepts; a source also
	// checks that the destination's certificate names the host of --to.
	CA *x509.CertPool
}

// LoadPKI reads --tls-cert and --tls-key (both or neither) and --tls-ca
// (PEM files); all empty is the zero PKI.
func LoadPKI(certFile, keyFile, caFile string) (PKI, error) {
	var p PKI
	if (certFile == "") != (keyFile == "") {
		return p, errors.New("--tls-cert and --tls-key go together")
	}
	if certFile != "" {
		c, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return p, fmt.Errorf("--tls-cert/--tls-key: %w", err)
		}
		p.Cert = &c
	}
	if caFile != "" {
		b, err := os.ReadFile(caFile)
		if err != nil {
			return p, fmt.Errorf("--tls-ca: %w", err)
		}
		p.CA = x509.NewCertPool()
		if !p.CA.AppendCertsFromPEM(b) {
			return p, fmt.Errorf("--tls-ca: no PEM certificate in %s", caFile)
		}
	}
	return p, nil
}

// selfSigned makes a throwaway certificate: without --tls-cert a host
// has no identity but the token, and TLS needs some key to run.
func selfSigned() (*tls.Certificate, error) {
	pub, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 64))
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{SerialNumber: serial, Subject: pkix.Name{CommonName: "ferry migrate"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, pub, key)
	if err != nil {
		return nil, err
	}
	return &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}

// certError is a peer certificate this host refused (--tls-ca).
type certError struct{ err error }

func (e *certError) Error() string { return "the peer's certificate: " + e.err.Error() }
func (e *certError) Unwrap() error { return e.err }

// tlsConfig is the TLS of one end: TLS 1.3 only, a certificate required
// of both ends (so that the exported keying material binds both), no
// session resumption. Without a CA any certificate goes: the token's
// proof is what authenticates. host, on a source, is the name or address
// its certificate must carry under a CA.
func (p PKI) tlsConfig(server bool, host string) (*tls.Config, error) {
	cert := p.Cert
	if cert == nil {
		var err error
		if cert, err = selfSigned(); err != nil {
			return nil, err
		}
	}
	cfg := &tls.Config{
		MinVersion:             tls.VersionTLS13,
		MaxVersion:             tls.VersionTLS13,
		Certificates:           []tls.Certificate{*cert},
		GetClientCertificate:   func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return cert, nil },
		ClientAuth:             tls.RequireAnyClientCert,
		InsecureSkipVerify:     true, // verified below, under a CA; the proofs authenticate in any case
		SessionTicketsDisabled: true,
		VerifyPeerCertificate:  p.verify(server, host),
	}
	return cfg, nil
}

func (p PKI) verify(server bool, host string) func([][]byte, [][]*x509.Certificate) error {
	return func(raw [][]byte, _ [][]*x509.Certificate) error {
		if len(raw) == 0 {
			return &certError{errors.New("none was sent")}
		}
		if p.CA == nil {
			return nil
		}
		certs := make([]*x509.Certificate, len(raw))
		for i, b := range raw {
			c, err := x509.ParseCertificate(b)
			if err != nil {
				return &certError{err}
			}
			certs[i] = c
		}
		opts := x509.VerifyOptions{Roots: p.CA, Intermediates: x509.NewCertPool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}
		for _, c := range certs[1:] {
			opts.Intermediates.AddCert(c)
		}
		if _, err := certs[0].Verify(opts); err != nil {
			return &certError{err}
		}
		if !server && host != "" {
			if err := certs[0].VerifyHostname(host); err != nil {
				return &certError{err}
			}
		}
		return nil
	}
}

// proof is this session's proof of the token for one direction.
func proof(token []byte, label string, cs tls.ConnectionState) ([]byte, error) {
	ekm, err := cs.ExportKeyingMaterial(exporterLabel, nil, 32)
	if err != nil {
		return nil, err
	}
	h := hmac.New(sha256.New, token)
	h.Write([]byte(label))
	h.Write([]byte{0})
	h.Write(ekm)
	return h.Sum(nil), nil
}

// The clear-text preamble: one frame, the destination's Hello with its
// version alone. A source of version 3 or older reads it as its own
// Hello, refuses the version and says so in an Abort frame.

func writeFrame(w io.Writer, m *pb.Envelope) error {
	b, err := gproto.Marshal(m)
	if err != nil {
		return err
	}
	_, err = w.Write(append(binary.LittleEndian.AppendUint32(nil, uint32(len(b))), b...))
	return err
}

// readFrame reads one clear-text frame of at most handshakeMessage bytes.
func readFrame(r io.Reader) (*pb.Envelope, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err
	}
	n := binary.LittleEndian.Uint32(hdr[:])
	if n > handshakeMessage {
		return nil, fmt.Errorf("a first message of %d bytes (not ferry migrate?)", n)
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(r, b); err != nil {
		return nil, err
	}
	m := &pb.Envelope{}
	if err := gproto.Unmarshal(b, m); err != nil {
		return nil, fmt.Errorf("not a ferry migrate message: %w", err)
	}
	return m, nil
}

// versionError is the line both sides give for a peer of another version.
func versionError(peer, self uint32, who string) error {
	return fmt.Errorf("%w: %s speaks migration protocol %d, this ferry %d: use the same ferry version on both hosts", ErrVersion, who, peer, self)
}

// clientHandshake opens the secure link over nc, a connection to a
// ferry serve at host: the version preamble, TLS 1.3, our proof, then the
// destination's proof, checked before anything else is sent. It returns
// the link and the destination's Hello.
func clientHandshake(nc net.Conn, token []byte, pki PKI, host string) (*conn, *pb.Hello, error) {
	_ = nc.SetDeadline(time.Now().Add(handshakeTimeout))
	m, err := readFrame(nc)
	if err != nil {
		return nil, nil, fmt.Errorf("waiting for the destination's hello: %w", err)
	}
	h := m.GetHello()
	if h == nil {
		return nil, nil, errors.New("destination did not open with hello: is it a ferry serve?")
	}
	if h.GetVersion() != ProtocolVersion {
		_ = writeFrame(nc, &pb.Envelope{Msg: &pb.Envelope_Abort{Abort: &pb.Abort{
			Reason: fmt.Sprintf("protocol version %d, this source speaks %d", h.GetVersion(), ProtocolVersion)}}})
		return nil, nil, versionError(h.GetVersion(), ProtocolVersion, "the destination")
	}
	cfg, err := pki.tlsConfig(false, host)
	if err != nil {
		return nil, nil, err
	}
	tc := tls.Client(nc, cfg)
	if err := tc.Handshake(); err != nil {
		var ce *certError
		var ae tls.AlertError
		if errors.As(err, &ce) || errors.As(err, &ae) {
			return nil, nil, fmt.Errorf("%w: TLS: %w", ErrAuth, err)
		}
		return nil, nil, fmt.Errorf("TLS with the destination: %w", err)
	}
	c := newHandshakeConn(tc)
	mine, err := proof(token, proofSource, tc.ConnectionState())
	if err != nil {
		return nil, nil, err
	}
	if err := c.send(&pb.Envelope{Msg: &pb.Envelope_Auth{Auth: &pb.Auth{Version: ProtocolVersion, Mac: mine}}}, handshakeTimeout); err != nil {
		return nil, nil, fmt.Errorf("authenticating: %w", err)
	}
	m, err = c.recv(handshakeTimeout)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %w", ErrAuth, err)
	}
	if a := m.GetAnswer(); a != nil && !a.GetOk() {
		return nil, nil, fmt.Errorf("%w: %s", ErrAuth, a.GetReason())
	}
	h = m.GetHello()
	want, err := proof(token, proofDest, tc.ConnectionState())
	if err != nil {
		return nil, nil, err
	}
	if h == nil || !hmac.Equal(h.GetProof(), want) {
		// An impostor, or a relay between two TLS sessions: it gets
		// nothing more, not even what the job is.
		c.abort("the destination did not prove it holds the token")
		return nil, nil, fmt.Errorf("%w: the destination did not prove it holds the token (an impostor, or a relay in the middle); nothing of the job was sent", ErrAuth)
	}
	_ = nc.SetDeadline(time.Time{})
	c.authenticated()
	return c, h, nil
}

// serverHandshake is the destination's side of clientHandshake: it checks
// the source's proof before it proves its own, so that a stranger gets no
// proof to guess the token from, and answers a wrong one with a refusal.
// hello is the Hello to send once the source has proved the token.
func (sv *Server) serverHandshake(nc net.Conn, hello *pb.Hello) (*conn, error) {
	_ = nc.SetDeadline(time.Now().Add(handshakeTimeout))
	if err := writeFrame(nc, &pb.Envelope{Msg: &pb.Envelope_Hello{Hello: &pb.Hello{Version: ProtocolVersion}}}); err != nil {
		return nil, err
	}
	first := make([]byte, 3)
	if _, err := io.ReadFull(nc, first); err != nil {
		return nil, err
	}
	// A TLS handshake record: content type 22, version 3.x.
	if first[0] != 22 || first[1] != 3 {
		m, err := readFrame(io.MultiReader(bytes.NewReader(first), nc))
		if err != nil {
			return nil, fmt.Errorf("the peer does not speak TLS: %w", err)
		}
		if ab := m.GetAbort(); ab != nil {
			return nil, fmt.Errorf("%w: the source refused our protocol version %d (%s)", ErrVersion, ProtocolVersion, ab.GetReason())
		}
		if a := m.GetAuth(); a != nil {
			return nil, versionError(a.GetVersion(), ProtocolVersion, "the source")
		}
		return nil, fmt.Errorf("%w: the source sent %T in clear text instead of TLS", ErrVersion, m.GetMsg())
	}
	cfg, err := sv.PKI.tlsConfig(true, "")
	if err != nil {
		return nil, err
	}
	// (The first bytes go first; then TLS reads nc itself, unbuffered.)
	tc := tls.Server(&bufferedConn{Conn: nc, r: io.MultiReader(bytes.NewReader(first), nc)}, cfg)
	if err := tc.Handshake(); err != nil {
		return nil, fmt.Errorf("TLS: %w", err)
	}
	c := newHandshakeConn(tc)
	m, err := c.recv(handshakeTimeout)
	if err != nil {
		return c, err
	}
	a := m.GetAuth()
	cs := tc.ConnectionState()
	want, err := proof(sv.Token, proofSource, cs)
	if err != nil {
		return c, err
	}
	switch {
	case a == nil:
		sv.answer(c, false, "authentication required", "")
		return c, fmt.Errorf("peer sent %T instead of auth", m.GetMsg())
	case a.GetVersion() != ProtocolVersion:
		sv.answer(c, false, fmt.Sprintf("protocol version %d, this destination speaks %d", a.GetVersion(), ProtocolVersion), "")
		return c, versionError(a.GetVersion(), ProtocolVersion, "the source")
	case !hmac.Equal(a.GetMac(), want):
		sv.answer(c, false, "the token's proof did not check out (wrong token, or a relay in the middle)", "")
		return c, errors.New("wrong token (or a relay in the middle)")
	}
	mine, err := proof(sv.Token, proofDest, cs)
	if err != nil {
		return c, err
	}
	hello.Proof = mine
	if err := c.send(&pb.Envelope{Msg: &pb.Envelope_Hello{Hello: hello}}, handshakeTimeout); err != nil {
		return c, err
	}
	_ = nc.SetDeadline(time.Time{})
	c.authenticated()
	return c, nil
}
