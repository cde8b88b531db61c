"""Which model of a work directory a stage reads: ``latest`` or a named one, checked to be complete."""

from __future__ import annotations

from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.engine.records import missing_windows
from freelunch_cli.workdir.directory import MODEL_STAGES, STAGE_OF, WorkDir


def _unfinished_reconstruction(work: WorkDir) -> FreelunchError:
    return FreelunchError(
        f"reconstruct did not finish in {work.root} (missing windows: {missing_windows(work)}); "
        f"rerun `freelunch reconstruct --work {work.root} --resume`, or pass --stage pruned"
    )


def latest_model(work: WorkDir, quantized: bool = True) -> str:
    """The most processed model the directory holds: quantized > retrained > reconstructed > pruned > dense
    (``quantized=False``: the latest before quantization).

    Raises FreelunchError when the latest stage did not finish (naming the command that finishes it).
    """
    work.require_done("calibrate", "this command")
    quant = work.stage("quantize") if quantized else None
    if quant is not None:
        if quant.status != "done":
            raise FreelunchError(
                f"quantize did not finish in {work.root} (missing windows: {missing_windows(work, 'quantize')}); rerun "
                f"`freelunch quantize --work {work.root} --resume`, or pass --stage"
            )
        return "quantized"
    ret = work.stage("retrain")
    if ret is not None:
        if ret.status != "done":
            raise FreelunchError(
                f"retrain did not finish in {work.root}; rerun `freelunch retrain --work {work.root} --resume`, or pass --stage"
            )
        return "retrained"
    rec, pr = work.stage("reconstruct"), work.stage("prune")
    if rec is not None:
        if rec.status != "done":
            raise _unfinished_reconstruction(work)
        return "reconstructed"
    if pr is not None:
        if pr.status != "done":
            raise FreelunchError(f"prune did not finish in {work.root}; rerun `freelunch prune --work {work.root} --resume`")
        return "pruned"
    return "dense"


def require_model(work: WorkDir, stage: str) -> str:
    """The model ``stage`` names (``latest`` or one of MODEL_STAGES), checked to exist and be complete."""
    if stage == "latest":
        return latest_model(work)
    if stage not in MODEL_STAGES:
        raise FreelunchError(f"--stage must be latest or one of {', '.join(MODEL_STAGES)}")
    work.require_done("calibrate", "this command")
    st = work.stage(STAGE_OF[stage])
    if stage == "reconstructed" and st is not None and st.status != "done":
        raise _unfinished_reconstruction(work)
    if st is None or st.status != "done":
        raise FreelunchError(f"no finished {stage} model in {work.root}")
    return stage
