// Package migrate moves a running job between hosts: Migrate on the source
// and Server on the destination speak the protocol of proto/migrate.proto
// (HMAC handshake on a shared token, offer and answer, the checkpoint
// streamed straight from dump into restore, then the handover), in
// stop-copy or post-copy mode (Choose picks one for auto), so that the job
// runs in at most one place at any moment and a complete copy of it always
// exists.
package migrate
