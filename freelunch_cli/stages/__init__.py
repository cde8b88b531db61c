"""The stages, one module per subcommand: the only layer that combines the work directory, the model, pruning,
training, reconstruction and evaluation."""
