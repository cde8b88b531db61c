"""The `freelunch` command: a thin Typer layer, one library call per subcommand."""

from __future__ import annotations

import errno
import os
import signal
import sys
from pathlib import Path
from typing import List, Optional

import typer

from freelunch_cli import __version__
from freelunch_cli.errors import FreelunchError, Terminated, stop_reason

app = typer.Typer(
    name="freelunch",
    help="Prune a causal LM, then repair it with local reconstruction (calibrate -> prune -> reconstruct -> eval -> export).",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

WorkOpt = typer.Option(..., "--work", "-w", help="Work directory shared by all stages.")
DeviceOpt = typer.Option("auto", help="auto, cpu, cuda or cuda:N.")
DtypeOpt = typer.Option("float32", help="Compute dtype: float32, bfloat16 or float16.")
ResumeOpt = typer.Option(False, "--resume", help="Continue an interrupted run of this stage.")
ForceOpt = typer.Option(False, "--force", help="Start this stage over (later stages are discarded).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress output.")
JsonOpt = typer.Option(False, "--json", help="Print a machine-readable summary on stdout.")
PeftOpt = typer.Option("full", help="What trains: full, bias-norm, lora or masked-lora (adapters merged at the end, masks kept).")
LoraRankOpt = typer.Option(16, help="LoRA rank (lora, masked-lora).")
LoraAlphaOpt = typer.Option(32.0, help="LoRA alpha: the update is alpha / rank x B A.")


def _run(fn, *args, **kwargs):
    """Call a stage; turn user-facing failures into one line on stderr and an exit code."""
    try:
        return fn(*args, **kwargs)
    except FreelunchError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt as e:
        why, code = stop_reason(e)
        typer.echo(f"{why}: finished windows/blocks are saved; rerun the same command with --resume to continue", err=True)
        raise typer.Exit(code) from None
    except OSError as e:
        if os.environ.get("FREELUNCH_DEBUG"):
            raise
        if e.errno == errno.ENOSPC:
            typer.echo(f"error: the disk is full ({e.filename or 'while writing'}); free space and rerun with --resume", err=True)
        else:
            typer.echo(f"error: {e.strerror or e}{': ' + str(e.filename) if e.filename else ''}", err=True)
        raise typer.Exit(1) from None
    except Exception as e:  # an internal error: one line, the traceback on demand
        if os.environ.get("FREELUNCH_DEBUG"):
            raise
        typer.echo(f"error: unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (set FREELUNCH_DEBUG=1 for the traceback)", err=True)
        raise typer.Exit(1) from None


def _reporter(quiet: bool, json_mode: bool):
    from freelunch_cli.console import Reporter

    return Reporter(quiet=quiet, json_mode=json_mode)


def _version(value: bool):
    if value:
        typer.echo(f"freelunch {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version.")):
    pass


