package store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
	"github.com/aws/smithy-go"
	"github.com/aws/smithy-go/logging"
)

// S3 backend: object "a/b" is the key PREFIX/a/b of the bucket. A small
// object is one PUT; a large one (a pack) is a multipart upload whose
// parts go up in parallel while the writer fills the next, and which
// CompleteMultipartUpload makes visible at once. An upload that never
// completes (kill -9) is invisible to GET and LIST: nothing can refer to
// it; GC aborts it. Locking is by lease objects under PREFIX/locks/; see
// s3Locker and doc.go.
const (
	// s3URLScheme starts a store location that names a bucket.
	s3URLScheme = "s3://"
	// s3PartSize is the size of a multipart upload's parts (S3's minimum
	// is 5 MiB for every part but the last): a default 32 MiB pack is 4
	// parts, uploaded while the next ones fill.
	s3PartSize = 8 << 20
	// s3PartsInFlight bounds the parts being uploaded at once by one
	// process, across every object: with one part filling per open
	// object, it bounds the memory uploads take (8 parts: 64 MiB).
	s3PartsInFlight = 8
	// s3DefaultRegion is used when neither the environment nor the shared
	// config names one: S3-compatible servers accept any, and AWS
	// redirects a bucket's requests to its region.
	s3DefaultRegion = "us-east-1"
	// s3ReadTimeout bounds one ranged GET of a pack. Reads of cached pack
	// handles outlive the context they were opened with, so they carry a
	// timeout of their own.
	s3ReadTimeout = 5 * time.Minute
	locksPrefix   = "locks/"
	// s3MinWorkers is the default Options.Workers of an S3 store.
	s3MinWorkers = 8
)

// IsS3URL reports whether a store location names an S3 bucket
// (s3://BUCKET[/PREFIX]) rather than a directory.
func IsS3URL(loc string) bool { return strings.HasPrefix(loc, s3URLScheme) }

// parseS3URL splits s3://BUCKET[/PREFIX] into the bucket and a key prefix
// that is empty or ends with "/".
func parseS3URL(loc string) (bucket, prefix string, err error) {
	rest, ok := strings.CutPrefix(loc, s3URLScheme)
	if !ok {
		return "", "", fmt.Errorf("%q is not an s3:// URL", loc)
	}
	bucket, prefix, _ = strings.Cut(rest, "/")
	if bucket == "" {
		return "", "", fmt.Errorf("%q names no bucket (s3://BUCKET/PREFIX)", loc)
	}
	prefix = strings.Trim(prefix, "/")
	if prefix != "" {
		if err := checkObjectName(prefix); err != nil {
			return "", "", fmt.Errorf("%q: the prefix must be plain slash-separated names", loc)
		}
		prefix += "/"
	}
	return bucket, prefix, nil
}

// s3Backend keeps objects in an S3 bucket; see Backend.
type s3Backend struct {
	cli    *s3.Client
	bucket string
	prefix string
	parts  chan struct{} // s3PartsInFlight tokens
	lease  time.Duration
}

// openS3 opens the store at loc (s3://BUCKET[/PREFIX]) with the AWS SDK's
// standard configuration: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
// AWS_SESSION_TOKEN, AWS_REGION, AWS_PROFILE, AWS_ENDPOINT_URL (or
// AWS_ENDPOINT_URL_S3), the shared config and credentials files, then
// instance roles. A custom endpoint (an S3-compatible server) is
// addressed path-style, since such servers seldom have wildcard DNS.
func openS3(ctx context.Context, loc string, opts Options) (*Store, error) {
	b, err := newS3Backend(ctx, loc, opts.NoCreate)
	if err != nil {
		return nil, err
	}
	if opts.Workers <= 0 {
		// Reads are one GET per run of blobs and wait on the server
		// more than on a core: more of them in flight than cores.
		opts.Workers = max(runtime.GOMAXPROCS(0), s3MinWorkers)
	}
	return OpenBackend(ctx, b, opts)
}

