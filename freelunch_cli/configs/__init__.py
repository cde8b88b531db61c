"""Stage configurations: one torch-free dataclass per stage (defaults, help, validation, signature)."""
