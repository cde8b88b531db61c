"""Text sources (.txt, .jsonl, .parquet, a `datasets` name) and calibration sequences of exact length."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from freelunch_cli.core.errors import FreelunchError

# File names that say nothing about the text (tinyshakespeare/input.txt): such a source is named after its folder.
GENERIC_STEMS = {"input", "data", "text", "train", "test", "valid", "validation"}


@dataclass(frozen=True)
class TextSource:
    """A resolved ``--data``/``--ppl`` value."""

    spec: str
    path: Path | None = None
    config: str | None = None
    split: str = "train"
    field: str = "text"
    label: str | None = None  # the alias the user typed, if any

    def signature(self, fingerprint: str) -> dict:
        """What a stage records of its text: the source (a resolved file path or a dataset reference) and the text's
        fingerprint (``text_fingerprint``)."""
        return {
            "data": self.spec if self.path is None else str(self.path.resolve()),
            "data_config": self.config,
            "data_split": self.split if self.path is None else None,
            "data_sha": fingerprint,
        }

    @property
    def name(self) -> str:
        """Short name for file names and tables."""
        if self.label:
            return self.label
        if self.path is not None:
            base = self.path.parent.name if self.path.stem.lower() in GENERIC_STEMS and self.path.parent.name else self.path.stem
        else:
            base = self.spec.replace("/", "_")
        if self.path is None and self.config:
            base += f"-{self.config}"
        if self.path is None:
            base += f"-{self.split}"
        return base


ALIASES = {
    # The perplexity benchmark of the pruning literature: WikiText-2 raw, test split.
    "wikitext2": "Salesforce/wikitext:wikitext-2-raw-v1:test",
}


def resolve_text(
    spec: str, config: str | None = None, split: str | None = None, field: str = "text", default_split: str = "train"
) -> TextSource:
    """A local file, an alias (``wikitext2``), or a `datasets` name ``NAME[:CONFIG[:SPLIT]]`` (options override the parts)."""
    label = spec if spec in ALIASES else None
    spec = ALIASES.get(spec, spec)
    p = Path(spec).expanduser()
    if p.exists():
        if p.is_dir():
            raise FreelunchError(f"{p} is a folder; pass a .txt, .jsonl or .parquet file, or a datasets name")
        if p.suffix.lower() not in (".txt", ".raw", ".jsonl", ".json", ".parquet"):
            raise FreelunchError(f"unsupported text file {p}: use .txt, .jsonl (field {field!r}) or .parquet")
        return TextSource(spec, p, None, split or default_split, field)
    if spec.startswith((".", "/", "~")) or spec.endswith((".txt", ".jsonl", ".parquet", ".raw")):
        raise FreelunchError(f"text file not found: {spec}")
    parts = spec.split(":")
    if len(parts) > 3 or not parts[0]:
        raise FreelunchError(f"bad dataset reference {spec!r}: use NAME, NAME:CONFIG or NAME:CONFIG:SPLIT")
    config = config or (parts[1] if len(parts) > 1 and parts[1] else None)
    split = split or (parts[2] if len(parts) > 2 and parts[2] else default_split)
    return TextSource(parts[0], None, config, split, field, label)


def read_documents(src: TextSource, warn: Callable[[str], None] | None = None) -> list[str]:
    """The documents of a source, in order (a .txt file is one document).

    A record (a .jsonl line, a parquet or dataset row) whose text field is null, missing or not a string holds no
    document: it is skipped, never turned into text such as "None", and ``warn`` is told how many were skipped and
    where (file and line, or row). Raises FreelunchError when ``warn`` is None and a record was skipped, when every
    record was skipped, for a line that is not JSON, or for a file that cannot be read.
    """
    if src.path is not None:
        suffix = src.path.suffix.lower()
        try:
            if suffix == ".raw":  # a WikiText file: one row per line, blank rows empty, as the `datasets` loader gives
                return [line if line.strip() else "" for line in src.path.read_text(encoding="utf-8").splitlines(keepends=True)]
            if suffix == ".txt":
                return [src.path.read_text(encoding="utf-8")]
            if suffix in (".jsonl", ".json"):
                records = []
                with open(src.path, encoding="utf-8") as f:
                    for n, line in enumerate(f, 1):
                        if line.strip():
                            try:
                                rec = json.loads(line)
                            except json.JSONDecodeError:
                                raise FreelunchError(f"{src.path}:{n} is not a JSON object") from None
                            if not isinstance(rec, dict):
                                raise FreelunchError(f"{src.path}:{n} is not a JSON object")
                            records.append((f"line {n}", rec[src.field] if src.field in rec else _MISSING))
                return _strings(records, str(src.path), src.field, "lines", warn)
            import pyarrow.parquet as pq

            table = pq.read_table(src.path)
            if src.field not in table.column_names:
                raise FreelunchError(f"{src.path} has no column {src.field!r} (columns: {', '.join(table.column_names)})")
            rows = table.column(src.field).to_pylist()
            return _strings([(f"row {n}", x) for n, x in enumerate(rows)], str(src.path), src.field, "rows", warn)
        except UnicodeDecodeError as e:
            raise FreelunchError(f"{src.path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise FreelunchError(f"cannot read {src.path}: {e.strerror or e}") from None
    try:
        import datasets

        ds = datasets.load_dataset(src.spec, src.config, split=src.split)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FreelunchError(f"cannot load dataset {src.spec!r} (config {src.config}, split {src.split}): {first}") from None
    if src.field not in ds.column_names:
        raise FreelunchError(f"dataset {src.spec!r} has no column {src.field!r} (columns: {', '.join(ds.column_names)})")
    rows = [(f"row {n}", x) for n, x in enumerate(ds[src.field])]
    return _strings(rows, f"dataset {src.spec!r} ({src.split})", src.field, "rows", warn)


_MISSING = object()  # a record without the text field


def _strings(records: list[tuple[str, object]], where: str, field: str, unit: str, warn) -> list[str]:
    """The string values of ``records`` ((position, value) pairs); the others skipped as ``read_documents`` says."""
    docs = [v for _, v in records if isinstance(v, str)]
    bad = [(pos, v) for pos, v in records if not isinstance(v, str)]
    if not bad:
        return docs

    def what(v) -> str:
        if v is _MISSING:
            return f"no field {field!r}"
        return f"{field!r} is null" if v is None else f"{field!r} is a {type(v).__name__}, not a string"

    examples = ", ".join(f"{pos}: {what(v)}" for pos, v in bad[:3]) + (", ..." if len(bad) > 3 else "")
    if not docs:
        raise FreelunchError(f"{where}: none of its {len(records)} {unit} holds text in {field!r} ({examples})")
    if warn is None:
        raise FreelunchError(f"{where}: {len(bad)} of {len(records)} {unit} hold no string in {field!r} ({examples})")
    warn(f"{where}: skipped {len(bad)} of {len(records)} {unit} whose {field!r} is null, missing or not a string ({examples})")
    return docs


def read_text(src: TextSource, warn: Callable[[str], None] | None = None) -> str:
    """All documents (rows) joined by "\\n\\n", as the WikiText perplexity protocol joins its rows; ``warn`` as for
    ``read_documents``."""
    text = "\n\n".join(read_documents(src, warn))
    if not text.strip():
        raise FreelunchError(f"{src.spec} holds no text")
    return text


def text_fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """One long 1-D tensor of token ids."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=True, verbose=False)["input_ids"][0]
    return ids.to(torch.long)


