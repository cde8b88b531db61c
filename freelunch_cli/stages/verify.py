"""`freelunch verify`: hash every file the work directory's manifest records, beside whatever else runs.

Stages trust a file whose size and modification time are the ones recorded when it was written (and any file the
same process wrote); this command is the full check: every file's sha256 against its record, several files at a
time (hashing releases the interpreter lock, so threads hash in parallel).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from freelunch_cli.core.console import Reporter
from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.core.units import format_bytes
from freelunch_cli.workdir.directory import WorkDir


def verify(work: WorkDir, rep: Reporter | None = None, threads: int | None = None) -> dict:
    """Hash every recorded file that exists; return the counts, the damaged files by stage and the files evicted on
    purpose (activation caches deleted once no stage needs them). Raises FreelunchError naming the missing or damaged
    files and the command that recomputes them, when there are any."""
    rep = rep or Reporter(quiet=True)
    if not work.exists():
        raise FreelunchError(f"{work.root} is not a freelunch work directory (no manifest.json)")
    files = work.manifest()["files"]
    gone = {rel: rec for rel, rec in files.items() if not work.path_of(rel).exists()}
    evicted = [rel for rel, rec in gone.items() if rec.get("evicted")]
    missing = [rel for rel in gone if rel not in evicted]
    present = {rel: rec for rel, rec in files.items() if rel not in gone}
    damaged: dict[str, list[str]] = {}
    with ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool, rep.progress("verify", total=len(present)) as bar:
        checks = {rel: pool.submit(work.problem, work.path_of(rel), rec, "full") for rel, rec in present.items()}
        for rel, check in checks.items():
            if check.result() is not None:
                damaged.setdefault(work.owner_stage_of(rel), []).append(rel)
            bar.advance()
    for rel in missing:  # deleted, but not on purpose: as damaged as an altered file
        damaged.setdefault(work.owner_stage_of(rel), []).append(rel)
    total = sum(rec["size"] for rec in present.values())
    summary = {"work": str(work.root), "files": len(present), "bytes": total, "damaged": damaged, "evicted": evicted}
    if damaged:
        stages = ", ".join(f"`freelunch {st} --work {work.root} --resume`" for st in damaged)
        names = [rel for rels in damaged.values() for rel in rels]
        more = ", ..." if len(names) > 6 else ""
        raise FreelunchError(
            f"{len(names)} of {len(present) + len(missing)} files are missing or damaged ({', '.join(names[:6])}{more}); "
            f"{stages} recomputes them"
        )
    note = f"; {len(evicted)} evicted on purpose (activations and window parameters no stage needs)" if evicted else ""
    rep.summary(f"verified {len(present)} files ({format_bytes(total)}) in {work.root}: all match their records{note}", summary)
    return summary
