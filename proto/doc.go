// Package proto will hold ferry's own .proto messages and their generated
// Go code (the stream manifest, the migration protocol). CRIU's own
// messages come from github.com/checkpoint-restore/go-criu/v7.
package proto