def sample_sequences(ids: torch.Tensor, samples: int, seqlen: int, seed: int, overlap: bool = False) -> torch.Tensor:
    """``samples`` sequences ``[samples, seqlen]`` (int64 token ids) of exactly ``seqlen`` tokens, reproducible from ``seed``.

    By default the sequences are distinct, non-overlapping slices (a random shift, then a random choice of
    slots): distinct calibration text is what reconstruction learns from. ``overlap=True`` samples start
    offsets freely, for requests larger than the text.
    """
    total = int(ids.numel())
    if samples < 1 or seqlen < 2:
        raise FreelunchError("--samples must be at least 1 and --seqlen at least 2")
    g = torch.Generator().manual_seed(seed)
    if overlap:
        if total < seqlen + 1:
            raise FreelunchError(f"the text has {total} tokens, fewer than one sequence of --seqlen {seqlen}")
        starts = torch.randint(0, total - seqlen + 1, (samples,), generator=g)
    else:
        slots = total // seqlen
        if slots < samples:
            raise FreelunchError(
                f"too little calibration text: {total} tokens make {slots} sequences of {seqlen}, "
                f"but --samples {samples} asks for {samples} x {seqlen} = {samples * seqlen} tokens; "
                f"use more text, fewer --samples or a shorter --seqlen (or --allow-overlap)"
            )
        shift = int(torch.randint(0, total - slots * seqlen + 1, (1,), generator=g))
        chosen = torch.randperm(slots, generator=g)[:samples]
        starts = shift + chosen * seqlen
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
