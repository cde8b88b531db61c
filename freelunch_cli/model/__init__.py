"""The model, streamed: where it comes from, where its blocks are, running it one block at a time, and the activations
and hooks the stages read from it."""
