// Package image will hold ferry's checkpoint stream format: a header, a
// manifest, CRIU's image files as framed, individually compressed and
// checksummed chunks, and a trailer with an index (issue "Image stream").
// Until then a checkpoint is a directory: see internal/checkpoint.
package image
