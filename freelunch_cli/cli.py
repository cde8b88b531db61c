"""The `freelunch` command: a thin Typer layer, one library call per subcommand.

Each stage's options are the fields of its config (``configs.stage_configs``): ``stage_command`` turns them into the
command's options, so a default or a help text is written once. Stage modules are imported when a command runs,
so ``--help`` does not load torch.
"""

from __future__ import annotations

import dataclasses
import errno
import importlib
import inspect
import os
import signal
import sys
import typing
from pathlib import Path
from typing import List, Optional

import typer

from freelunch_cli import __version__
from freelunch_cli.configs.stage_configs import (
    CalibrateConfig,
    EvalConfig,
    ExportConfig,
    PruneConfig,
    QuantizeConfig,
    ReconstructConfig,
    RetrainConfig,
)
from freelunch_cli.core.errors import FreelunchError, Terminated, stop_reason
from freelunch_cli.core.options import cli_fields

app = typer.Typer(
    name="freelunch",
    # help texts are rich markup: a bracketed word is written \\[word] or rich takes it for a tag and drops it
    help="Prune a causal LM, then repair it with local reconstruction (calibrate -> prune -> reconstruct -> \\[quantize] -> eval -> export).",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

WORK_ENV = "FREELUNCH_WORK"
WorkOpt = typer.Option(..., "--work", "-w", envvar=WORK_ENV, help=f"Work directory shared by all stages (or ${WORK_ENV}).")
ResumeOpt = typer.Option(False, "--resume", help="Continue an interrupted run of this stage.")
ForceOpt = typer.Option(False, "--force", help="Start this stage over (later stages are discarded).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress output.")
JsonOpt = typer.Option(False, "--json", help="Print a machine-readable summary on stdout.")


def stage_command(config_cls, name: str | None = None):
    """Register ``fn(cfg, **rest)`` as a command whose options are ``config_cls``'s fields followed by ``fn``'s own
    parameters; the command builds ``cfg`` from the fields' values by keyword."""
    hints = typing.get_type_hints(config_cls)

    def register(fn):
        fields = cli_fields(config_cls)
        params = []
        for f in fields:
            default, cli_type = _cli_default(f), f.metadata["cli_type"] or hints[f.name]
            if f.metadata["cli_type"] is not None and default is None:
                cli_type = Optional[cli_type]
            params.append(
                inspect.Parameter(
                    f.name,
                    inspect.Parameter.KEYWORD_ONLY,
                    annotation=_typer_type(cli_type),
                    default=typer.Option(default, *f.metadata["flags"], help=f.metadata["help"]),
                )
            )
        own_hints = typing.get_type_hints(fn)
        own = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=own_hints[p.name])
            for p in list(inspect.signature(fn).parameters.values())[1:]
        ]
        leading = [p for p in own if p.name in ("runs", "work")]  # the work directory first, then the stage's options
        params = leading + params + [p for p in own if p not in leading]
        names = {f.name for f in fields}

        def command(**values):
            cfg = config_cls(**{k: v for k, v in values.items() if k in names})
            return fn(cfg, **{k: v for k, v in values.items() if k not in names})

        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.__doc__, command.__name__ = fn.__doc__, fn.__name__
        app.command(name or fn.__name__)(command)
        return fn

    return register


def _cli_default(f: dataclasses.Field):
    """The option's default as the command line spells it (``...``: required)."""
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        return ...
    parse_as = f.metadata["cli_type"]
    if parse_as is not None:  # a list the command line spells as one text, or a number read as text
        return parse_as(default) if default not in (None, []) else None
    return default


def _typer_type(hint):
    """``list[str]``, ``int | None``, ``float | str | None`` as Typer reads them (List[str], Optional[int], ...)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        return List[args[0]]
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return Optional[rest[0]]
    return hint


def debugging() -> bool:
    """``FREELUNCH_DEBUG`` set to anything but empty, 0, false, no or off: show tracebacks of unexpected errors."""
    return os.environ.get("FREELUNCH_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")


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
        if debugging():
            raise
        if e.errno == errno.ENOSPC:
            typer.echo(f"error: the disk is full ({e.filename or 'while writing'}); free space and rerun with --resume", err=True)
        else:
            typer.echo(f"error: {e.strerror or e}{': ' + str(e.filename) if e.filename else ''}", err=True)
        raise typer.Exit(1) from None
    except Exception as e:  # an internal error: one line, the traceback on demand
        if debugging():
            raise
        typer.echo(
            f"error: unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (set FREELUNCH_DEBUG=1 for the traceback)",
            err=True,
        )
        raise typer.Exit(1) from None


def _reporter(quiet: bool, json_mode: bool):
    from freelunch_cli.core.console import Reporter

    return Reporter(quiet=quiet, json_mode=json_mode)


def _work(path: Path):
    from freelunch_cli.workdir.directory import WorkDir

    return WorkDir(path)


def _version(value: bool):
    if value:
        typer.echo(f"freelunch {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version.")):
    pass


def _stage(config_cls, name: str, doc: str) -> None:
    """Register the command that runs ``stages.<name>.<name>`` on the work directory with the config's options."""

    def command(
        cfg,
        work: Path = WorkOpt,
        resume: bool = ResumeOpt,
        force: bool = ForceOpt,
        quiet: bool = QuietOpt,
        json_out: bool = JsonOpt,
    ):
        run = getattr(importlib.import_module(f"freelunch_cli.stages.{name}"), name)
        _run(run, _work(work), cfg, _reporter(quiet, json_out), resume=resume, force=force)

    command.__name__, command.__doc__ = name, doc
    stage_command(config_cls)(command)


