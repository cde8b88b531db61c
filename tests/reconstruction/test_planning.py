"""Planning windows and choosing --window auto read the model's config, not its tensors."""

import pytest
import torch

from freelunch_cli.core.console import Reporter
from freelunch_cli.engine import windowed
from freelunch_cli.engine.windowed import plan_windows
from freelunch_cli.model import skeleton
from freelunch_cli.model.skeleton import Skeleton, block_templates
from freelunch_cli.reconstruction.memory import block_numbers
from freelunch_cli.stages.reconstruct import ReconstructConfig, resolve_auto_window


def test_planning_reads_no_tensor(fresh_work, monkeypatch):
    work = fresh_work("llama")
    sk = Skeleton.from_work(work, "dense", "cpu", torch.float32)
    config, templates = block_templates(work)
    assert [dict(t.named_parameters()).keys() for t in templates] == [dict(t.named_parameters()).keys() for t in sk.templates]
    assert all(p.is_meta for t in templates for p in t.parameters())
    assert block_numbers(config, templates[0]) == block_numbers(sk.config, sk.templates[0])
    submodule = plan_windows(work, "submodule")  # the halves check still runs block 0 on a real call
    assert len(submodule) == 2 * config.num_hidden_layers

    def no_tensors(*args, **kwargs):
        raise AssertionError("planning read a tensor file")

    monkeypatch.setattr(skeleton, "load_tensors", no_tensors)
    monkeypatch.setattr(windowed.Skeleton, "from_work", no_tensors)
    work.own_rest_path("dense").rename(work.root / "rest-moved")  # embeddings and head out of reach
    assert len(plan_windows(work, "matrix")) == len(sk.templates) * 7
    cfg = resolve_auto_window(
        work, ReconstructConfig(window="auto", max_memory="1TiB", dtype="float32"), "cpu", Reporter(quiet=True)
    )
    assert cfg.window == "model"
    with pytest.raises(AssertionError, match="read a tensor"):
        plan_windows(work, "submodule")
