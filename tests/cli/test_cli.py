"""The CLI end to end on a tiny model: every subcommand's wiring, --json summaries, --quiet."""

import dataclasses
import json

from typer.testing import CliRunner

from freelunch_cli.cli import app
from freelunch_cli.configs.stage_configs import (
    CalibrateConfig,
    EvalConfig,
    ExportConfig,
    PruneConfig,
    ReconstructConfig,
    RetrainConfig,
)
from freelunch_cli.core.options import cli_fields

from helpers import CALIB, HELDOUT, SAMPLES, SEQLEN


def run(*args):
    result = CliRunner().invoke(app, [*args, "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""  # --quiet: nothing for people, the summary on stdout
    return json.loads(result.stdout)


def test_pipeline_through_the_cli(tiny_models, tmp_path):
    w = str(tmp_path / "w")
    cal = run(
        "calibrate",
        "--model",
        str(tiny_models["mistral"]),
        "--data",
        str(CALIB),
        "--samples",
        str(SAMPLES),
        "--seqlen",
        str(SEQLEN),
        "--work",
        w,
        "--device",
        "cpu",
    )
    assert cal["num_blocks"] == 2 and cal["tokens"] == SAMPLES * SEQLEN
    ev = ["--work", w, "--ppl", str(HELDOUT), "--seqlen", str(SEQLEN), "--limit-windows", "4", "--device", "cpu"]
    dense = run("eval", *ev, "--stage", "dense")["results"][0]
    pr = run("prune", "--work", w, "--criterion", "ria", "--pattern", "2:4", "--device", "cpu")
    assert pr["pattern"] == "2:4" and abs(pr["achieved_sparsity"] - 0.5) < 1e-9
    rc = run("reconstruct", "--work", w, "--window", "submodule", "--lr", "1e-3", "--device", "cpu", "--keep-cache")
    assert rc["windows"] == 4 and rc["loss_after"] < rc["loss_before"]
    st = run("reconstruct", "--work", w, "--status")
    assert st["done"] == [0, 1, 2, 3] and st["status"] == "done"
    recon = run("eval", *ev)["results"][0]
    assert recon["model"] == "reconstructed" and dense["model"] == "dense"
    rt = run("retrain", "--work", w, "--steps", "2", "--lr", "1e-4", "--device", "cpu")
    assert rt["steps"] == 2 and rt["from"] == "reconstructed"
    assert (rt["config"]["peft"], rt["config"]["lr"], rt["config"]["grad_checkpoint"]) == ("masked-lora", 1e-4, True)
    rt = run("retrain", "--work", w, "--steps", "2", "--no-grad-checkpoint", "--peft", "full", "--device", "cpu", "--force")
    assert (rt["config"]["peft"], rt["config"]["lr"], rt["config"]["grad_checkpoint"]) == ("full", 1e-4, False)
    out = tmp_path / "hf"
    ex = run("export", "--work", w, "--out", str(out), "--stage", "reconstructed")
    assert ex["stage"] == "reconstructed" and (out / "config.json").exists()
    rep = run("eval", "--compare", w, "--out", str(tmp_path / "report"), "--plot")
    assert [r["model"] for r in rep["rows"]] == ["dense", "reconstructed"]
    assert (tmp_path / "report" / "compare.md").exists() and (tmp_path / "report" / "window_losses.png").exists()
    again = run("prune", "--work", w, "--criterion", "ria", "--pattern", "2:4", "--device", "cpu")
    assert again == pr  # a finished stage with the same options: its summary, nothing redone


def test_version_and_help():
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.startswith("freelunch ")
    r = CliRunner().invoke(app, ["--help"])
    assert r.exit_code == 0 and all(c in r.stdout for c in ("calibrate", "prune", "reconstruct", "eval", "export", "retrain"))


STAGE_CONFIGS = {
    "calibrate": CalibrateConfig,
    "prune": PruneConfig,
    "reconstruct": ReconstructConfig,
    "retrain": RetrainConfig,
    "eval": EvalConfig,
    "export": ExportConfig,
}


def test_every_option_is_its_config_field():
    """Each stage's options come from its config's fields: the same names, defaults and help texts."""
    import typer.main

    commands = typer.main.get_command(app).commands
    for name, config_cls in STAGE_CONFIGS.items():
        params = {p.name: p for p in commands[name].params}
        for f in cli_fields(config_cls):
            assert f.name in params, (name, f.name)
            option = params[f.name]
            assert option.help == f.metadata["help"], (name, f.name)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                assert option.required, (name, f.name)
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            parse_as = f.metadata["cli_type"]
            expected = (parse_as(default) if default not in (None, []) else None) if parse_as else default
            assert option.default == expected, (name, f.name, option.default, default)


def test_the_work_directory_can_come_from_the_environment(calibrated, tmp_path):
    """The mission's own example runs as typed once FREELUNCH_WORK is set (a batch job sets it once)."""
    import shutil

    work = tmp_path / "w"
    shutil.copytree(calibrated["llama"].root, work)
    result = CliRunner().invoke(
        app, ["prune", "--criterion", "magnitude", "--sparsity", "0.5", "--json", "--quiet"], env={"FREELUNCH_WORK": str(work)}
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["work"] == str(work)
    missing = CliRunner().invoke(app, ["prune", "--criterion", "magnitude"], env={"FREELUNCH_WORK": ""})
    assert missing.exit_code == 2 and "--work" in missing.output


def test_every_help_text_and_message_shows_its_brackets(capsys):
    """Help texts are rich markup: an unescaped ``[word]`` is taken for a tag and vanishes from ``--help`` (it read
    "reconstruct ->  -> eval"). Every help text, rendered, must read as written; so must every console message."""
    import typer.main
    from rich.markup import render

    from freelunch_cli.core.console import Reporter

    root = typer.main.get_command(app)
    texts = [("freelunch", root.help)]
    for name, command in root.commands.items():
        texts += [(name, command.help)] + [(f"{name} {p.name}", getattr(p, "help", None)) for p in command.params]
    for where, text in texts:
        if text and "[" in text:
            assert render(text).plain == text.replace("\\[", "["), f"{where}: a bracketed word is eaten as markup"
    result = CliRunner(env={"COLUMNS": "400"}).invoke(app, ["--help"])
    assert "reconstruct -> [quantize] -> eval" in result.output
    rep = Reporter()
    rep.warn("skipped [experts, hidden] and [bold]x[/bold]")
    rep.info("shape [64, 32]")
    err = capsys.readouterr().err
    assert "skipped [experts, hidden] and [bold]x[/bold]" in err and "shape [64, 32]" in err
