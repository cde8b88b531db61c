"""Which matrices are pruned: ``--skip`` patterns and ``--skip-blocks`` ranges, each checked to select something."""

from __future__ import annotations

import fnmatch
import re

from freelunch_cli.core.errors import FreelunchError


def parse_blocks(text: str | None, num_blocks: int) -> set[int]:
    """Block indices of ``--skip-blocks`` (``0``, ``0,3-5``, ``-1`` for the last); FreelunchError for one the model
    lacks or a malformed range."""
    if not text:
        return set()
    out = set()
    for part in (p.strip() for p in text.split(",") if p.strip()):
        m = re.fullmatch(r"(-?\d+)(?:\s*-\s*(\d+))?", part)
        if not m:
            raise FreelunchError(f"--skip-blocks takes block numbers and ranges such as 0,3-5; got {part!r}")
        first = int(m.group(1)) % num_blocks if int(m.group(1)) < 0 else int(m.group(1))
        last = int(m.group(2)) if m.group(2) is not None else first
        if not 0 <= first <= last < num_blocks:
            raise FreelunchError(f"--skip-blocks {part}: the model has blocks 0 to {num_blocks - 1}")
        out.update(range(first, last + 1))
    return out


def _names(layers_path: str, block: int, name: str) -> list[str]:
    """What a pattern may match: the matrix's name in its block (``mlp.down_proj``), its last part (``down_proj``),
    and every dotted tail of its full name in the model (``layers.0.mlp.down_proj``, ``0.mlp.down_proj``, ...)."""
    full = f"{layers_path}.{block}.{name}".split(".")
    return [name, name.rsplit(".", 1)[-1]] + [".".join(full[k:]) for k in range(len(full))]


def skipped_matrices(
    matrices: dict[int, list[str]], patterns: list[str], blocks: set[int], layers_path: str
) -> set[tuple[int, str]]:
    """(block, matrix) pairs left dense by ``--skip`` fnmatch ``patterns`` or by ``--skip-blocks``.

    ``matrices``: each block's prunable matrices by name. Raises FreelunchError naming every pattern that matches no
    matrix (a typo, or a tensor outside the decoder blocks such as ``lm_head``), and when nothing is left to prune.
    """
    skipped, used = set(), set()
    for block, names in matrices.items():
        for name in names:
            hits = [p for p in patterns if any(fnmatch.fnmatchcase(n, p) for n in _names(layers_path, block, name))]
            used.update(hits)
            if hits or block in blocks:
                skipped.add((block, name))
    unused = [p for p in patterns if p not in used]
    if unused:
        example = next(iter(matrices.values()), [])
        raise FreelunchError(
            f"--skip {', '.join(repr(p) for p in unused)} matches no matrix of the decoder blocks (the embeddings and the "
            f"head are never pruned); block matrices are named like {', '.join(example[:3])}, or with their block: "
            f"{layers_path}.0.{example[0] if example else 'NAME'}; --skip-blocks leaves whole blocks dense"
        )
    if matrices and len(skipped) == sum(len(v) for v in matrices.values()):
        raise FreelunchError("--skip and --skip-blocks leave every matrix dense: nothing to prune")
    return skipped