// newS3Backend connects to the bucket of loc and checks that it can be
// used; with noCreate, that a store is there (ErrNoStore otherwise).
func newS3Backend(ctx context.Context, loc string, noCreate bool) (*s3Backend, error) {
	bucket, prefix, err := parseS3URL(loc)
	if err != nil {
		return nil, err
	}
	// The SDK's own log lines (an IMDS fallback, a response without a
	// checksum) would break ferry's one-line errors.
	cfg, err := config.LoadDefaultConfig(ctx, config.WithLogger(logging.Nop{}))
	if err != nil {
		return nil, &UnavailableError{"loading the AWS configuration: " + s3Message(err)}
	}
	if _, err := cfg.Credentials.Retrieve(ctx); err != nil {
		return nil, &UnavailableError{"no AWS credentials for the S3 store (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE): " + s3Message(err)}
	}
	if cfg.Region == "" {
		cfg.Region = s3DefaultRegion
	}
	// Ranged reads carry no checksum to validate (the SDK would log that
	// for every read); every blob is checked against its digest anyway.
	cfg.ResponseChecksumValidation = aws.ResponseChecksumValidationWhenRequired
	cfg.Logger = logging.Nop{}
	cli := s3.NewFromConfig(cfg, func(o *s3.Options) {
		if o.BaseEndpoint != nil {
			o.UsePathStyle = true
		}
	})
	b := &s3Backend{cli: cli, bucket: bucket, prefix: prefix, parts: make(chan struct{}, s3PartsInFlight), lease: s3LeaseTTL}
	// One cheap request that tells a wrong key, a missing bucket or an
	// unreachable server apart before anything else is tried.
	if _, err := cli.ListObjectsV2(ctx, &s3.ListObjectsV2Input{Bucket: &bucket, Prefix: aws.String(prefix + "config"), MaxKeys: aws.Int32(1)}); err != nil {
		return nil, b.explain(err)
	}
	if noCreate {
		if _, err := cli.HeadObject(ctx, &s3.HeadObjectInput{Bucket: &bucket, Key: aws.String(prefix + "config")}); err != nil {
			if isNotFound(err) {
				return nil, ErrNoStore
			}
			return nil, b.explain(err)
		}
	}
	return b, nil
}

// explain turns an error of the bucket check into one line a user can
// act on.
func (b *s3Backend) explain(err error) error {
	var ae smithy.APIError
	if errors.As(err, &ae) {
		switch ae.ErrorCode() {
		case "NoSuchBucket":
			return &UnavailableError{fmt.Sprintf("S3 bucket %q does not exist", b.bucket)}
		case "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden", "InvalidToken", "ExpiredToken":
			return &UnavailableError{fmt.Sprintf("the S3 server refused access to bucket %q (%s): check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or AWS_PROFILE",
				b.bucket, ae.ErrorCode())}
		}
		return &UnavailableError{fmt.Sprintf("S3 bucket %q: %s: %s", b.bucket, ae.ErrorCode(), ae.ErrorMessage())}
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	return &UnavailableError{fmt.Sprintf("S3 bucket %q unreachable: %s", b.bucket, s3Message(err))}
}

// s3Message is the root cause of an SDK error without the operation
// wrapping the SDK puts around it.
func s3Message(err error) string {
	var ae smithy.APIError
	if errors.As(err, &ae) {
		return ae.ErrorCode() + ": " + ae.ErrorMessage()
	}
	for {
		u := errors.Unwrap(err)
		if u == nil {
			return err.Error()
		}
		err = u
	}
}

// s3Err wraps an SDK error of op on name; a missing key matches
// fs.ErrNotExist.
func s3Err(op, name string, err error) error {
	if isNotFound(err) {
		return fmt.Errorf("%s %q: %w", op, name, fs.ErrNotExist)
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("%s %q: %w", op, name, err)
	}
	return fmt.Errorf("%s %q: %s", op, name, s3Message(err))
}

func isNotFound(err error) bool {
	var nsk *types.NoSuchKey
	var nf *types.NotFound
	if errors.As(err, &nsk) || errors.As(err, &nf) {
		return true
	}
	var ae smithy.APIError
	if errors.As(err, &ae) && (ae.ErrorCode() == "NoSuchKey" || ae.ErrorCode() == "NotFound") {
		return true
	}
	var re interface{ HTTPStatusCode() int }
	return errors.As(err, &re) && re.HTTPStatusCode() == http.StatusNotFound
}

func (b *s3Backend) key(name string) *string { return aws.String(b.prefix + name) }

// Create implements Backend. Nothing is sent until the first part is
// full; an object smaller than a part is one PUT at Commit.
func (b *s3Backend) Create(ctx context.Context, name string) (ObjectWriter, error) {
	if err := checkObjectName(name); err != nil {
		return nil, err
	}
	return &s3Writer{b: b, ctx: ctx, name: name}, nil
}

// s3Writer streams one object: full parts are uploaded in the background
// (bounded by the backend's part tokens) while the next one fills.
type s3Writer struct {
	b    *s3Backend
	ctx  context.Context
	name string
	buf  []byte

	upload *string // multipart upload id, once one was started
	next   int32   // number of the next part
	wg     sync.WaitGroup
	mu     sync.Mutex
	done   []types.CompletedPart
	err    error
	closed bool
}

// Write implements ObjectWriter.
func (w *s3Writer) Write(p []byte) (int, error) {
	if w.closed {
		return 0, fmt.Errorf("writing %q: %w", w.name, ErrClosed)
	}
	n := 0
	for len(p) > 0 {
		if w.buf == nil {
			w.buf = make([]byte, 0, s3PartSize)
		}
		take := min(s3PartSize-len(w.buf), len(p))
		w.buf = append(w.buf, p[:take]...)
		p, n = p[take:], n+take
		if len(w.buf) == s3PartSize {
			if err := w.sendPart(); err != nil {
				return n, err
			}
		}
	}
	return n, nil
}

func (w *s3Writer) failed() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.err
}

