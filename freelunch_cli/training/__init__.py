"""Training on plain modules and tensors: the masked AdamW loop, PEFT variants, and next-token training of a whole
model. Nothing here reads or writes a work directory."""
