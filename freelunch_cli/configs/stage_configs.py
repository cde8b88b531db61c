"""The options of every stage: one dataclass per stage whose fields carry their defaults and help texts.

The CLI builds its commands from these fields, and the library (and the tests) build the same configs by keyword,
so a default is written once. This module imports no torch: ``freelunch --help`` stays fast.

Each config has ``validate()`` (a FreelunchError naming the option for a bad value) and ``signature(...)``: what
the stage computes from its inputs, recorded in the manifest so that a resumed run is the same run. Options that
change how, not what (device, sharding, cache cleanup) are left out of signatures.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from freelunch_cli.core.dtypes import canonical_dtype
from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.core.options import REQUIRED, option

DEVICE_HELP = "auto, cpu, cuda or cuda:N."
DTYPE_HELP = "Compute dtype: auto (bfloat16 on CUDA, float32 on the CPU), float32, bfloat16 or float16."
INPUT_MODES = ("dense", "sparse")
STATS_MODES = ("sparse", "dense")
RETRAIN_STARTS = ("latest", "pruned", "reconstructed", "dense")
EXPORT_FORMATS = ("hf", "compressed-tensors")
QUANTIZE_STARTS = ("latest", "dense", "pruned", "reconstructed", "retrained")
MODEL_CHOICES = "latest, dense, pruned, reconstructed, retrained or quantized."

# Defaults that follow what trains (docs/results.md, sweep groups "peft" and "gap"): after a reconstruction, sparse
# adapters at 1e-3 with recomputation were the best pipeline measured; from the pruned model full retraining stays
# the baseline. Adapters want 10x full training's rate, and biases and norms take 1e-3 as well.
PEFT_AFTER_RECONSTRUCTION = "masked-lora"
# Windows' default rates are relative to each trained tensor's RMS (Adafactor's relative step), so that they transfer
# across models: SmolLM2-135M's matrices have an RMS of about 0.2, where 5e-3 is the 1e-3 its sweeps chose; a model
# whose weights are ten times smaller gets a ten times smaller step (issue 30: 1e-3 made such a model worse).
RELATIVE_LR = 5e-3
QUANTIZE_RELATIVE_LR = {"pruned": RELATIVE_LR}  # from a dense, reconstructed or retrained model: a tenth of it
ADAPTER_LR = 1e-3  # LoRA's B starts at zero: its rate cannot be relative to its size
WINDOW_RETRIES = 2
WINDOW_VAL_FRACTION = 0.0625  # 8 of 128 calibration samples: where a window's loss must not rise
LR_BY_PEFT = {"full": 1e-4, "bias-norm": 1e-3, "lora": 1e-3, "masked-lora": 1e-3}


def _at_least(minimum, **values) -> None:
    bad = [name for name, v in values.items() if v is not None and v < minimum]
    if bad:
        raise FreelunchError(f"--{bad[0].replace('_', '-')} must be at least {minimum}, got {values[bad[0]]}")


@dataclass
class CalibrateConfig:
    model: str = option(REQUIRED, "Hugging Face folder, Hub id, or .gguf file.", "--model", "-m")
    data: str = option(REQUIRED, ".txt, .jsonl (field 'text'), .parquet, or a datasets NAME:CONFIG:SPLIT.", "--data", "-d")
    gguf_file: str | None = option(None, "GGUF file name inside the --model folder.")
    data_config: str | None = option(None, "datasets config name.")
    data_split: str | None = option(None, "datasets split (default train).")
    text_field: str = option("text", "Field holding the text in .jsonl/.parquet/datasets.")
    samples: int = option(128, "Number of calibration sequences.")
    seqlen: int = option(512, "Tokens per calibration sequence.")
    seed: int = option(0, "Seed of the sequence sampling.")
    allow_overlap: bool = option(False, "Let sequences overlap when the text is short.", "--allow-overlap")
    cache_dtype: str = option(
        "float16", "Storage dtype of the activation cache; a float16 file whose values exceed its range is stored in bfloat16."
    )
    storage_dtype: str = option("auto", "Dtype of the working model's shards (auto: as the checkpoint).")
    batch_size: int = option(8, "Samples per forward batch.")
    cache_dir: str | None = option(
        None,
        "Keep the activation cache under this folder (e.g. node-local scratch); quoted $VARS ('$TMPDIR/fl') expand per node.",
    )
    trust_remote_code: bool = option(
        False, "Run the model's own code (auto_map in its config); off unless given.", "--trust-remote-code"
    )
    device: str = option("auto", DEVICE_HELP)
    dtype: str = option("auto", DTYPE_HELP + " Of the dense pass.")

    def validate(self) -> None:
        _at_least(1, samples=self.samples, batch_size=self.batch_size)
        _at_least(2, seqlen=self.seqlen)

    def signature(self, model: dict, data: dict) -> dict:
        """``model``: the resolved model's signature; ``data``: the resolved text source and its fingerprint."""
        return {
            **model,
            **data,
            "samples": self.samples,
            "seqlen": self.seqlen,
            "seed": self.seed,
            "allow_overlap": self.allow_overlap,
            "dtype": canonical_dtype(self.dtype),
            "cache_dtype": canonical_dtype(self.cache_dtype),
            "storage_dtype": self.storage_dtype,
        }


