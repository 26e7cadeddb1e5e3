package main

import (
	"context"
	"errors"

	"io/fs"
	"net"

	"github.com/urfave/cli/v2"

	"github.com/ferry-cr/ferry/internal/checkpoint"

	"github.com/ferry-cr/ferry/dump"
	"github.com/ferry-cr/ferry/freezer"
	"github.com/ferry-cr/ferry/image"
	"github.com/ferry-cr/ferry/internal/cgroup"
	"github.com/ferry-cr/ferry/internal/criu"
	"github.com/ferry-cr/ferry/internal/job"
	"github.com/ferry-cr/ferry/internal/lease"
	"github.com/ferry-cr/ferry/migrate"
	"github.com/ferry-cr/ferry/store"
)

// Exit statuses, one per kind of failure, so scripts can tell them apart.
// The README lists them; keep the two in step.
const (
	exitOK                = 0
	exitFailure           = 1 // anything not listed below
	exitUsage             = 2 // bad flags or arguments
	exitNotRoot           = 3
	exitNoJob             = 4 // no such job
	exitNameInUse         = 5 // job name taken or invalid
	exitCommandNotFound   = 6
	exitCriu              = 7 // CRIU missing or too old
	exitNoCgroup          = 8 // no usable cgroup hierarchy
	exitNotReady          = 9 // ferry doctor: host cannot checkpoint/restore
	exitNotRunning        = 10
	exitFreeze            = 11 // the job did not freeze in time (and was thawed)
	exitCheckpoint        = 12 // CRIU could not checkpoint the job (it keeps running)
	exitRestore           = 13 // CRIU could not restore (nothing is left running)
	exitBadCheckpoint     = 14 // not a checkpoint, truncated, or an unsupported version
	exitExists            = 15 // output exists and --force was not given
	exitNotCheckpointable = 16 // the walk found state that cannot be checkpointed as asked
	exitBadOutput         = 17 // the output path cannot be written (missing directory, not a directory)
	exitBadPid            = 18 // --pid names pid 1, ferry itself or an ancestor, or a kernel thread
	exitMigrate           = 19 // migration failed; the job keeps running on the source
	exitAuth              = 20 // the migration peer refused the token (nothing of the job was sent)
	exitRefused           = 21 // the destination refused the job (e.g. its name is taken there)
	exitInDoubt           = 22 // migration outcome in doubt: one frozen copy kept, see ferry list
	exitModeUnavailable   = 23 // the migration mode cannot run here
	exitStore             = 24 // the snapshot store cannot be opened or used (busy, not a store, newer format)
	exitNoSnapshot        = 25 // no snapshot matches JOB[@SNAPSHOT] (or the prefix is ambiguous)
	exitSnapshotted       = 26 // --checkpoint-on-term: the job was ended by its final snapshot
	exitBusy              = 27 // another ferry operation holds the job (a checkpoint, a migration, a snapshot)
	exitOutputLost        = 28 // the checkpoint could not be written or delivered whole; the job keeps running
	exitVersion           = 29 // the migration peer speaks another protocol version (nothing of the job was sent)
	exitInterrupted       = 130
)

type usageError struct{ error }

func (e usageError) Unwrap() error { return e.error }

var exitCodes = []struct {
	err  error
	code int
}{
	{errNotRoot, exitNotRoot},
	{dump.ErrOutputLost, exitOutputLost},
	{job.ErrNotFound, exitNoJob},
	{job.ErrExists, exitNameInUse},
	{job.ErrInvalidName, exitNameInUse},
	{job.ErrCommandNotFound, exitCommandNotFound},
	{job.ErrNotRunning, exitNotRunning},
	{lease.ErrBusy, exitBusy},
	{lease.ErrExpired, exitCheckpoint},
	{criu.ErrNotFound, exitCriu},
	{criu.ErrTooOld, exitCriu},
	{cgroup.ErrNoHierarchy, exitNoCgroup},
	{checkpoint.ErrNotCheckpoint, exitBadCheckpoint},
	{checkpoint.ErrIncomplete, exitBadCheckpoint},
	{checkpoint.ErrUnsupportedVersion, exitBadCheckpoint},
	{checkpoint.ErrExecutableChanged, exitRestore},
	{image.ErrBadMagic, exitBadCheckpoint},
	{image.ErrUnsupportedVersion, exitBadCheckpoint},
	{image.ErrTruncated, exitBadCheckpoint},
	{image.ErrCorrupt, exitBadCheckpoint},
	{image.ErrRecordTooLarge, exitBadCheckpoint},
	{fs.ErrExist, exitExists},
	{dump.ErrNotCheckpointable, exitNotCheckpointable},
	{dump.ErrBadOutput, exitBadOutput},
	{dump.ErrNoProcess, exitNoJob},
	{dump.ErrBadPid, exitBadPid},
	{migrate.ErrAuth, exitAuth},
	{migrate.ErrVersion, exitVersion},
	{migrate.ErrRefused, exitRefused},
	{migrate.ErrInDoubt, exitInDoubt},
	{migrate.ErrUnsupportedMode, exitModeUnavailable},
	{store.ErrNoSnapshot, exitNoSnapshot},
	{store.ErrAmbiguous, exitNoSnapshot},
	{store.ErrCorrupt, exitBadCheckpoint},
	{store.ErrBadName, exitNameInUse},
	{store.ErrBusy, exitStore},
	{store.ErrNotStore, exitStore},
	{store.ErrUnsupportedVersion, exitStore},
}

// codedError gives an error the exit status of the command it came from
// when no more specific one applies.
type codedError struct {
	error
	code int
}

func (e codedError) Unwrap() error { return e.error }

func withCode(err error, code int) error {
	if err == nil || exitCode(err) != exitFailure {
		return err
	}
	return codedError{err, code}
}

func exitCode(err error) int {
	var ue usageError
	if errors.As(err, &ue) {
		return exitUsage
	}
	// Only a deliberate cli.Exit at the top: wrapped errors may carry an
	// *exec.ExitError of some child, which also has ExitCode.
	if ec, ok := err.(cli.ExitCoder); ok {
		return ec.ExitCode()
	}
	var ce codedError
	if errors.As(err, &ce) {
		return ce.code
	}
	var fe *freezer.FreezeError
	if errors.As(err, &fe) {
		return exitFreeze
	}
	for _, e := range exitCodes {
		if errors.Is(err, e.err) {
			return e.code
		}
	}
	if errors.Is(err, context.Canceled) {
		return exitInterrupted
	}
	if ae := (*net.AddrError)(nil); errors.As(err, &ae) {
		return exitUsage // an address given on the command line that does not parse
	}
	return exitFailure
}
