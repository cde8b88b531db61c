"""Every bad input of the README's table: a one-line error naming the problem, a non-zero exit, no traceback."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from freelunch_cli.cli import app

from helpers import CALIB, SAMPLES, SEQLEN, make_tiny_model, train_tokenizer


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_models, calibrated):
    d = tmp_path_factory.mktemp("bad")
    (d / "empty_dir").mkdir()
    (d / "junk.gguf").write_bytes(b"not a gguf file at all")
    (d / "empty.txt").write_text("")
    (d / "latin1.txt").write_bytes("d\xe9j\xe0 vu, caf\xe9".encode("latin-1") * 100)
    (d / "short.txt").write_text("A few words of text only.\n")
    (d / "a_file").write_text("x")
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = d / "gpt2"  # its blocks use Conv1D, not nn.Linear: nothing freelunch can prune
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=384, n_positions=64)).save_pretrained(gpt2)
    train_tokenizer(CALIB.read_text()[:20000]).save_pretrained(gpt2)
    opt32 = make_tiny_model(d / "opt32", "opt", max_position_embeddings=32)
    custom = make_tiny_model(d / "custom", "llama")
    (custom / "config.json").write_text(
        json.dumps({**json.loads((custom / "config.json").read_text()), "auto_map": {"AutoConfig": "configuration_x.XConfig"}})
    )
    return {
        "dir": d,
        "model": str(tiny_models["llama"]),
        "work": str(calibrated["llama"].root),
        "gpt2": str(gpt2),
        "opt32": str(opt32),
        "custom": str(custom),
    }


def cal(model, data, work, *extra):
    seqlen = () if "--seqlen" in extra else ("--seqlen", str(SEQLEN))
    return ["calibrate", "--model", model, "--data", data, "--work", work, "--samples", str(SAMPLES), *seqlen, *extra]


# (id, argv builder, fragment the message must contain). The README's bad-input table lists the same rows.
CASES = [
    ("missing model", lambda i, w: cal("/no/such/model", str(CALIB), w + "-new"), "model not found: /no/such/model"),
    (
        "folder that is not a model",
        lambda i, w: cal(str(i["dir"] / "empty_dir"), str(CALIB), w + "-new"),
        "is not a Hugging Face model folder (no config.json)",
    ),
    (
        "architecture without decoder blocks",
        lambda i, w: cal(i["gpt2"], str(CALIB), w + "-new"),
        "unsupported architecture 'gpt2'",
    ),
    ("GGUF that is not GGUF", lambda i, w: cal(str(i["dir"] / "junk.gguf"), str(CALIB), w + "-new"), "is not a GGUF file"),
    ("sparsity 0", lambda i, w: ["prune", "--work", w, "--sparsity", "0"], "--sparsity must be in (0, 1), got 0"),
    ("sparsity 1", lambda i, w: ["prune", "--work", w, "--sparsity", "1"], "--sparsity must be in (0, 1), got 1"),
    ("sparsity -0.1", lambda i, w: ["prune", "--work", w, "--sparsity", "-0.1"], "--sparsity must be in (0, 1), got -0.1"),
    (
        "sparsity abc",
        lambda i, w: ["prune", "--work", w, "--sparsity", "abc"],
        "--sparsity must be a number in (0, 1), got 'abc'",
    ),
    ("pattern 4:2", lambda i, w: ["prune", "--work", w, "--pattern", "4:2"], "N:M needs 0 < N < M"),
    ("pattern 0:4", lambda i, w: ["prune", "--work", w, "--pattern", "0:4"], "N:M needs 0 < N < M"),
    (
        "pattern 2:3 on 64 inputs",
        lambda i, w: ["prune", "--work", w, "--pattern", "2:3"],
        "pattern 2:3 does not fit block 0 self_attn.q_proj: its 64 inputs are not divisible by 3",
    ),
    ("unknown criterion", lambda i, w: ["prune", "--work", w, "--criterion", "taylor"], "unknown criterion 'taylor'"),
    ("unknown window", lambda i, w: ["reconstruct", "--work", w, "--window", "layer"], "unknown window 'layer'"),
    (
        "samples x seqlen larger than the text",
        lambda i, w: cal(i["model"], str(i["dir"] / "short.txt"), w + "-new"),
        "too little calibration text",
    ),
    ("empty text file", lambda i, w: cal(i["model"], str(i["dir"] / "empty.txt"), w + "-new"), "holds no text"),
    ("non-UTF-8 text file", lambda i, w: cal(i["model"], str(i["dir"] / "latin1.txt"), w + "-new"), "is not UTF-8 text"),
    (
        "missing text file",
        lambda i, w: cal(i["model"], "/no/such/calib.txt", w + "-new"),
        "text file not found: /no/such/calib.txt",
    ),
    (
        "work directory of another run",
        lambda i, w: cal(i["model"], str(CALIB), w, "--seed", "5"),
        "holds another run (seed: 0 then, 5 now)",
    ),
    ("no finished previous stage", lambda i, w: ["reconstruct", "--work", w], "reconstruct needs a finished `prune` stage"),
    (
        "unwritable output folder",
        lambda i, w: ["export", "--work", w, "--out", str(i["dir"] / "a_file" / "out"), "--stage", "dense"],
        "cannot write to",
    ),
    (
        "a --skip pattern matching no matrix",
        lambda i, w: ["prune", "--work", w, "--skip", "mlp.down"],
        "--skip 'mlp.down' matches no matrix",
    ),
    (
        "--skip-blocks beyond the model",
        lambda i, w: ["prune", "--work", w, "--skip-blocks", "7"],
        "--skip-blocks 7: the model has blocks 0 to 1",
    ),
    (
        "--seqlen beyond a learned position table",
        lambda i, w: cal(i["opt32"], str(CALIB), w + "-new", "--seqlen", "64"),
        "--seqlen 64 is beyond the model's learned position table of 32 positions",
    ),
    (
        "a model with its own code, without --trust-remote-code",
        lambda i, w: cal(i["custom"], str(CALIB), w + "-new"),
        "runs its own code (configuration_x.XConfig); pass --trust-remote-code",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, inputs, tmp_path):
    name, argv, fragment = case
    work = tmp_path / "work"
    shutil.copytree(inputs["work"], work)
    result = CliRunner().invoke(app, argv(inputs, str(work)))
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert fragment in result.stderr, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1  # one line
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not (tmp_path / "work-new").exists()  # refused before anything was written


def test_too_little_disk_for_the_cache_is_refused_before_writing(inputs, tmp_path, monkeypatch):
    import freelunch_cli.workdir.files as files

    real = shutil.disk_usage
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    work = tmp_path / "w"
    result = CliRunner().invoke(app, cal(inputs["model"], str(CALIB), str(work)))
    assert result.exit_code == 2
    assert "not enough disk for the activation cache: it needs" in result.stderr and "1000 B free" in result.stderr
    assert not work.exists()  # nothing was written


def test_work_directory_is_untouched_by_refused_input(inputs, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(inputs["work"], work)
    before = (work / "manifest.json").read_bytes()
    for argv in (
        ["prune", "--work", str(work), "--pattern", "2:3"],
        cal(inputs["model"], str(inputs["dir"] / "short.txt"), str(work), "--force"),
        cal(inputs["model"], str(CALIB), str(work), "--seed", "3"),
    ):
        assert CliRunner().invoke(app, argv).exit_code == 2
    assert (work / "manifest.json").read_bytes() == before


@pytest.mark.parametrize("value", ["0", "", "false", "no"])
def test_freelunch_debug_off_values_show_no_traceback(value, monkeypatch):
    from freelunch_cli.cli import debugging

    monkeypatch.setenv("FREELUNCH_DEBUG", value)
    assert not debugging()
    monkeypatch.setenv("FREELUNCH_DEBUG", "1")
    assert debugging()
