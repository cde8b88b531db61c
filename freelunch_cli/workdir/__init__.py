"""The work directory, the interface between stages: its layout and manifest, crash-safe files, locks, and the
protocol every stage follows (lock, begin or resume, finish, summarise)."""