// sendPart starts uploading the buffered part, starting the multipart
// upload first if need be. It waits for a part token: that is the
// backpressure that bounds memory.
func (w *s3Writer) sendPart() error {
	if err := w.failed(); err != nil {
		return err
	}
	if w.upload == nil {
		out, err := w.b.cli.CreateMultipartUpload(w.ctx, &s3.CreateMultipartUploadInput{Bucket: &w.b.bucket, Key: w.b.key(w.name)})
		if err != nil {
			return s3Err("starting upload of", w.name, err)
		}
		w.upload = out.UploadId
	}
	select {
	case w.b.parts <- struct{}{}:
	case <-w.ctx.Done():
		return fmt.Errorf("writing %q: %w", w.name, w.ctx.Err())
	}
	w.next++
	num, data := w.next, w.buf
	w.buf = nil
	w.wg.Go(func() {
		defer func() { <-w.b.parts }()
		out, err := w.b.cli.UploadPart(w.ctx, &s3.UploadPartInput{
			Bucket: &w.b.bucket, Key: w.b.key(w.name), UploadId: w.upload,
			PartNumber: aws.Int32(num), Body: bytes.NewReader(data), ContentLength: aws.Int64(int64(len(data))),
		})
		w.mu.Lock()
		defer w.mu.Unlock()
		if err != nil {
			if w.err == nil {
				w.err = s3Err("uploading part "+strconv.Itoa(int(num))+" of", w.name, err)
			}
			return
		}
		w.done = append(w.done, types.CompletedPart{ETag: out.ETag, PartNumber: aws.Int32(num)})
	})
	return nil
}

