"""Where every file of a work directory lives: the layout, written down in one place (``docs/workdir.md`` describes
it for users). Paths only: nothing here reads the manifest or touches a file."""

from __future__ import annotations

from pathlib import Path

STAGES = ("calibrate", "prune", "reconstruct", "retrain", "quantize")
# What each stage writes, relative to the work directory; cleared when the stage starts over.
STAGE_OUTPUTS = {
    "calibrate": ["calib", "acts", "dense"],
    "prune": ["prune", "pruned", "acts/pruned"],
    "reconstruct": ["windows", "recon", "acts/recon"],
    "retrain": ["retrain"],
    "quantize": ["quant", "acts/quant"],
}
MODEL_STAGES = ("dense", "pruned", "reconstructed", "retrained", "quantized")
STAGE_OF = {
    "dense": "calibrate",
    "pruned": "prune",
    "reconstructed": "reconstruct",
    "retrained": "retrain",
    "quantized": "quantize",
}  # who makes each model
MODEL_FOLDERS = {"dense": "dense", "pruned": "pruned", "reconstructed": "recon", "retrained": "retrain", "quantized": "quant"}
WINDOW_STAGES = {"reconstruct": "reconstructed", "quantize": "quantized"}  # stages that run windows, and their model


class Layout:
    """Paths of one work directory's files (activation caches: ``workdir.cache``)."""

    root: Path

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def lock_path(self, name: str) -> Path:
        """The lock file of a stage (``.prune.lock``), of the manifest or of assembly."""
        return self.root / f".{name}.lock"

    # ---- models ----------------------------------------------------------------------------------------
    def model_dir(self, stage: str) -> Path:
        return self.root / MODEL_FOLDERS[stage]

    def block_path(self, stage: str, i: int) -> Path:
        return self.model_dir(stage) / f"block_{i:03d}.safetensors"

    def own_rest_path(self, stage: str) -> Path:
        """Where a model stage keeps its own embeddings, final norm and head (only dense and retrained have them)."""
        return self.model_dir(stage) / "rest.safetensors"

    @property
    def tokens_path(self) -> Path:
        return self.root / "calib" / "tokens.safetensors"

    def input_stats_path(self, i: int) -> Path:
        """Per-input sums of squares of block ``i``'s matrices on the dense calibration stream, gathered by calibrate's
        dense pass (Wanda's and RIA's statistics with ``prune --stats dense``)."""
        return self.root / "calib" / "stats" / f"block_{i:03d}.safetensors"

    # ---- prune ------------------------------------------------------------------------------------------
    def mask_path(self, i: int) -> Path:
        return self.root / "prune" / "masks" / f"block_{i:03d}.safetensors"

    def prune_block_record_path(self, i: int) -> Path:
        """Per-block record of what prune did (achieved sparsity of each matrix); written before the block's shard."""
        return self.root / "prune" / "blocks" / f"{i:03d}.json"

    @property
    def prune_report_path(self) -> Path:
        return self.root / "prune" / "report.json"

    @property
    def prune_claims_dir(self) -> Path:
        """Claim files of sharded prune workers (``NNN.claim.K`` per block, as reconstruct's windows)."""
        return self.root / "prune" / "claims"

    # ---- reconstruct, quantize and retrain --------------------------------------------------------------
    def windows_dir(self, stage: str = "reconstruct") -> Path:
        """Window records and sharded workers' claims of a windowed stage (reconstruct, quantize)."""
        return self.root / "windows" if stage == "reconstruct" else self.model_dir(WINDOW_STAGES[stage]) / "records"

    def window_record_path(self, index: int, stage: str = "reconstruct") -> Path:
        return self.windows_dir(stage) / f"{index:03d}.json"

    def window_params_path(self, index: int, stage: str = "reconstruct") -> Path:
        """The parameters one window trained (deleted once assembled, unless --keep-cache)."""
        return self.model_dir(WINDOW_STAGES[stage]) / "windows" / f"{index:03d}.safetensors"

    def qparams_path(self, i: int) -> Path:
        """Scales and zero points of block ``i``'s quantized matrices (``name.weight_scale``, ``name.weight_zero_point``)."""
        return self.model_dir("quantized") / "qparams" / f"block_{i:03d}.safetensors"

    @property
    def retrain_checkpoint_path(self) -> Path:
        """Model and optimizer of a single-process retraining, every ``--save-every`` steps."""
        return self.model_dir("retrained") / "checkpoint.pt"

    @property
    def retrain_sharded_checkpoint_dir(self) -> Path:
        """Sharded checkpoints of a retraining under torchrun (``torch.distributed.checkpoint``, one folder per step and
        ``checkpoint.json`` naming the last complete one)."""
        return self.model_dir("retrained") / "checkpoint"

    # ---- evaluation ---------------------------------------------------------------------------------------
    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    def eval_result_path(self, model: str, name: str) -> Path:
        return self.eval_dir / f"{model}__{name}.json"

    def eval_results(self, model: str) -> list[Path]:
        return sorted(self.eval_dir.glob(f"{model}__*.json")) if self.eval_dir.is_dir() else []

    @property
    def report_dir(self) -> Path:
        return self.eval_dir / "report"
