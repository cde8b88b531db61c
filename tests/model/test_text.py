import json

import pytest
import torch

from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.model.text import read_documents, read_text, resolve_text, sample_sequences


def test_windows_are_exact_reproducible_and_distinct():
    ids = torch.arange(10_000)
    a = sample_sequences(ids, 20, 128, seed=3)
    b = sample_sequences(ids, 20, 128, seed=3)
    c = sample_sequences(ids, 20, 128, seed=4)
    assert a.shape == (20, 128)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # each window is a contiguous slice of the stream, and no two windows share a token
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(20, 127, dtype=a.dtype))
    assert len(set(a.flatten().tolist())) == 20 * 128


def test_too_little_text_is_a_clear_error():
    with pytest.raises(FreelunchError, match="too little calibration text"):
        sample_sequences(torch.arange(1000), 10, 128, seed=0)
    # overlapping windows are allowed on request
    assert sample_sequences(torch.arange(1000), 10, 128, seed=0, overlap=True).shape == (10, 128)


def test_jsonl_and_parquet_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    j = tmp_path / "d.jsonl"
    j.write_text("\n".join(json.dumps({"text": t}) for t in ["one", "two"]) + "\n")
    assert read_documents(resolve_text(str(j))) == ["one", "two"]
    assert read_text(resolve_text(str(j))) == "one\n\ntwo"
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", "b", "c"]}), p)
    assert read_documents(resolve_text(str(p))) == ["a", "b", "c"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(FreelunchError, match="no field 'text'"):
        read_documents(resolve_text(str(bad)))


def test_dataset_reference_parsing():
    s = resolve_text("Salesforce/wikitext:wikitext-2-raw-v1:test")
    assert (s.spec, s.config, s.split) == ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")
    assert resolve_text("wikitext", "cfg", None).split == "train"


def test_bad_text_files(tmp_path):
    empty = tmp_path / "e.txt"
    empty.write_text("  \n")
    with pytest.raises(FreelunchError, match="holds no text"):
        read_text(resolve_text(str(empty)))
    latin = tmp_path / "l.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(FreelunchError, match="not UTF-8"):
        read_text(resolve_text(str(latin)))
    with pytest.raises(FreelunchError, match="not found"):
        resolve_text(str(tmp_path / "missing.txt"))


def test_null_missing_and_non_string_records_are_skipped_and_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    j = tmp_path / "d.jsonl"
    recs = [{"text": "one"}, {"text": None}, {"body": "x"}, {"text": 7}, {"text": "None of them"}, {"text": ["a"]}]
    j.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    warned = []
    assert read_documents(resolve_text(str(j)), warned.append) == ["one", "None of them"]  # a real "None" text stays
    (msg,) = warned
    assert f"{j}: skipped 4 of 6 lines" in msg
    assert "line 2: 'text' is null" in msg and "line 3: no field 'text'" in msg and "line 4: 'text' is a int" in msg
    with pytest.raises(FreelunchError, match=r"4 of 6 lines hold no string in 'text' \(line 2: 'text' is null"):
        read_text(resolve_text(str(j)))  # nobody to tell: never silent
    nulls = tmp_path / "n.jsonl"
    nulls.write_text('{"text": null}\n' * 5)
    with pytest.raises(FreelunchError, match=r"n.jsonl: none of its 5 lines holds text in 'text' \(line 1: 'text' is null"):
        read_text(resolve_text(str(nulls)), warned.append)
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", None, "c"]}), p)
    assert read_documents(resolve_text(str(p)), warned.append) == ["a", "c"]
    assert "skipped 1 of 3 rows" in warned[-1] and "row 1: 'text' is null" in warned[-1]


def test_calibrate_skips_null_records_with_a_warning(tmp_path):
    from transformers import AutoTokenizer

    from freelunch_cli.core.console import Reporter
    from freelunch_cli.stages.calibrate import CalibrateConfig, calibrate
    from freelunch_cli.workdir.directory import WorkDir
    from freelunch_cli.workdir.files import load_tensors

    from helpers import CALIB, make_tiny_model

    model = make_tiny_model(tmp_path / "m")
    docs = [d for d in CALIB.read_text().splitlines() if len(d) > 40][:200]
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" + json.dumps({"text": None}) + "\n" for d in docs))
    warned = []
    rep = Reporter(quiet=True)
    rep.warn = warned.append
    work = WorkDir(tmp_path / "w")
    calibrate(work, CalibrateConfig(model=str(model), data=str(data), samples=4, seqlen=32, device="cpu"), rep)
    assert any("skipped 200 of 400 lines" in w for w in warned), warned
    tok = AutoTokenizer.from_pretrained(model)
    windows = [tok.decode(row) for row in load_tensors(work.tokens_path)["input_ids"]]
    assert not any("\n\nNone\n\n" in w or w.startswith("None\n") for w in windows)
