"""Options of the reconstruct stage, validated, with the per-window training and PEFT settings they imply."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from freelunch_cli.errors import FreelunchError
from freelunch_cli.peft import PeftConfig
from freelunch_cli.train import TrainConfig
from freelunch_cli.windows import parse_granularity

INPUT_MODES = ("dense", "sparse")


@dataclass
class ReconstructConfig:
    window: str = "block"
    inputs: str = "dense"
    peft: str = "full"
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lr: float = 1e-3  # chosen by bench/sweep.py --group defaults (see the README)
    epochs: int = 2  # a second pass over the windows: better in and out of domain (bench/sweep.py, lr1e-3-ep2)
    steps: int | None = None
    batch_size: int = 4
    warmup: float = 0.0
    weight_decay: float = 0.0
    loss: str = "mse"
    kl_weight: float = 0.0  # the last window also matches the dense next-token distribution (KL through the head)
    grad_clip: float | None = None
    val_fraction: float = 0.0
    keep_best: bool = False
    loss_samples: int | None = 32  # samples the reported loss before/after is measured on (None: all)
    seed: int = 0
    keep_cache: bool = False
    shard: str | None = None  # "I/N"; default from torchrun or a Slurm array
    stale_after: float = 300.0  # seconds without a heartbeat after which a claimed window is taken over
    max_memory: str | None = None  # for --window auto
    prepare: bool = False  # only set the stage up (for sharded workers started afterwards)
    device: str = "auto"
    dtype: str = "float32"

    def train_config(self, window_index: int) -> TrainConfig:
        # Each window gets its own seed so windows are independent and a resumed run matches.
        return TrainConfig(self.lr, self.epochs, self.batch_size, self.seed * 100_003 + window_index, self.weight_decay,
                           self.loss, self.steps, self.warmup, self.grad_clip, self.keep_best, self.loss_samples)

    def peft_config(self, window_index: int) -> PeftConfig:
        return PeftConfig(self.peft, self.lora_rank, self.lora_alpha, self.seed * 100_003 + window_index)

    def validate(self) -> None:
        if self.window != "auto":
            parse_granularity(self.window)
        if self.kl_weight < 0:
            raise FreelunchError("--kl-weight must be at least 0")
        if self.stale_after <= 0:
            raise FreelunchError("--stale-after must be positive")
        self.train_config(0).validate()
        self.peft_config(0).validate()
        if self.inputs not in INPUT_MODES:
            raise FreelunchError(f"--inputs must be dense or sparse, got {self.inputs!r}")
        if not 0 <= self.val_fraction < 1:
            raise FreelunchError("--val-fraction must be in [0, 1)")
        if self.keep_best and self.val_fraction == 0:
            raise FreelunchError("--keep-best needs validation samples: set --val-fraction")

    def signature(self) -> dict:
        sig = asdict(self)
        for k in ("device", "keep_cache", "shard", "stale_after", "max_memory", "prepare", "loss_samples"):
            sig.pop(k)
        return sig