// Commit implements ObjectWriter: the last part, then
// CompleteMultipartUpload (or one PUT for a small object). A name other
// than a pack's (packs have 128 random bits) is checked to be free
// first; S3 has no portable create-only PUT, so two hosts writing one
// record name at the very same moment could still both succeed, which
// the names (a time and random bits) make unlikely enough.
func (w *s3Writer) Commit() (retErr error) {
	if w.closed {
		return fmt.Errorf("committing %q: %w", w.name, ErrClosed)
	}
	defer func() {
		if retErr != nil {
			retErr = errors.Join(retErr, w.Abort())
		}
		w.closed = true
	}()
	if !strings.HasPrefix(w.name, "packs/") {
		_, err := w.b.cli.HeadObject(w.ctx, &s3.HeadObjectInput{Bucket: &w.b.bucket, Key: w.b.key(w.name)})
		if err == nil {
			return fmt.Errorf("committing %q: %w", w.name, fs.ErrExist)
		}
		if !isNotFound(err) {
			return s3Err("checking", w.name, err)
		}
	}
	if w.upload == nil {
		_, err := w.b.cli.PutObject(w.ctx, &s3.PutObjectInput{
			Bucket: &w.b.bucket, Key: w.b.key(w.name),
			Body: bytes.NewReader(w.buf), ContentLength: aws.Int64(int64(len(w.buf))),
		})
		if err != nil {
			return s3Err("writing", w.name, err)
		}
		w.buf = nil
		return nil
	}
	if len(w.buf) > 0 {
		if err := w.sendPart(); err != nil {
			return err
		}
	}
	w.wg.Wait()
	if err := w.failed(); err != nil {
		return err
	}
	parts := slices.Clone(w.done)
	slices.SortFunc(parts, func(a, b types.CompletedPart) int { return int(*a.PartNumber - *b.PartNumber) })
	_, err := w.b.cli.CompleteMultipartUpload(w.ctx, &s3.CompleteMultipartUploadInput{
		Bucket: &w.b.bucket, Key: w.b.key(w.name), UploadId: w.upload,
		MultipartUpload: &types.CompletedMultipartUpload{Parts: parts},
	})
	if err != nil {
		return s3Err("completing upload of", w.name, err)
	}
	w.upload = nil
	return nil
}

// Abort implements ObjectWriter: the parts sent are discarded with the
// upload.
func (w *s3Writer) Abort() error {
	w.wg.Wait()
	w.closed = true
	w.buf = nil
	if w.upload == nil {
		return nil
	}
	id := w.upload
	w.upload = nil
	// Not w.ctx: an abort after the context ended must still go out.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(w.ctx), 30*time.Second)
	defer cancel()
	_, err := w.b.cli.AbortMultipartUpload(ctx, &s3.AbortMultipartUploadInput{Bucket: &w.b.bucket, Key: w.b.key(w.name), UploadId: id})
	if err != nil && !isNotFound(err) {
		return s3Err("aborting upload of", w.name, err)
	}
	return nil
}

// Open implements Backend: a HEAD for the size; reads are ranged GETs.
func (b *s3Backend) Open(ctx context.Context, name string) (Object, error) {
	if err := checkObjectName(name); err != nil {
		return nil, err
	}
	out, err := b.cli.HeadObject(ctx, &s3.HeadObjectInput{Bucket: &b.bucket, Key: b.key(name)})
	if err != nil {
		return nil, s3Err("opening", name, err)
	}
	return &s3Object{b: b, ctx: context.WithoutCancel(ctx), name: name, size: aws.ToInt64(out.ContentLength), etag: out.ETag}, nil
}

type s3Object struct {
	b    *s3Backend
	ctx  context.Context
	name string
	size int64
	etag *string
}

// Size implements Object.
func (o *s3Object) Size() int64 { return o.size }

// Close implements Object.
func (o *s3Object) Close() error { return nil }

// ReadAt implements io.ReaderAt with one ranged GET. If-Match pins the
// version opened: objects are immutable, so a mismatch means the object
// was deleted and written anew, which the store never does.
func (o *s3Object) ReadAt(p []byte, off int64) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if off >= o.size {
		return 0, io.EOF
	}
	want := min(int64(len(p)), o.size-off)
	ctx, cancel := context.WithTimeout(o.ctx, s3ReadTimeout)
	defer cancel()
	out, err := o.b.cli.GetObject(ctx, &s3.GetObjectInput{
		Bucket: &o.b.bucket, Key: o.b.key(o.name), IfMatch: o.etag,
		Range: aws.String(fmt.Sprintf("bytes=%d-%d", off, off+want-1)),
	})
	if err != nil {
		return 0, s3Err("reading", o.name, err)
	}
	defer out.Body.Close()
	n, err := io.ReadFull(out.Body, p[:want])
	if err != nil {
		return n, fmt.Errorf("reading %q: %w", o.name, err)
	}
	if want < int64(len(p)) {
		return n, io.EOF
	}
	return n, nil
}

