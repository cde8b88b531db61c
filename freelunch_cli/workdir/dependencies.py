"""Which stage was built from which: the dependency graph of the stages, read from what each one recorded.

    calibrate -> prune -> reconstruct
    retrain   <- its --from model (dense: calibrate, pruned: prune, reconstructed: reconstruct)
    quantize  <- its --from model (dense, pruned, reconstructed or retrained), and calibrate's dense activations

Every stage also reads calibrate (the dense model, tokenizer and calibration tokens). Redoing a stage (``--force``)
discards exactly the stages built from it, directly or through others; a stage that never read it keeps its work
(a first retrain after quantize keeps the quantized model; redoing prune keeps a retraining of the dense model).
"""

from __future__ import annotations

from freelunch_cli.workdir.layout import STAGE_OF

FIXED_INPUTS = {"calibrate": (), "prune": ("calibrate",), "reconstruct": ("calibrate", "prune")}


def inputs_of(name: str, signature: dict) -> set[str]:
    """The stages whose outputs stage ``name`` (with its recorded ``signature``) read directly."""
    if name in FIXED_INPUTS:
        return set(FIXED_INPUTS[name])
    source = signature.get("from")
    return {"calibrate"} | ({STAGE_OF[source]} if source in STAGE_OF else set())


def dependents(stages: dict[str, dict], name: str) -> list[str]:
    """The recorded stages built from ``name``, directly or through others (``stages``: the manifest's stage records,
    each with its ``signature``), in the order of the pipeline."""
    built_from = {st: inputs_of(st, rec.get("signature", {})) for st, rec in stages.items() if st != name}
    out: set[str] = set()
    changed = True
    while changed:
        changed = False
        for st, inputs in built_from.items():
            if st not in out and (name in inputs or inputs & out):
                out.add(st)
                changed = True
    order = list(STAGE_OF.values())
    return sorted(out, key=lambda s: order.index(s) if s in order else len(order))