@dataclass
class PruneConfig:
    criterion: str = option("wanda", "magnitude, random, wanda, ria or sparsegpt.")
    sparsity: float | str | None = option(0.5, "Fraction of weights set to zero, in (0, 1) (unstructured).", cli_type=str)
    pattern: str | None = option(None, "N:M semi-structured pattern, e.g. 2:4 (N kept in every M inputs).")
    scope: str | None = option(None, "row or matrix (unstructured); default per criterion.")
    skip: list[str] = option(
        REQUIRED,
        "Matrices left dense (repeatable): a name in the block such as mlp.down_proj or "
        "*proj, or with its block, layers.0.mlp.down_proj.",
        factory=list,
    )
    skip_blocks: str | None = option(None, "Decoder blocks left dense, e.g. 0 or 0,3-5 (-1: the last).")
    stats: str = option(
        "dense",
        "Statistics from the dense stream (Wanda and RIA read calibrate's, no forward pass) or "
        "from the stream through the already-pruned blocks (sparse: one more forward per block).",
    )
    seed: int = option(0, "Seed of --criterion random.")
    ria_alpha: float = option(0.5, "RIA's activation exponent.")
    damp: float = option(0.01, "SparseGPT dampening (fraction of the mean Hessian diagonal).")
    block_size: int = option(128, "SparseGPT column block size.")
    keep_cache: bool = option(False, "Keep the pruned-stream activations.", "--keep-cache")
    owl: float = option(0.0, "OWL non-uniform sparsity: spread block sparsities by +-OWL by outlier ratio (e.g. 0.08).")
    owl_m: float = option(5.0, "OWL outlier threshold: scores above M x the block mean.")
    batch_size: int = option(8, "Samples per forward batch for statistics.")
    shard: str | None = option(
        None, "Take share I of N blocks (I/N; --stats dense only); default from torchrun or a Slurm array; 0/1: alone."
    )
    stale_after: float = option(300.0, "Seconds without progress after which a claimed block is taken over.")
    prepare: bool = option(False, "Only set the stage up (and OWL's plan) before starting sharded workers.", "--prepare")
    device: str = option("auto", DEVICE_HELP)
    dtype: str = option("auto", DTYPE_HELP)

    def resolved(self):
        """(sparsity pattern, criterion) the options name; raises FreelunchError for a bad value."""
        from freelunch_cli.pruning.criteria import get_criterion
        from freelunch_cli.pruning.masks import parse_pattern

        crit = get_criterion(self.criterion)
        return parse_pattern(self.pattern, self.sparsity, self.scope or crit.default_scope), crit

    def validate(self) -> None:
        if self.stats not in STATS_MODES:
            raise FreelunchError(f"--stats must be sparse or dense, got {self.stats!r}")
        if not 0 < self.damp < 1 or self.block_size < 1:
            raise FreelunchError("--damp must be in (0, 1) and --block-size at least 1")
        if self.owl < 0 or (self.owl and self.pattern not in (None, "unstructured")):
            raise FreelunchError("--owl needs unstructured sparsity and a non-negative value (e.g. 0.08)")
        if self.stale_after <= 0:
            raise FreelunchError("--stale-after must be positive")
        _at_least(1, batch_size=self.batch_size)
        self.resolved()

    def signature(self, calibrate_run: str) -> dict:
        pattern, crit = self.resolved()
        return {
            "calibrate_run": calibrate_run,
            "criterion": crit.name,
            "pattern": pattern.describe(),
            "sparsity": pattern.sparsity,
            "skip": sorted(self.skip),
            "skip_blocks": self.skip_blocks or None,
            "stats": self.stats if crit.needs else None,
            "seed": self.seed if crit.name == "random" else None,
            "ria_alpha": self.ria_alpha if crit.name == "ria" else None,
            "damp": self.damp if crit.name == "sparsegpt" else None,
            "block_size": self.block_size if crit.name == "sparsegpt" else None,
            "dtype": canonical_dtype(self.dtype),
            "owl": [self.owl, self.owl_m] if self.owl else None,
        }


