"""llm-compressor's GPTQ W4A16 on a Hugging Face folder, with the calibration windows of a freelunch work directory.

Run it with llm-compressor's own Python (never a dependency of freelunch), e.g.
``python3 -m venv /tmp/llmc && /tmp/llmc/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1``:

    /tmp/llmc/bin/python bench/llmc_gptq.py HF_FOLDER WORK_DIR OUT_FOLDER [GROUP_SIZE=64]

Its own pipeline: ``oneshot`` with a ``GPTQModifier`` recipe (symmetric 4-bit integer weights in groups, lm_head left
alone) on the same token windows freelunch calibrated on, saved compressed (pack-quantized). Prints one JSON line:
seconds of ``oneshot``, peak RSS (MiB) and the folder.
"""

import json
import resource
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

hf, work, out = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
group = int(sys.argv[4]) if len(sys.argv) > 4 else 64
torch.manual_seed(0)
ids = load_file(str(work / "calib" / "tokens.safetensors"))["input_ids"]
n, seqlen = ids.shape
tok = AutoTokenizer.from_pretrained(hf)
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()

from llmcompressor import oneshot  # noqa: E402
from llmcompressor.modifiers.quantization import GPTQModifier  # noqa: E402

recipe = GPTQModifier(
    targets=["Linear"],
    ignore=["lm_head"],
    config_groups={
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group},
        }
    },
)
t0 = time.time()
oneshot(model=model, processor=tok, dataset=ds, recipe=recipe, num_calibration_samples=n, max_seq_length=seqlen)
seconds = time.time() - t0
model.save_pretrained(out, save_compressed=True)
tok.save_pretrained(out)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(
    json.dumps(
        {
            "peer": "llm-compressor GPTQ",
            "group_size": group,
            "samples": n,
            "seqlen": seqlen,
            "oneshot_s": round(seconds, 1),
            "peak_rss_mib": round(peak),
            "out": out,
        }
    )
)
