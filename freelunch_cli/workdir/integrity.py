"""Whether a file a stage recorded is still what was written: missing, evicted on purpose, truncated or altered.

The size is always checked; the hash by policy (``FREELUNCH_VERIFY``: ``mtime`` by default, ``full`` or ``size``)."""

from __future__ import annotations

import os
from pathlib import Path

from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.workdir.files import sha256_file
from freelunch_cli.workdir.manifest import VERIFIED

EVICTED = "evicted"  # problem() of a file deleted on purpose: needed again, it is recomputed, never damage


class Integrity:
    """File checks against the manifest's records (a mixin of ``WorkDir``)."""

    def problem(self, path: Path, record: dict | None = None, policy: str | None = None) -> str | None:
        """What is wrong with a file the manifest recorded (``"missing"``, ``EVICTED``, truncated, altered), or None.

        The size is always checked. Then, by ``policy`` (default ``FREELUNCH_VERIFY``, else ``mtime``): ``mtime`` trusts
        a file whose modification time is the one recorded when it was written and hashes any other; ``full`` hashes
        every file (once per process); ``size`` hashes none. A file this process wrote or hashed is never hashed again.
        """
        path = Path(path)
        rec = record if record is not None else self.manifest()["files"].get(self.rel(path))
        if not path.exists():
            return EVICTED if rec is not None and rec.get("evicted") else "missing"
        st = path.stat()
        if rec is None:
            return None
        if st.st_size != rec["size"]:
            return f"{st.st_size} bytes where {rec['size']} were written: truncated or altered"
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns, rec["sha256"])
        policy = policy or os.environ.get("FREELUNCH_VERIFY") or self._default_policy(path)
        if key in VERIFIED or policy == "size" or (policy == "mtime" and rec.get("mtime_ns") == st.st_mtime_ns):
            return None
        if sha256_file(path).sha256 != rec["sha256"]:
            return "its contents do not match the hash recorded when it was written: altered or corrupt"
        VERIFIED.add(key)
        return None

    def _default_policy(self, path: Path) -> str:
        """``mtime``; ``size`` for activations in a per-node cache, whose record (modification time and hash) is that of
        the node that wrote its copy last: each node computes its own copy, and hashing hundreds of GB on every node
        would cost more than the pass that wrote them."""
        if self.cache_per_node and self.rel(path).startswith("acts/"):
            return "size"
        return "mtime"

    def check_file(self, path: Path) -> Path:
        """The path, once checked against its manifest record; FreelunchError naming it and the command that recomputes
        it otherwise (an evicted file is recomputed by the stage that needs it, before it reads it)."""
        path = Path(path)
        trouble = self.problem(path)
        if trouble is not None:
            stage = self.owner_stage_of(self.rel(path))
            what = {"missing": "missing", EVICTED: "evicted (deleted once no stage needed it)"}.get(
                trouble, f"damaged ({trouble})"
            )
            raise FreelunchError(f"{path} is {what}; rerun `freelunch {stage} --work {self.root} --resume` to recompute it")
        return path

    def damaged_files(self, stage: str) -> list[str]:
        """Manifest keys of the files a stage recorded that are now missing or damaged (evicted ones are neither)."""
        files = self.manifest()["files"]
        return [
            rel
            for rel, rec in files.items()
            if self.owner_stage_of(rel) == stage and self.problem(self.path_of(rel), rec) not in (None, EVICTED)
        ]