@dataclass
class WindowedOptions:
    """The options every windowed stage (reconstruct, quantize) shares: how windows are cut, read, scheduled and
    checked. ``engine.windowed`` and ``engine.runner`` read these and nothing else of a stage's config (besides
    ``train_config`` and ``peft_config``)."""

    window: str = option("block", "matrix, submodule, block, blocks:K, model, or auto (reconstruct, with --max-memory).")
    inputs: str = option("dense", "dense (windows read dense activations, independent) or sparse (chained).")
    batch_size: int = option(4, "Samples per step.")
    loss: str = option("mse", "mse, nmse or cosine.")
    kl_weight: float = option(0.0, "Last window: add this weight x KL to the dense next-token distribution.")
    val_fraction: float = option(
        WINDOW_VAL_FRACTION, "Calibration samples held out: no window ends with a higher loss on them than it started."
    )
    retries: int = option(
        WINDOW_RETRIES,
        "A window whose held-out loss ends above its start trains again at a tenth of the rate, this often; it keeps "
        "its starting weights if no attempt improves.",
    )
    loss_samples: int = option(32, "Training samples the reported loss before/after is measured on (0: all).")
    seed: int = option(0, "Seed of the data order, validation split and adapters.")
    keep_cache: bool = option(
        False, "Keep activation files no unfinished window needs, and each window's parameters after assembly.", "--keep-cache"
    )
    shard: str | None = option(
        None, "Take share I of N windows (I/N); default from torchrun or a Slurm array; 0/1: alone, whatever the environment."
    )
    stale_after: float = option(300.0, "Seconds without progress after which a claimed window is taken over.")
    max_memory: str | None = option(
        None, "Device memory budget (e.g. 40GiB, or 0.8 of the device): --window auto, and activations kept resident."
    )
    prepare: bool = option(False, "Only set the stage up (before starting sharded workers).", "--prepare")
    device: str = option("auto", DEVICE_HELP)
    dtype: str = option("auto", DTYPE_HELP)

    # how the stage runs, not what it computes: left out of signatures
    HOW = ("device", "keep_cache", "shard", "stale_after", "max_memory", "prepare", "loss_samples")

    def validate_windowed(self, auto: bool = True) -> None:
        """FreelunchError naming the option for a bad shared value (``auto``: whether --window auto is allowed)."""
        from freelunch_cli.reconstruction.windows import parse_granularity

        if self.window == "auto" and not auto:
            raise FreelunchError("--window auto is only for reconstruct; pass matrix, submodule, block, blocks:K or model")
        if self.window != "auto":
            parse_granularity(self.window)
        if self.inputs not in INPUT_MODES:
            raise FreelunchError(f"--inputs must be dense or sparse, got {self.inputs!r}")
        if self.kl_weight < 0:
            raise FreelunchError("--kl-weight must be at least 0")
        if self.stale_after <= 0:
            raise FreelunchError("--stale-after must be positive")
        if not 0 <= self.val_fraction < 1:
            raise FreelunchError("--val-fraction must be in [0, 1)")

    def rate(self) -> tuple[float, bool]:
        """(peak rate, whether it is relative to each trained tensor's RMS), as the stage resolves its options."""
        raise NotImplementedError

    def describe_rate(self) -> str:
        """The rate as the console line states it."""
        lr, relative = self.rate()
        return f"lr {lr:g}" + (" x each tensor's RMS" if relative else "")

    def what_it_computes(self) -> dict:
        """The options as a dict, without those that say how the stage runs (``HOW``)."""
        sig = asdict(self)
        for k in self.HOW:
            sig.pop(k, None)
        return sig


