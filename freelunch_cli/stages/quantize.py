"""Stage: quantization-aware local reconstruction (or round-to-nearest with ``--steps 0``) of any model in the directory.

Each window trains its weights through a straight-through fake-quantizer (``quantization.fake_quant``), pruned weights
held at exactly zero, to match the dense model's activations, exactly as ``reconstruct`` does for pruning: one
mechanism repairs both errors. Windows, claims, shards, resume and assembly are reconstruct's (``run_windows``); the
quantized model is written to ``quant/`` (dequantized weights, so every stage reads it as any model) with its scales
and zero points in ``quant/qparams/``, which ``export --format compressed-tensors`` packs.
"""

from __future__ import annotations

from dataclasses import replace

from freelunch_cli.configs.stage_configs import QuantizeConfig
from freelunch_cli.core.console import Reporter
from freelunch_cli.core.device import dtype_name, resolve
from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.engine.claims import detect_shard
from freelunch_cli.engine.models import latest_model, require_model
from freelunch_cli.engine.runner import WindowJob
from freelunch_cli.engine.windowed import plan_windows, run_windows
from freelunch_cli.quantization.fake_quant import prepare_qat
from freelunch_cli.workdir.directory import STAGE_OF, WorkDir
from freelunch_cli.workdir.files import tensor_shapes


def quantize(work: WorkDir, cfg: QuantizeConfig, rep: Reporter | None = None, resume: bool = False, force: bool = False) -> dict:
    """Quantize the model ``cfg.start`` window by window; returns the stage summary (or, for a sharded worker whose
    windows are done while another assembles, what it ran).

    Raises FreelunchError for a bad option, a missing or unfinished source model, a matrix whose inputs do not split
    into ``--group-size`` groups, or a configuration other than the one an existing run used (without ``--force``).
    """
    rep = rep or Reporter(quiet=True)
    cfg.validate()
    scheme = cfg.quant_scheme()
    device, compute = resolve(cfg.device, cfg.dtype)
    cfg = replace(cfg, dtype=dtype_name(compute))
    shard = detect_shard(cfg.shard)
    if shard is not None and cfg.inputs == "sparse":
        raise FreelunchError("--inputs sparse chains windows in order and cannot be sharded; use --inputs dense with --shard")
    if shard is not None and force:
        raise FreelunchError(
            "--force cannot be combined with sharded workers (each would start over); run "
            "`freelunch quantize --prepare --force ...` once, then start the workers"
        )
    source = _source_model(work, cfg.start)
    cfg = cfg.resolved(source)
    work.check_model(source)  # every block there before the stage begins
    for i in range(work.stage("calibrate").summary["num_blocks"]):  # every block, before anything is written
        scheme.check_block(tensor_shapes(work.model_block_path(source, i)), f"block {i}: ")
    windows = plan_windows(work, cfg.window)

    def prepare(scope, masks, index, storage_dtype):
        return prepare_qat(scope, masks, scheme, cfg.learn_scales, storage_dtype, cfg.scale_lr / cfg.rate()[0])

    job = WindowJob(stage="quantize", source=source, stream="quant", masks=source != "dense", prepare=prepare)
    trains = (
        "round-to-nearest (no training)"
        if cfg.steps == 0
        else (
            f"quantization-aware, {cfg.describe_rate()}, {cfg.steps or cfg.epochs} {'steps' if cfg.steps else 'epoch(s)'}, "
            f"batch {cfg.batch_size}, loss {cfg.loss}" + (f", learned scales (lr {cfg.scale_lr})" if cfg.learn_scales else "")
        )
    )
    what = f"{scheme.describe()} of the {source} model; {trains}"
    signature = cfg.signature(source, work.stage(STAGE_OF[source]).run_id)
    return run_windows(work, cfg, job, windows, signature, (device, compute), shard, what, rep, resume, force)


def _source_model(work: WorkDir, start: str) -> str:
    """The model ``--from`` names, finished; ``latest`` is the most processed one before quantization."""
    if start == "latest":
        return latest_model(work, quantized=False)
    return require_model(work, start)
