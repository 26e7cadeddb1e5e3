// Package store is ferry's snapshot store: periodic checkpoints of a job
// kept content-addressed, so that each costs only what changed since any
// snapshot already stored, even though every checkpoint is a full CRIU
// dump (no soft-dirty tracking on the machines it was built for).
//
// A snapshot is a set of named files (CRIU's images) plus opaque meta
// bytes (ferry's manifest). Files are cut into fixed-size chunks: CRIU
// pages files (pages-*.img, raw 4 KiB pages end to end) at every page,
// so a rewritten page costs one page; other files every 64 KiB. A chunk
// is named by the SHA-256 of its bytes and stored once per store, across
// snapshots and jobs; an all-zero chunk is not stored at all. Chunks are
// compressed one by one (zstd by default, S2 or none by Options) and
// appended to pack files; a snapshot record lists, per file, the ref
// lists that name its chunks in order.
//
// Store logic (chunking, dedup, index, GC, verify) sits above Backend,
// four calls an object store also serves (see "On S3" below); the
// directory backend lays the store out as:
//
//	DIR/
//	  config                  format version, hash, chunk sizes (written once)
//	  lock                    flock: Begin, OpenSnapshot and Verify hold it
//	                          shared; GC, Prune and Delete exclusive
//	  packs/<xx>/<packid>     immutable packs, 32 MiB each (xx = the id's first 2 hex)
//	  snapshots/<job>/<id>    immutable snapshot records
//	  tmp/                    objects being written; garbage after a crash
//
// Pack (all integers little-endian):
//
//	+--------------------------------------------------------------+
//	| header, 16 bytes                                             |
//	|   magic "FERRYPAK" | u16 version (1) | u16 flags (0) | u32 0 |
//	+--------------------------------------------------------------+
//	| blob 0  stored bytes: a zstd frame, an S2 block, or raw      |
//	| blob 1                                                       |
//	| ...     (back to back, in the order they were written)       |
//	+--------------------------------------------------------------+
//	| index, 48 bytes per blob                                     |
//	|   digest [32] | u32 offset | u32 stored length |             |
//	|   u32 raw length | u8 codec (0 none, 1 zstd, 2 s2) | 3 zero  |
//	+--------------------------------------------------------------+
//	| footer, 24 bytes                                             |
//	|   u32 entries | u32 CRC-32C of the index | u64 index offset  |
//	|   magic "FERRYPIX"                                           |
//	+--------------------------------------------------------------+
//
// A blob is compressed exactly when its stored length is below its raw
// length; incompressible data is stored raw. The index is fixed-width
// rather than protobuf because Open reads every pack's index to build the
// in-memory map digest -> (pack, offset, lengths): tens of thousands of
// entries per pack decode without an allocation each. Blobs carry no
// checksum of their own: the digest of the raw bytes checks them.
//
// Config and snapshot records share one framing:
//
//	magic "FERRYSTO" | u16 version (1) | u16 kind (1 config, 2 snapshot) |
//	u32 payload length | u32 CRC-32C of the payload | u32 0 |
//	payload: StoreConfig or StoreSnapshot (proto/store.proto)
//
// A StoreSnapshot holds the job, id, time, meta, stats and, per file, its
// name, size, mode, chunk size and the digests of its ref lists. A ref
// list is itself a blob (a StoreRefList: runs alternating stored and
// all-zero chunks, then one 32-byte digest per stored chunk) covering up
// to 4096 chunks. Keeping refs out of the record keeps records small
// (listing reads them all) and stores an unchanged file's lists once.
//
// Why it is consistent after a crash (kill -9, a full disk): every object
// is written under tmp/, fsynced, renamed into place without replacing
// anything (RENAME_NOREPLACE), and its directory fsynced. A writer seals
// all its packs that way before it writes the snapshot record, last; a
// snapshot therefore exists whole or not at all, and what an interrupted
// one left (sealed packs nothing refers to, tmp files) is removed by the
// next GC. Prune deletes records durably before GC deletes any pack, so a
// record never outlives its chunks.
//
// Why GC is safe while snapshots are being added: a writer holds the lock
// shared from Begin to Commit, because it skips storing any chunk the
// store already holds, and only a committed record protects that chunk
// from GC. GC takes the lock exclusive, so it sees only committed
// snapshots. A pack sealed by a writer that then failed is simply dead.
//
// On S3 (Open with s3://BUCKET/PREFIX; s3.go) the layout is the same under
// PREFIX, without tmp/ and with locks/ instead of lock:
//
//	PREFIX/config, PREFIX/packs/<xx>/<packid>, PREFIX/snapshots/<job>/<id>
//	PREFIX/locks/shared/<id>     a writer's or reader's lease
//	PREFIX/locks/exclusive/<id>  a prune's or GC's lease
//
// A pack is a multipart upload (8 MiB parts sent while the next fills, at
// most s3PartsInFlight per process), visible only once
// CompleteMultipartUpload returns; config and records are single PUTs.
// An upload of a writer that was killed is invisible to GET and LIST, so
// nothing can refer to it; GC aborts it. Records are still written last.
//
// The multi-host protocol. Object storage has no flock, and hosts share
// neither a kernel nor a clock; the lock becomes a reader-writer lock of
// lease objects (s3lock.go):
//
//  1. A holder PUTs its marker (locks/shared/ID or locks/exclusive/ID,
//     ID = time and random bits), then LISTs locks/. It re-PUTs the marker
//     every TTL/4 (TTL = 60 s) while it holds the lock or waits for it,
//     and DELETEs it when done.
//  2. Liveness is judged on the server's clock: a marker is live when its
//     LastModified is less than TTL older than the lister's own marker's.
//     So a killed holder delays the next GC by TTL, never longer, and
//     clock skew between hosts does not matter.
//  3. Shared (Begin, OpenSnapshot, Verify): granted when no live exclusive
//     marker is listed. Otherwise it DELETEs its marker and retries
//     later: writers yield to GC, so GC is not starved.
//  4. Exclusive (Prune, GC, Delete): granted when no other live marker is
//     listed. While live shared markers remain, or only exclusive ones
//     that sort after its own, it waits, keeping its marker fresh (new
//     writers see it and yield). An exclusive marker sorting before its
//     own makes it withdraw and retry, so two GCs never wait on each
//     other. It removes dead markers once granted.
//  5. Why two that start together cannot both proceed: each PUTs before
//     it LISTs, and S3 LISTs show every PUT completed before the LIST
//     began (strong read-after-write consistency, which AWS S3, MinIO,
//     Ceph and Versity's gateway give). If writer W's LIST missed GC G's
//     marker, that LIST began before G's PUT completed, so W's PUT (done
//     before W's LIST) completed before G's LIST began: G sees W and
//     waits. Likewise for two GCs.
//  6. A lease can lapse while it is held: a host cut off from the server,
//     or stopped, for longer than TTL. Others then take it for dead. So
//     the holder checks, before every irrevocable step (a writer before
//     its record, GC before every DELETE and before aborting uploads),
//     that no two successful renewals were more than TTL/2 apart and the
//     last is less than TTL/2 old; otherwise it fails with ErrBusy. A
//     writer that fails this way leaves only unreferenced packs.
//
// With that, the directory store's argument carries over unchanged: a
// writer holds the lock shared from Begin (before it reads which chunks the
// store has) to its record, GC holds it exclusive, so GC sees every
// snapshot whose chunks some writer relied on as committed, and deletes
// none of them. Two writers on two hosts that store the same new chunk at
// once both store it (neither sees the other's pending chunks); the
// duplicate is dead and GC removes it. The cost: a prune waits for the
// snapshots in progress on every host, as it does on one; and a snapshot
// waits while a prune runs.
//
// Why it is fast: writers hash (SHA-256 with SHA-NI: 1.6 GB/s per core on
// 4 KiB pages) and compress on Options.Workers goroutines in 1 MiB
// batches, each worker appending to its own pack, which is sealed (fsync)
// in the background while the next one fills; a chunk the store has
// costs one hash and one map lookup. Readers fetch runs of adjacent blobs
// with one read and decompress and check them on every core, ahead of the
// caller. BenchmarkAdd measures it.
//
// Limits: the index is in memory (about 60 bytes per stored chunk: 15 MiB
// per GiB of distinct pages) and is rebuilt from the packs' indexes on
// Open. XXX: chunking is fixed-size; an insertion in a large non-pages
// file shifts every chunk after it (content-defined chunking would not),
// which CRIU's images, rewritten whole and mostly small, do not warrant.
package store
