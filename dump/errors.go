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

// ErrNoPostCopy means the tree cannot be the source of a post-copy
// migration: that needs a job frozen by its own cgroup (see PostCopy).
var ErrNoPostCopy = errors.New("post-copy needs a ferry job frozen by its own cgroup (not a restored foreign tree)")