@dataclass
class ReconstructConfig(WindowedOptions):
    peft: str = option("full", "What trains: full, bias-norm, lora or masked-lora (adapters merged at the end, masks kept).")
    lora_rank: int = option(16, "LoRA rank (lora, masked-lora).")
    lora_alpha: float = option(32.0, "LoRA alpha: the update is alpha / rank x B A.")
    lr: float | None = option(
        None, "Peak AdamW learning rate, linear decay to 0, the same for every tensor (default: see --lr-relative)."
    )
    lr_relative: float = option(
        RELATIVE_LR,
        "Without --lr: the peak rate as a fraction of each trained tensor's RMS, so that it transfers across models "
        f"(lora and masked-lora: {ADAPTER_LR:g}).",
    )
    epochs: int = option(2, "Passes over the calibration sequences (1 takes about half the time, at some quality).")
    steps: int | None = option(None, "Optimizer steps per window (overrides --epochs).")
    warmup: float = option(0.0, "Fraction of the steps with a linear warm-up.")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    grad_clip: float | None = option(None, "Clip the gradient norm to this value.")
    keep_best: bool = option(False, "Keep the parameters with the lowest validation loss.", "--keep-best")

    def train_config(self, window_index: int):
        """The training settings of one window; each window has its own seed, so windows are independent and a
        resumed run matches."""
        from freelunch_cli.training.loop import TrainConfig

        lr, relative = self.rate()
        return TrainConfig(
            lr,
            self.epochs,
            self.batch_size,
            self.seed * 100_003 + window_index,
            self.weight_decay,
            self.loss,
            self.steps,
            self.warmup,
            self.grad_clip,
            self.keep_best,
            self.loss_samples or None,
            relative,
            self.retries,
        )

    def rate(self) -> tuple[float, bool]:
        """(peak rate, whether it is relative to each tensor's RMS): --lr as given, else --lr-relative (adapters:
        ``ADAPTER_LR``, absolute)."""
        if self.lr is not None:
            return self.lr, False
        if self.peft in ("lora", "masked-lora"):
            return ADAPTER_LR, False
        return self.lr_relative, True

    def peft_config(self, window_index: int):
        from freelunch_cli.training.peft import PeftConfig

        return PeftConfig(self.peft, self.lora_rank, self.lora_alpha, self.seed * 100_003 + window_index)

    def validate(self) -> None:
        self.validate_windowed()
        self.train_config(0).validate()
        self.peft_config(0).validate()
        if self.keep_best and self.val_fraction == 0:
            raise FreelunchError("--keep-best needs validation samples: set --val-fraction")
        if self.lr_relative <= 0:
            raise FreelunchError(f"--lr-relative must be positive, got {self.lr_relative}")

    def signature(self, prune_run: str) -> dict:
        return {"prune_run": prune_run, **self.what_it_computes()}