@app.command()
def calibrate(
    model: str = typer.Option(..., "--model", "-m", help="Hugging Face folder, Hub id, or .gguf file."),
    data: str = typer.Option(..., "--data", "-d", help=".txt, .jsonl (field 'text'), .parquet, or a datasets NAME[:CONFIG[:SPLIT]]."),
    work: Path = WorkOpt,
    gguf_file: Optional[str] = typer.Option(None, help="GGUF file name inside the --model folder."),
    data_config: Optional[str] = typer.Option(None, help="datasets config name."),
    data_split: Optional[str] = typer.Option(None, help="datasets split (default train)."),
    text_field: str = typer.Option("text", help="Field holding the text in .jsonl/.parquet/datasets."),
    samples: int = typer.Option(128, help="Number of calibration windows."),
    seqlen: int = typer.Option(512, help="Tokens per calibration window."),
    seed: int = typer.Option(0, help="Seed of the window sampling."),
    allow_overlap: bool = typer.Option(False, "--allow-overlap", help="Let windows overlap when the text is short."),
    cache_dtype: str = typer.Option("float16", help="Storage dtype of the activation cache."),
    storage_dtype: str = typer.Option("auto", help="Dtype of the working model's shards (auto: as the checkpoint)."),
    batch_size: int = typer.Option(8, help="Samples per forward batch."),
    cache_dir: Optional[Path] = typer.Option(None, help="Keep the activation cache under this folder (e.g. node-local scratch)."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    resume: bool = ResumeOpt,
    force: bool = ForceOpt,
    quiet: bool = QuietOpt,
    json_out: bool = JsonOpt,
):
    """Import the dense model as block shards, sample calibration text, cache dense activations."""
    from freelunch_cli.calibrate import CalibrateConfig, calibrate as run
    from freelunch_cli.workdir import WorkDir

    cfg = CalibrateConfig(model, data, gguf_file, data_config, data_split, text_field, samples, seqlen, seed, allow_overlap,
                          device, dtype, cache_dtype, storage_dtype, batch_size, str(cache_dir) if cache_dir else None)
    _run(run, WorkDir(work), cfg, _reporter(quiet, json_out), resume=resume, force=force)


@app.command()
def prune(
    work: Path = WorkOpt,
    criterion: str = typer.Option("wanda", help="magnitude, random, wanda, ria or sparsegpt."),
    sparsity: str = typer.Option("0.5", help="Fraction of weights set to zero, in (0, 1) (unstructured)."),
    pattern: Optional[str] = typer.Option(None, help="N:M semi-structured pattern, e.g. 2:4 (N kept in every M inputs)."),
    scope: Optional[str] = typer.Option(None, help="row or matrix (unstructured); default per criterion."),
    skip: List[str] = typer.Option([], help="Matrix name pattern left dense (repeatable), e.g. 'mlp.down_proj'."),
    stats: str = typer.Option("sparse", help="Statistics from the stream through already-pruned blocks (sparse) or the dense one."),
    seed: int = typer.Option(0, help="Seed of --criterion random."),
    ria_alpha: float = typer.Option(0.5, help="RIA's activation exponent."),
    damp: float = typer.Option(0.01, help="SparseGPT dampening (fraction of the mean Hessian diagonal)."),
    block_size: int = typer.Option(128, help="SparseGPT column block size."),
    keep_cache: bool = typer.Option(False, "--keep-cache", help="Keep the pruned-stream activations."),
    owl: float = typer.Option(0.0, help="OWL non-uniform sparsity: spread block sparsities by +-OWL by outlier ratio (e.g. 0.08)."),
    owl_m: float = typer.Option(5.0, help="OWL outlier threshold: scores above M x the block mean."),
    batch_size: int = typer.Option(8, help="Samples per forward batch for statistics."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    resume: bool = ResumeOpt,
    force: bool = ForceOpt,
    quiet: bool = QuietOpt,
    json_out: bool = JsonOpt,
):
    """Prune every linear layer of every decoder block."""
    from freelunch_cli.prune import PruneConfig, prune as run
    from freelunch_cli.workdir import WorkDir

    cfg = PruneConfig(criterion, sparsity, pattern, scope, list(skip), stats, seed, ria_alpha, damp, block_size, keep_cache,
                      owl, owl_m, device, dtype, batch_size)
    _run(run, WorkDir(work), cfg, _reporter(quiet, json_out), resume=resume, force=force)


@app.command()
def reconstruct(
    work: Path = WorkOpt,
    window: str = typer.Option("block", help="matrix, submodule, block, blocks:K, model, or auto (with --max-memory)."),
    inputs: str = typer.Option("dense", help="dense (windows read dense activations, independent) or sparse (chained)."),
    peft: str = PeftOpt,
    lora_rank: int = LoraRankOpt,
    lora_alpha: float = LoraAlphaOpt,
    lr: float = typer.Option(1e-3, help="Peak AdamW learning rate (linear decay to 0)."),
    epochs: int = typer.Option(2, help="Passes over the calibration windows (1 takes about half the time, at some quality)."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps per window (overrides --epochs)."),
    batch_size: int = typer.Option(4, help="Samples per step."),
    warmup: float = typer.Option(0.0, help="Fraction of the steps with a linear warm-up."),
    weight_decay: float = typer.Option(0.0, help="AdamW weight decay."),
    loss: str = typer.Option("mse", help="mse, nmse or cosine."),
    kl_weight: float = typer.Option(0.0, help="Last window: add this weight x KL to the dense next-token distribution."),
    grad_clip: Optional[float] = typer.Option(None, help="Clip the gradient norm to this value."),
    val_fraction: float = typer.Option(0.0, help="Calibration samples held out for a validation loss."),
    keep_best: bool = typer.Option(False, "--keep-best", help="Keep the parameters with the lowest validation loss."),
    loss_samples: int = typer.Option(32, help="Training samples the reported loss before/after is measured on (0: all)."),
    seed: int = typer.Option(0, help="Seed of the data order, validation split and adapters."),
    keep_cache: bool = typer.Option(False, "--keep-cache", help="Keep activation files no unfinished window needs, and each window's parameters after assembly."),
    shard: Optional[str] = typer.Option(None, help="Take share I of N windows (I/N); default from torchrun or a Slurm array."),
    stale_after: float = typer.Option(300.0, help="Seconds without a heartbeat after which a claimed window is taken over."),
    max_memory: Optional[str] = typer.Option(None, help="Budget for --window auto: e.g. 40GiB, or 0.8 of the device."),
    prepare: bool = typer.Option(False, "--prepare", help="Only set the stage up (before starting sharded workers)."),
    status: bool = typer.Option(False, "--status", help="Show done / running / stale / pending windows and exit."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    resume: bool = ResumeOpt,
    force: bool = ForceOpt,
    quiet: bool = QuietOpt,
    json_out: bool = JsonOpt,
):
    """Train each window of the pruned model to match the dense activations (pruned weights stay zero)."""
    from freelunch_cli.reconstruct import ReconstructConfig, reconstruct as run, show_status
    from freelunch_cli.workdir import WorkDir

    if status:
        _run(show_status, WorkDir(work), stale_after, _reporter(quiet, json_out))
        return
    cfg = ReconstructConfig(window=window, inputs=inputs, peft=peft, lora_rank=lora_rank, lora_alpha=lora_alpha, lr=lr,
                            epochs=epochs, steps=steps, batch_size=batch_size, warmup=warmup, weight_decay=weight_decay,
                            loss=loss, kl_weight=kl_weight, grad_clip=grad_clip, val_fraction=val_fraction, keep_best=keep_best, loss_samples=loss_samples or None, seed=seed,
                            keep_cache=keep_cache, shard=shard, stale_after=stale_after, max_memory=max_memory,
                            prepare=prepare, device=device, dtype=dtype)
    _run(run, WorkDir(work), cfg, _reporter(quiet, json_out), resume=resume, force=force)


@app.command()
def retrain(
    work: Path = WorkOpt,
    start: str = typer.Option("latest", "--from", help="Model to retrain: pruned, reconstructed, latest, or dense (a fine-tuning control, no masks)."),
    lr: Optional[float] = typer.Option(None, help="Peak AdamW learning rate, linear decay to 0 (default: 1e-4 for full, 1e-3 for PEFT)."),
    epochs: int = typer.Option(1, help="Passes over the training windows."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps (overrides --epochs)."),
    batch_size: int = typer.Option(4, help="Windows per step."),
    warmup: float = typer.Option(0.0, help="Fraction of the steps with a linear warm-up."),
    weight_decay: float = typer.Option(0.0, help="AdamW weight decay."),
    grad_clip: Optional[float] = typer.Option(1.0, help="Clip the gradient norm (0 or less: off)."),
    seed: int = typer.Option(0, help="Seed of the data order (and of --data sampling)."),
    data: Optional[str] = typer.Option(None, help="Train on other text (default: the calibration windows)."),
    samples: Optional[int] = typer.Option(None, help="Windows of --data (of the calibration length)."),
    allow_overlap: bool = typer.Option(False, "--allow-overlap", help="Let --data windows overlap."),
    save_every: int = typer.Option(50, help="Steps between resumable checkpoints."),
    grad_checkpoint: Optional[bool] = typer.Option(
        None, "--grad-checkpoint/--no-grad-checkpoint",
        help="Recompute block activations in backward: far less memory, ~1/3 more compute (default: on for PEFT, off for full)."),
    peft: Optional[str] = typer.Option(
        None, help="What trains: full, bias-norm, lora or masked-lora (default: masked-lora from a reconstructed model, else full)."),
    lora_rank: int = LoraRankOpt,
    lora_alpha: float = LoraAlphaOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    resume: bool = ResumeOpt,
    force: bool = ForceOpt,
    quiet: bool = QuietOpt,
    json_out: bool = JsonOpt,
):
    """Next-token training of the whole model, masks kept: full retraining of the pruned model (the baseline), or
    sparse adapters on the reconstructed one (the default after `reconstruct`)."""
    from freelunch_cli.retrain import RetrainConfig, retrain as run
    from freelunch_cli.workdir import WorkDir

    cfg = RetrainConfig(start, lr, epochs, steps, batch_size, warmup, weight_decay, grad_clip if grad_clip and grad_clip > 0 else None,
                        seed, data, samples, allow_overlap, save_every, device, dtype, grad_checkpoint=grad_checkpoint,
                        peft=peft, lora_rank=lora_rank, lora_alpha=lora_alpha)
    _run(run, WorkDir(work), cfg, _reporter(quiet, json_out), resume=resume, force=force)


@app.command("eval")
def eval_cmd(
    runs: List[Path] = typer.Argument(None, help="Work directories to compare (with --compare)."),
    ppl: List[str] = typer.Option([], "--ppl", help="Perplexity text: a file, wikitext2, or datasets NAME[:CONFIG[:SPLIT]] (repeatable)."),
    tasks: Optional[str] = typer.Option(None, help="lm-eval tasks, comma-separated (e.g. boolq,rte,hellaswag,winogrande,arc_easy)."),
    tasks_dir: Optional[Path] = typer.Option(None, help="Folder of local lm-eval task YAMLs (offline tasks)."),
    limit: Optional[int] = typer.Option(None, help="lm-eval: at most this many documents per task."),
    work: Optional[Path] = typer.Option(None, "--work", "-w", help="Work directory whose model to evaluate."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Evaluate this model path instead of a work directory."),
    gguf_file: Optional[str] = typer.Option(None, help="GGUF file name inside the --model folder."),
    stage: str = typer.Option("latest", help="latest, dense, pruned, reconstructed or retrained."),
    seqlen: Optional[int] = typer.Option(None, help="Window length (default: model context, at most 4096)."),
    limit_windows: Optional[int] = typer.Option(None, help="Evaluate only the first N perplexity windows."),
    batch_size: int = typer.Option(4, help="Windows (or lm-eval requests) per forward batch."),
    compare: bool = typer.Option(False, "--compare", help="Table of every metric across the given work directories."),
    plot: bool = typer.Option(False, "--plot", help="Write PNGs: per-window losses and perplexity per run."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for --compare/--plot files (default: WORK/eval/report or ./freelunch-report)."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    quiet: bool = QuietOpt,
    json_out: bool = JsonOpt,
):
    """Perplexity and zero-shot accuracy of a work directory's model (or any model path); comparisons and plots."""
    from freelunch_cli.compare import report
    from freelunch_cli.evaluate import EvalConfig, evaluate
    from freelunch_cli.workdir import WorkDir

    rep = _reporter(quiet, json_out)
    if compare or (plot and not ppl and not tasks):
        targets = list(runs or []) or ([work] if work is not None else [])
        dest = out or (work / "eval" / "report" if work is not None and not runs else Path("freelunch-report"))
        _run(report, targets, dest, plot, rep)
        return
    if runs:
        _run(_fail, f"unexpected arguments {', '.join(map(str, runs))}: pass --compare to compare work directories")
    cfg = EvalConfig(list(ppl), seqlen, stage, limit_windows, batch_size, device, dtype, model, gguf_file,
                     [t.strip() for t in tasks.split(",") if t.strip()] if tasks else [], str(tasks_dir) if tasks_dir else None, limit)
    _run(evaluate, WorkDir(work) if work is not None else None, cfg, rep)
    if plot and work is not None:
        _run(report, [work], out or work / "eval" / "report", True, rep)


def _fail(message: str):
    raise FreelunchError(message)


@app.command()
def export(
    work: Path = WorkOpt,
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the Hugging Face checkpoint."),
    stage: str = typer.Option("latest", help="latest, dense, pruned, reconstructed or retrained."),
    dtype: Optional[str] = typer.Option(None, help="Cast floating-point weights (default: as stored)."),
    max_shard_size: str = typer.Option("2GB", help="Largest safetensors shard."),
    force: bool = typer.Option(False, "--force", help="Overwrite a non-empty --out."),
    resume: bool = typer.Option(False, "--resume", help="Finish an interrupted export into the same --out."),
    quiet: bool = QuietOpt,
    json_out: bool = JsonOpt,
):
    """Write a standard Hugging Face folder (zeros stored) with a model card."""
    from freelunch_cli.export import export as run
    from freelunch_cli.workdir import WorkDir

    _run(run, WorkDir(work), out, stage, dtype, max_shard_size, force, _reporter(quiet, json_out), resume=resume)


def _on_sigterm(signum, frame):
    raise Terminated()


def main():
    signal.signal(signal.SIGTERM, _on_sigterm)  # a batch job's time limit stops as cleanly as Ctrl-C
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars only
    try:
        app()
    except KeyboardInterrupt as e:
        why, code = stop_reason(e)
        typer.echo(why, err=True)
        sys.exit(code)


if __name__ == "__main__":
    main()
