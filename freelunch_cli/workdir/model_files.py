"""Which files make up each model of a work directory. A model is exactly its own stage's files: a missing or damaged
block is an error naming the file and the command that recomputes it, never a block of another stage.

Only the embeddings, final norm and head are shared by design: prune, reconstruct and quantize leave them as they
were, so those models read the dense model's (or, quantizing a retrained model, the retrained one's)."""

from __future__ import annotations

from pathlib import Path

from freelunch_cli.core.errors import FreelunchError


class ModelFiles:
    """The checked files of each model (a mixin of ``WorkDir``)."""

    root: Path

    def model_block_path(self, model: str, i: int) -> Path:
        """The checked shard of block ``i`` of ``model`` (every model stage writes every block); FreelunchError naming the
        file and the command that recomputes it when it is missing or damaged."""
        return self.check_file(self.block_path(model, i))

    def check_model(self, model: str) -> None:
        """Check every file of ``model`` (its blocks, embeddings and head) before a stage that reads it begins, so a
        missing block stops it before it writes anything (FreelunchError naming the file and the command)."""
        self.rest_path(model)
        for i in range(self.stage("calibrate").summary["num_blocks"]):
            self.model_block_path(model, i)

    def rest_path(self, model: str) -> Path:
        """The checked embeddings, final norm and head of a model: its own for dense and retrained (global retraining
        trains them), the dense model's for pruned and reconstructed, and those of the model it quantized for quantized."""
        if model == "quantized":
            model = self.quantized_from()
        return self.check_file(self.own_rest_path("retrained" if model == "retrained" else "dense"))

    def quantized_from(self) -> str:
        """The model the quantize stage started from (dense, pruned, reconstructed or retrained)."""
        st = self.stage("quantize")
        if st is None:
            raise FreelunchError(f"no quantize stage in {self.root}")
        return st.signature["from"]

    def lineage(self, model: str) -> dict:
        """The stages whose work the model of ``model`` holds (prune, reconstruct, retrain; the dense model: none).

        Retraining holds what it started from: `--from dense` neither pruning nor reconstruction, `--from pruned`
        not a reconstruction that may also exist in the directory. Model cards and run descriptions read this.
        """
        if model == "quantized":
            return {**self.lineage(self.quantized_from()), "quantize": self.stage("quantize")}
        steps = {"dense": [], "pruned": ["prune"], "reconstructed": ["prune", "reconstruct"], "retrained": []}[model]
        if model == "retrained":
            ret = self.stage("retrain")
            start = ret.summary.get("from") if ret is not None else None
            steps = {"pruned": ["prune"], "reconstructed": ["prune", "reconstruct"]}.get(start, []) + ["retrain"]
        return {name: st for name in steps if (st := self.stage(name)) is not None}
