"""A work directory: its layout, activation cache, manifest, file checks and models, each in a module of its own
(``layout``, ``cache``, ``manifest``, ``integrity``, ``model_files``) and joined here as one ``WorkDir``."""

from __future__ import annotations

from pathlib import Path

from freelunch_cli.workdir.cache import ActivationCache, expand_cache_dir, is_template
from freelunch_cli.workdir.integrity import EVICTED, Integrity
from freelunch_cli.workdir.layout import MODEL_STAGES, STAGE_OF, STAGE_OUTPUTS, STAGES, WINDOW_STAGES, Layout
from freelunch_cli.workdir.manifest import Manifest, StageRecord
from freelunch_cli.workdir.model_files import ModelFiles

__all__ = [
    "EVICTED",
    "MODEL_STAGES",
    "STAGES",
    "STAGE_OF",
    "STAGE_OUTPUTS",
    "WINDOW_STAGES",
    "StageRecord",
    "WorkDir",
    "expand_cache_dir",
    "is_template",
]


class WorkDir(Layout, ActivationCache, Manifest, Integrity, ModelFiles):
    """One work directory: where its files live (``Layout``, ``ActivationCache``), what its stages recorded
    (``Manifest``), whether a file is still what was written (``Integrity``) and which files make up each model
    (``ModelFiles``)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._lock_depth = 0
