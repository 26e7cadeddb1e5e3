package dump

import "errors"

// ErrNotCheckpointable means the walk found something in the tree that
// cannot be checkpointed, or that needs a flag the user did not give.
var ErrNotCheckpointable = errors.New("tree cannot be checkpointed as asked")
