"""Where a work directory's activation caches live: ``WORK/acts``, or the folder calibrate's ``--cache-dir`` named,
which may be a template (``$TMPDIR/fl``) that each process expands, so that every node keeps a cache of its own."""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

from freelunch_cli.core.errors import FreelunchError

_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def is_template(folder: str) -> bool:
    """Whether a folder names environment variables (``$SLURM_JOB_ID``, ``${TMPDIR}``) to expand in each process."""
    return bool(_VARIABLE.search(folder))


def expand_cache_dir(folder: str) -> Path:
    """A cache folder with its environment variables (and ``~``) expanded; FreelunchError naming one that is unset."""
    unset = [a or b for a, b in _VARIABLE.findall(folder) if (a or b) not in os.environ]
    if unset:
        raise FreelunchError(
            f"the activation cache folder {folder} names ${unset[0]}, which is not set in this process; set it (e.g. "
            f"to node-local scratch) or run calibrate with another --cache-dir"
        )
    return Path(os.path.expanduser(os.path.expandvars(folder)))


class ActivationCache:
    """The activation cache's folder and file paths (a mixin of ``WorkDir``; the folder is read from the manifest)."""

    root: Path

    @property
    def acts_dir(self) -> Path:
        """Where activation caches live: ``WORK/acts``, or the ``--cache-dir`` calibrate was given. A template with
        environment variables (``$SLURM_JOB_ID``, ``$TMPDIR``) is stored as written and expanded by each process, so every
        node has a cache of its own; FreelunchError naming a variable that is not set."""
        if not hasattr(self, "_acts_dir"):
            cache = self.manifest().get("cache_dir") if self.exists() else None
            self._acts_dir = expand_cache_dir(cache) if cache else self.root / "acts"
        return self._acts_dir

    @property
    def cache_per_node(self) -> bool:
        """Whether the activation cache is a template (``--cache-dir '$TMPDIR/fl'``): one folder per node."""
        return self.exists() and is_template(self.manifest().get("cache_dir") or "")

    def acts_dir_here(self) -> Path | None:
        """``acts_dir``, or None where its template names an environment variable this process lacks (no cache here)."""
        try:
            return self.acts_dir
        except FreelunchError:
            return None

    def act_path(self, stream: str, name: str) -> Path:
        """An activation file of a stream (dense, pruned, recon) by name (``boundary_003``, ``mid_002``)."""
        return self.acts_dir / stream / f"{name}.safetensors"

    def boundary_path(self, stream: str, i: int) -> Path:
        """The hidden state entering block ``i`` (``i`` = number of blocks: the last block's output)."""
        return self.act_path(stream, f"boundary_{i:03d}")

    def set_cache_dir(self, folder: str | Path | None, fresh: bool = False) -> None:
        """Keep activations in a folder of their own under ``folder`` (e.g. node-local scratch); a template with
        environment variables is kept as written (see ``acts_dir``), any other folder as an absolute path. ``fresh``
        (a calibration that starts over) always takes a new folder, so that no node reads another run's copies."""
        with self.update() as m:
            current, base = m.get("cache_dir"), None
            if folder is not None:
                base = str(folder).rstrip("/") if is_template(str(folder)) else str(Path(folder).expanduser().resolve())
            if base is None:
                m["cache_dir"] = None
            elif fresh or not (current and str(Path(current).parent) == str(Path(base))):
                m["cache_dir"] = f"{base}/freelunch-{self.root.resolve().name}-{uuid.uuid4().hex[:8]}"
        self.__dict__.pop("_acts_dir", None)