@dataclass
class RetrainConfig:
    start: str = option(
        "latest", "Model to retrain: pruned, reconstructed, latest, or dense (a fine-tuning control, no masks).", "--from"
    )
    lr: float | None = option(None, "Peak AdamW learning rate, linear decay to 0 (default: 1e-4 for full, 1e-3 for PEFT).")
    epochs: int = option(1, "Passes over the training sequences.")
    steps: int | None = option(None, "Optimizer steps (overrides --epochs).")
    batch_size: int = option(4, "Sequences per step.")
    warmup: float = option(0.0, "Fraction of the steps with a linear warm-up.")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    grad_clip: float | None = option(1.0, "Clip the gradient norm (0 or less: off).")
    seed: int = option(0, "Seed of the data order (and of --data sampling).")
    data: str | None = option(None, "Train on other text (default: the calibration sequences).")
    samples: int | None = option(None, "Sequences of --data (of the calibration length).")
    allow_overlap: bool = option(False, "Let --data sequences overlap.", "--allow-overlap")
    save_every: int = option(50, "Steps between resumable checkpoints.")
    grad_checkpoint: bool | None = option(
        None,
        "Recompute block activations in backward: far less memory, ~1/3 more compute (default: on for PEFT, off for full).",
        "--grad-checkpoint/--no-grad-checkpoint",
    )
    peft: str | None = option(
        None, "What trains: full, bias-norm, lora or masked-lora (default: masked-lora from a reconstructed model, else full)."
    )
    lora_rank: int = option(16, "LoRA rank (lora, masked-lora).")
    lora_alpha: float = option(32.0, "LoRA alpha: the update is alpha / rank x B A.")
    max_memory: str | None = option(
        None,
        "Memory each process may use (e.g. 70GiB, or 0.9 of the device; default on a GPU: its memory): a run whose "
        "estimate exceeds it is refused before it starts, with the number of GPUs it needs.",
    )
    device: str = option("auto", DEVICE_HELP)
    dtype: str = option("auto", DTYPE_HELP)

    def __post_init__(self):
        if self.grad_clip is not None and self.grad_clip <= 0:
            self.grad_clip = None  # 0 or less switches clipping off

    def validate(self) -> None:
        if self.lr is not None and self.lr <= 0:
            raise FreelunchError(f"--lr must be positive, got {self.lr}")
        _at_least(1, epochs=self.epochs, steps=self.steps, batch_size=self.batch_size, save_every=self.save_every)
        if not 0 <= self.warmup < 1:
            raise FreelunchError("--warmup is a fraction of the steps, in [0, 1)")
        if self.start not in RETRAIN_STARTS:
            raise FreelunchError("--from must be latest, pruned, reconstructed or dense")
        if self.max_memory is not None:
            from freelunch_cli.core.units import is_plain_number, parse_size

            if not (is_plain_number(self.max_memory) and 0 < float(self.max_memory) <= 1):
                parse_size(self.max_memory, "--max-memory")
        if self.peft is not None:
            self.peft_config().validate()

    def resolved(self, start: str) -> RetrainConfig:
        """The options as run from ``start`` (pruned, reconstructed or dense): unset ones take the defaults above."""
        peft = self.peft or (PEFT_AFTER_RECONSTRUCTION if start == "reconstructed" else "full")
        return replace(
            self,
            peft=peft,
            lr=LR_BY_PEFT[peft] if self.lr is None else self.lr,
            grad_checkpoint=peft != "full" if self.grad_checkpoint is None else self.grad_checkpoint,
        )

    def peft_config(self):
        from freelunch_cli.training.peft import PeftConfig

        return PeftConfig(self.peft, self.lora_rank, self.lora_alpha, self.seed)

    def signature(self, start: str, start_run: str, data: dict) -> dict:
        """What the run computes from the ``start`` model (of run ``start_run``) on ``data``. Device, checkpoint
        spacing and recomputation are how, not what: a run may resume with other values. The LoRA shape matters only
        to LoRA, and full training is left implicit, so a run started before --peft existed still resumes."""
        sig = asdict(self)
        for k in ("device", "save_every", "start", "grad_checkpoint", "max_memory"):
            sig.pop(k)
        if self.peft == "full":
            sig.pop("peft")
        if self.peft not in ("lora", "masked-lora"):
            sig.pop("lora_rank"), sig.pop("lora_alpha")
        return {"from": start, "from_run": start_run, **data, **sig}


