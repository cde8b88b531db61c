"""Prototype: after block reconstruction, train only an untied output head (+ final norm) with next-token loss
on cached final hidden states of the calibration sequences. Does a memory-light 'head window' capture the
domain fit that global retraining gets? Not shipped: the head holds little of it (docs/results.md, levers that did
not help). Usage: python bench/proto_head_window.py WORK STAGE lr[,lr...] [epochs]"""

import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformers import AutoTokenizer

from freelunch_cli.evaluation.perplexity import split_sequences
from freelunch_cli.model.assembly import materialize
from freelunch_cli.model.text import read_text, resolve_text, tokenize
from freelunch_cli.workdir.directory import WorkDir
from freelunch_cli.workdir.files import load_tensors

from common import HELDOUT, SHAKESPEARE  # bench/ is this script's own folder, first on sys.path

torch.manual_seed(0)
work, stage = WorkDir(Path(sys.argv[1])), sys.argv[2]
lrs = [float(x) for x in sys.argv[3].split(",")]
epochs = int(sys.argv[4]) if len(sys.argv) > 4 else 1
model = materialize(work, stage, torch.device("cpu"), torch.float32).eval()
tok = AutoTokenizer.from_pretrained(work.model_dir("dense"))
calib = load_tensors(work.tokens_path)["input_ids"]


def windows(path):
    return split_sequences(tokenize(tok, read_text(resolve_text(path))), 512, 40)


evals = {"wikitext": windows(str(HELDOUT)), "shakespeare": windows(str(SHAKESPEARE))}

t0 = time.time()
# the states entering the final norm, through a hook (HF's hidden_states[-1] is after the norm)
pre = []
h = model.model.norm.register_forward_hook(lambda m, i, o: pre.append(i[0].detach()))


def cache(ids):
    pre.clear()
    with torch.no_grad():
        for s in range(0, len(ids), 4):
            model.model(input_ids=ids[s : s + 4], use_cache=False)
    return torch.cat(pre)


Hc = cache(calib)
He = {k: cache(v) for k, v in evals.items()}
h.remove()
print(f"cached states in {time.time() - t0:.0f}s", flush=True)
norm_w0, head_w0 = model.model.norm.weight.detach().clone(), model.lm_head.weight.detach().clone()
eps = model.config.rms_norm_eps


def logits(hpre, nw, hw):
    x = hpre * torch.rsqrt(hpre.pow(2).mean(-1, keepdim=True) + eps) * nw
    return x @ hw.T


@torch.no_grad()
def ppl(H, ids, nw, hw):
    nll, n = 0.0, 0
    for j in range(len(ids)):
        lg = logits(H[j : j + 1], nw, hw)[0, :-1]
        nll += float(F.cross_entropy(lg, ids[j, 1:], reduction="sum"))
        n += ids.shape[1] - 1
    return math.exp(nll / n)


res = {"work": str(work.root), "stage": stage, "base": {k: ppl(He[k], evals[k], norm_w0, head_w0) for k in evals}}
print("base", res["base"], flush=True)
for lr in lrs:
    nw = norm_w0.clone().requires_grad_(True)
    hw = head_w0.clone().requires_grad_(True)
    opt = torch.optim.AdamW([nw, hw], lr=lr, weight_decay=0.0)
    steps = epochs * math.ceil(len(calib) / 4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)  # noqa: B023 (used within this iteration)
    t1 = time.time()
    for ep in range(epochs):
        order = torch.randperm(len(calib), generator=torch.Generator().manual_seed(ep))
        for s in range(0, len(calib), 4):
            b = order[s : s + 4]
            lg = logits(Hc[b], nw, hw)[:, :-1]
            loss = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), calib[b][:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    r = {k: ppl(He[k], evals[k], nw.detach(), hw.detach()) for k in evals}
    r["seconds"] = round(time.time() - t1, 1)
    res[f"lr{lr}"] = r
    print(f"lr {lr}: {r}", flush=True)
print(json.dumps(res))
