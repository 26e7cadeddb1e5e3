package dump

import "errors"

// ErrNotCheckpointable means the walk found something in the tree that
// cannot be checkpointed, or that needs a flag the user did not give.
var ErrNotCheckpointable = errors.New("tree cannot be checkpointed as asked")

// ErrBadOutput means the checkpoint cannot be written where asked.
var ErrBadOutput = errors.New("cannot write the checkpoint there")