@dataclass
class QuantizeConfig(WindowedOptions):
    start: str = option(
        "latest", "Model to quantize: latest (before quantization), dense, pruned, reconstructed or retrained.", "--from"
    )
    scheme: str = option("w4a16", "w4a16 (4-bit weights) or w8a16 (8-bit weights); activations stay 16-bit.")
    group_size: int = option(128, "Inputs per scale (and zero point) along each row; must divide every matrix's inputs.")
    symmetric: bool = option(
        True, "Symmetric (no zero point) or asymmetric (an integer zero point per group).", "--symmetric/--asymmetric"
    )
    steps: int | None = option(
        None, "Optimizer steps per window (overrides --epochs); 0: round-to-nearest, no training (the baseline)."
    )
    epochs: int = option(2, "Passes over the calibration sequences of quantization-aware reconstruction.")
    learn_scales: bool = option(
        False, "Train each group's scale too (in log space, LSQ gradient), not only the weights.", "--learn-scales"
    )
    scale_lr: float = option(1e-2, "Peak learning rate of the scales' log factors (--learn-scales).")
    lr: float | None = option(
        None,
        "Peak AdamW learning rate, linear decay to 0, the same for every tensor (default: --lr-relative x each tensor's RMS).",
    )
    lr_relative: float | None = option(
        None,
        f"Without --lr: the peak rate as a fraction of each tensor's RMS (default {RELATIVE_LR:g} from the pruned model, "
        f"repairing pruning too, as reconstruct; {RELATIVE_LR / 10:g} from a dense, reconstructed or retrained one).",
    )

    def quant_scheme(self):
        from freelunch_cli.quantization.schemes import parse_scheme

        return parse_scheme(self.scheme, self.group_size, self.symmetric)

    def train_config(self, window_index: int):
        from freelunch_cli.training.loop import TrainConfig

        lr, relative = self.rate()
        return TrainConfig(
            lr=lr,
            epochs=self.epochs,
            batch_size=self.batch_size,
            seed=self.seed * 100_003 + window_index,
            loss=self.loss,
            steps=self.steps,
            loss_samples=self.loss_samples or None,
            relative_lr=relative,
            retries=self.retries,
        )

    def rate(self) -> tuple[float, bool]:
        """(peak rate, whether it is relative to each tensor's RMS), once ``resolved``."""
        if self.lr is not None:
            return self.lr, False
        return self.lr_relative or RELATIVE_LR, True

    def validate(self) -> None:
        if self.start not in QUANTIZE_STARTS:
            raise FreelunchError(f"--from must be one of {', '.join(QUANTIZE_STARTS)}, got {self.start!r}")
        self.validate_windowed(auto=False)
        self.quant_scheme()
        if self.steps is not None and self.steps < 0:
            raise FreelunchError(f"--steps must be at least 0, got {self.steps}")
        if self.steps != 0:
            self.train_config(0).validate()
        if self.lr_relative is not None and self.lr_relative <= 0:
            raise FreelunchError(f"--lr-relative must be positive, got {self.lr_relative}")
        if self.scale_lr <= 0:
            raise FreelunchError(f"--scale-lr must be positive, got {self.scale_lr}")

    def resolved(self, start: str) -> QuantizeConfig:
        """The options as run from model ``start``: without --lr, an unset --lr-relative takes the default for that
        model."""
        if self.lr is not None or self.lr_relative is not None:
            return self
        return replace(self, lr_relative=QUANTIZE_RELATIVE_LR.get(start, RELATIVE_LR / 10))

    def signature(self, start: str, start_run: str) -> dict:
        """What the stage computes from model ``start`` (of run ``start_run``); training options only when it trains."""
        sig = self.what_it_computes()
        sig.pop("start")
        for k in ("kl_weight", "val_fraction"):  # shared with reconstruct; recorded only where set
            if not sig[k]:
                sig.pop(k)
        sig["scheme"] = self.quant_scheme().name
        if self.steps == 0:
            for k in (
                "epochs",
                "learn_scales",
                "lr",
                "lr_relative",
                "retries",
                "batch_size",
                "loss",
                "seed",
                "inputs",
                "window",
                "dtype",
            ):
                sig.pop(k)
        if self.steps == 0 or not self.learn_scales:
            sig.pop("scale_lr")
        return {"from": start, "from_run": start_run, **sig}