_stage(CalibrateConfig, "calibrate", "Import the dense model as block shards, sample calibration text, cache dense activations.")
_stage(PruneConfig, "prune", "Prune every linear layer of every decoder block.")


@stage_command(ReconstructConfig)
def reconstruct(
    cfg: ReconstructConfig,
    work: Path = WorkOpt,
    status: bool = typer.Option(False, "--status", help="Show done / running / stale / pending windows and exit."),
    resume: bool = ResumeOpt,
    force: bool = ForceOpt,
    quiet: bool = QuietOpt,
    json_out: bool = JsonOpt,
):
    """Train each window of the pruned model to match the dense activations (pruned weights stay zero)."""
    from freelunch_cli.stages.reconstruct import reconstruct as run
    from freelunch_cli.stages.reconstruct import show_status

    if status:
        _run(show_status, _work(work), cfg.stale_after, _reporter(quiet, json_out))
        return
    _run(run, _work(work), cfg, _reporter(quiet, json_out), resume=resume, force=force)


_stage(
    RetrainConfig,
    "retrain",
    "Next-token training of the whole model, masks kept: full retraining of the pruned model (the baseline), or "
    "sparse adapters on the reconstructed one (the default after `reconstruct`).",
)

_stage(
    QuantizeConfig,
    "quantize",
    "Quantize the weights (W4A16, W8A16), each window trained through a fake-quantizer to match the dense "
    "activations (quantization-aware local reconstruction; --steps 0: round-to-nearest). Pruned weights stay zero.",
)


@stage_command(EvalConfig, name="eval")
def eval_cmd(
    cfg: EvalConfig,
    runs: List[Path] = typer.Argument(None, help="Work directories to compare (with --compare)."),
    work: Optional[Path] = typer.Option(
        None, "--work", "-w", envvar=WORK_ENV, help=f"Work directory whose model to evaluate (or ${WORK_ENV})."
    ),
    compare: bool = typer.Option(False, "--compare", help="Table of every metric across the given work directories."),
    plot: bool = typer.Option(False, "--plot", help="Write PNGs: per-window losses and perplexity per run."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Folder for --compare/--plot files (default: WORK/eval/report or ./freelunch-report)."
    ),
    quiet: bool = QuietOpt,
    json_out: bool = JsonOpt,
):
    """Perplexity and zero-shot accuracy of a work directory's model (or any model path); comparisons and plots."""
    from freelunch_cli.evaluation.compare import report
    from freelunch_cli.stages.evaluate import evaluate

    rep = _reporter(quiet, json_out)
    if compare or (plot and not cfg.ppl and not cfg.tasks):
        targets = list(runs or []) or ([work] if work is not None else [])
        dest = out or (_work(work).report_dir if work is not None and not runs else Path("freelunch-report"))
        _run(report, targets, dest, plot, rep)
        return
    if runs:
        _run(_fail, f"unexpected arguments {', '.join(map(str, runs))}: pass --compare to compare work directories")
    _run(evaluate, _work(work) if work is not None else None, cfg, rep)
    if plot and work is not None:
        _run(report, [work], out or _work(work).report_dir, True, rep)


def _fail(message: str):
    raise FreelunchError(message)


@stage_command(ExportConfig)
def export(
    cfg: ExportConfig,
    work: Path = WorkOpt,
    force: bool = typer.Option(False, "--force", help="Overwrite a non-empty --out."),
    resume: bool = typer.Option(False, "--resume", help="Finish an interrupted export into the same --out."),
    quiet: bool = QuietOpt,
    json_out: bool = JsonOpt,
):
    """Write a standard Hugging Face folder (zeros stored) with a model card."""
    from freelunch_cli.stages.export import export as run

    _run(run, _work(work), cfg, _reporter(quiet, json_out), resume=resume, force=force)


@app.command()
def verify(work: Path = WorkOpt, quiet: bool = QuietOpt, json_out: bool = JsonOpt):
    """Hash every file of the work directory against the manifest (stages check sizes and modification times)."""
    from freelunch_cli.stages.verify import verify as run

    _run(run, _work(work), _reporter(quiet, json_out))


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
