// Package migrate moves a running job between hosts: Migrate on the source
// and Server on the destination speak the protocol of proto/migrate.proto
// (HMAC handshake on a shared token, offer and answer, the checkpoint
// streamed straight from dump into restore, then the handover), in
// stop-copy or post-copy mode (Choose picks one for auto), so that the job
// runs in at most one place at any moment and a complete copy of it always
// exists.
//
// # Security of the link
//
// A migration hands a running job, memory and all, to another host, which
// runs it as root; the link's one job is to hand it only to a host that
// holds the token, and to let only a host that holds the token hand one
// in. The token file (0600, refused otherwise) is the one thing the two
// hosts share. Protocol version 4 does this:
//
//  1. The destination sends one clear-text frame: a Hello with its
//     protocol version and nothing else (no host name, no capabilities).
//     A source of another version refuses it and says so in an Abort
//     frame, which the destination logs; a source of version 4 refuses any
//     other version (exit 29). There is no fallback, so nothing on the path
//     can talk either end down to an older protocol: changing the version
//     only stops the migration, which anyone on the path can do anyway.
//  2. TLS 1.3 (Go's crypto/tls), with a certificate required of both ends
//     (a throwaway self-signed one unless --tls-cert is given), no session
//     resumption. Certificates are not what authenticates (unless --tls-ca
//     asks for a chain as well): without a CA any certificate is taken.
//  3. The source sends HMAC-SHA256(token, "ferry-migrate v4 source" ||
//     EKM), EKM being 32 bytes of the TLS session's exported keying
//     material (RFC 8446 section 7.5). The destination checks it in
//     constant time and only then sends HMAC-SHA256(token, "ferry-migrate
//     v4 destination" || EKM) with its capabilities. The source checks
//     that before it sends anything of a job (the Offer names it).
//
// What this gives, thought through as an attacker:
//
//   - Someone on the path reads nothing (TLS encrypts, and authenticates
//     every record: a flipped byte ends the migration with the job still
//     on the source) and learns nothing of the token (the proofs are
//     HMACs; the token never crosses the link).
//   - An impostor destination (it answered on the address, by a hijacked
//     route or name) gets the source's proof and nothing else: it cannot
//     make the destination's proof without the token, and the source
//     sends no Offer and no byte of the job before it has checked that
//     proof (exit 20; the job runs on).
//   - A relay in the middle must end TLS on each side to read anything;
//     each side's EKM is then different, so a proof forwarded from one
//     session fails in the other, in both directions. Forwarding the bytes
//     untouched instead leaves it blind and unable to inject anything.
//     The labels differ by direction, so a proof cannot be reflected back
//     to its sender either.
//   - A stranger who connects to ferry serve gets the clear-text version
//     and a TLS handshake, and must prove the token first: serve proves
//     nothing to a peer that has not, so it is no oracle for guessing the
//     token. A source does prove first, to whoever answers at --to: an
//     impostor there can try to guess the token offline from that one
//     proof. Use a random token (head -c 32 /dev/urandom | base64); 16
//     bytes is the floor.
//   - Before the proof a connection costs serve little and not for long:
//     a deadline of handshakeTimeout for the whole handshake, read buffers
//     and messages of handshakeMessage bytes, at most MaxPending such
//     connections (MaxPendingPerHost from one address, so that one
//     flooding address cannot keep a real source out), more closed at
//     once; failing accepts (EMFILE) pause the loop instead of ending it.
//     A flood from many addresses can still fill every place, and delays
//     migrations while it lasts; it cannot make serve exit or grow.
//   - On the destination, the post-copy page relay reaches CRIU's
//     lazy-pages daemon through a socketpair the daemon inherits: nothing
//     listens, on loopback or anywhere, for another local user to take.
//     The restore's sockets live in 0700 directories of ferry's root.
//   - Someone with root on either host, or the token, has everything: the
//     token is as good as root on every host that serves with it.
//
// --tls-cert, --tls-key and --tls-ca let a site with a PKI require a
// certificate its CA issued as well (the destination's must name the host
// of --to); a certificate alone never admits a peer.
package migrate