@dataclass
class EvalConfig:
    ppl: list[str] = option(
        REQUIRED, "Perplexity text: a file, wikitext2, or datasets NAME:CONFIG:SPLIT (repeatable).", factory=list
    )
    tasks: list[str] = option(
        REQUIRED, "lm-eval tasks, comma-separated (e.g. boolq,rte,hellaswag,winogrande,arc_easy).", factory=list, cli_type=str
    )
    tasks_dir: str | None = option(None, "Folder of local lm-eval task YAMLs (offline tasks).")
    limit: int | None = option(None, "lm-eval: at most this many documents per task.")
    model: str | None = option(None, "Evaluate this model path instead of a work directory.", "--model", "-m")
    gguf_file: str | None = option(None, "GGUF file name inside the --model folder.")
    trust_remote_code: bool = option(
        False, "Run --model's own code (auto_map in its config); off unless given.", "--trust-remote-code"
    )
    stage: str = option("latest", MODEL_CHOICES)
    seqlen: int | None = option(None, "Sequence length (default: model context, at most 4096).")
    limit_sequences: int | None = option(
        None, "Evaluate only the first N perplexity sequences.", "--limit-sequences", "--limit-windows"
    )
    batch_size: int = option(4, "Sequences (or lm-eval requests) per forward batch.")
    device: str = option("auto", DEVICE_HELP)
    dtype: str = option("auto", DTYPE_HELP)

    def __post_init__(self):
        if isinstance(self.tasks, str) or self.tasks is None:  # the command line's comma-separated list
            self.tasks = [t.strip() for t in (self.tasks or "").split(",") if t.strip()]

    def validate(self) -> None:
        if not self.ppl and not self.tasks:
            raise FreelunchError("nothing to evaluate: pass --ppl FILE (or a datasets name) and/or --tasks NAMES")
        _at_least(2, seqlen=self.seqlen)
        _at_least(1, batch_size=self.batch_size, limit_sequences=self.limit_sequences, limit=self.limit)

    def signature(self, model: str, run: str | None) -> dict:
        """What every result of this evaluation depends on besides its data: the model (and its stage's run)."""
        return {"model": model, "run": run, "dtype": canonical_dtype(self.dtype)}


@dataclass
class ExportConfig:
    out: str = option(REQUIRED, "Folder for the Hugging Face checkpoint.", "--out", "-o")
    stage: str = option("latest", MODEL_CHOICES)
    format: str = option(
        "hf", "hf (float weights, zeros stored) or compressed-tensors (the quantized model packed for vLLM and transformers)."
    )
    dtype: str | None = option(None, "Cast floating-point weights (default: as stored; hf only).")
    max_shard_size: str = option("2GB", "Largest safetensors shard (GB = 10^9 bytes, GiB = 2^30).")

    def validate(self) -> None:
        from freelunch_cli.core.units import parse_size

        parse_size(self.max_shard_size, "--max-shard-size")
        if self.format not in EXPORT_FORMATS:
            raise FreelunchError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {self.format!r}")
        if self.format == "compressed-tensors" and self.dtype:
            raise FreelunchError(
                "--dtype cannot be combined with --format compressed-tensors: scales stay in the dtype they were computed "
                "in, so the packed weights equal the quantized model's; calibrate with --storage-dtype for 16-bit weights"
            )

    def signature(self, work: str, stage: str, run: str) -> dict:
        from freelunch_cli.core.units import parse_size

        return {
            "work": work,
            "stage": stage,
            "run": run,
            "dtype": self.dtype,
            "format": None if self.format == "hf" else self.format,
            "max_shard_size": parse_size(self.max_shard_size, "--max-shard-size"),
        }
