"""freelunch: prune large language models, then repair them with local reconstruction."""

__version__ = "0.1.0"