// List implements Backend. The lease objects under locks/ are not
// objects of the store.
func (b *s3Backend) List(ctx context.Context, prefix string) ([]ObjectInfo, error) {
	infos, err := b.list(ctx, prefix)
	if err != nil {
		return nil, err
	}
	out := make([]ObjectInfo, 0, len(infos))
	for _, o := range infos {
		if strings.HasPrefix(o.name, locksPrefix) && !strings.HasPrefix(prefix, locksPrefix) {
			continue
		}
		out = append(out, ObjectInfo{Name: o.name, Size: o.size})
	}
	return out, nil
}

type s3Info struct {
	name string
	size int64
	mod  time.Time
}

func (b *s3Backend) list(ctx context.Context, prefix string) ([]s3Info, error) {
	var out []s3Info
	pg := s3.NewListObjectsV2Paginator(b.cli, &s3.ListObjectsV2Input{Bucket: &b.bucket, Prefix: aws.String(b.prefix + prefix)})
	for pg.HasMorePages() {
		page, err := pg.NextPage(ctx)
		if err != nil {
			return nil, s3Err("listing", prefix, err)
		}
		for _, o := range page.Contents {
			name := strings.TrimPrefix(aws.ToString(o.Key), b.prefix)
			if checkObjectName(name) != nil {
				continue // not written by ferry
			}
			out = append(out, s3Info{name: name, size: aws.ToInt64(o.Size), mod: aws.ToTime(o.LastModified)})
		}
	}
	slices.SortFunc(out, func(a, b s3Info) int { return strings.Compare(a.name, b.name) })
	return out, nil
}

// Delete implements Backend. S3 answers a DELETE of a missing key with
// success, so a HEAD first tells the caller it was missing.
func (b *s3Backend) Delete(ctx context.Context, name string) error {
	if err := checkObjectName(name); err != nil {
		return err
	}
	if _, err := b.cli.HeadObject(ctx, &s3.HeadObjectInput{Bucket: &b.bucket, Key: b.key(name)}); err != nil {
		return s3Err("deleting", name, err)
	}
	if _, err := b.cli.DeleteObject(ctx, &s3.DeleteObjectInput{Bucket: &b.bucket, Key: b.key(name)}); err != nil {
		return s3Err("deleting", name, err)
	}
	return nil
}

// RemoveTemp implements TempCleaner: it aborts the multipart uploads left
// under the prefix by writers that died. GC calls it while it holds the
// exclusive lease, when no live writer can own one.
func (b *s3Backend) RemoveTemp(ctx context.Context) (n int, size int64, err error) {
	for _, sub := range []string{"packs/", "snapshots/"} {
		m, s, err := b.abortUploads(ctx, sub)
		n, size = n+m, size+s
		if err != nil {
			return n, size, err
		}
	}
	return n, size, nil
}

// abortUploads aborts the multipart uploads of keys under sub (only
// ferry's own: other keys of the bucket are not its business).
func (b *s3Backend) abortUploads(ctx context.Context, sub string) (n int, size int64, err error) {
	pg := s3.NewListMultipartUploadsPaginator(b.cli, &s3.ListMultipartUploadsInput{Bucket: &b.bucket, Prefix: aws.String(b.prefix + sub)})
	for pg.HasMorePages() {
		page, err := pg.NextPage(ctx)
		if err != nil {
			return n, size, s3Err("listing uploads under", b.prefix, err)
		}
		for _, u := range page.Uploads {
			parts, err := b.cli.ListParts(ctx, &s3.ListPartsInput{Bucket: &b.bucket, Key: u.Key, UploadId: u.UploadId})
			if err == nil {
				for _, p := range parts.Parts {
					size += aws.ToInt64(p.Size)
				}
			}
			_, err = b.cli.AbortMultipartUpload(ctx, &s3.AbortMultipartUploadInput{Bucket: &b.bucket, Key: u.Key, UploadId: u.UploadId})
			if err != nil && !isNotFound(err) {
				return n, size, s3Err("aborting upload of", aws.ToString(u.Key), err)
			}
			n++
		}
	}
	return n, size, nil
}
