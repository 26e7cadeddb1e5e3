package dump

import "errors"

// ErrNotCheckpointable means the walk found something in the tree that
// cannot be checkpointed, or that needs a flag the user did not give.
var ErrNotCheckpointable = errors.New("tree cannot be checkpointed as asked")

// ErrBadOutput means the checkpoint cannot be written where asked.
var ErrBadOutput = errors.New("cannot write the checkpoint there")

// ErrNoProcess means --pid names no process.
var ErrNoProcess = errors.New("no such process")

// ErrBadPid means --pid names a process ferry must not checkpoint.
var ErrBadPid = errors.New("not a process tree ferry can checkpoint")
