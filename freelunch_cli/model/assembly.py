"""The whole model of a work directory as one plain ``transformers`` module (for lm-eval and global retraining)."""

from __future__ import annotations

import torch
from torch import nn

from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.model.arch import find_arch
from freelunch_cli.model.build import init_non_persistent_buffers, meta_model, prepare_config
from freelunch_cli.model.source import trusts_remote_code, work_config
from freelunch_cli.workdir.files import load_tensors


def materialize(work, stage: str, device, dtype: torch.dtype) -> nn.Module:
    """The work directory's model of ``stage`` as a plain ``transformers`` model on ``device`` in ``dtype`` (memory: the
    whole model). Raises FreelunchError when a tensor the config asks for is in no shard."""
    config = prepare_config(work_config(work))
    lm = meta_model(config, trusts_remote_code(work))
    arch = find_arch(lm, config)
    state = dict(load_tensors(work.check_file(work.rest_path(stage))))
    for i in range(arch.num_blocks):
        state.update({arch.block_prefix(i) + k: v for k, v in load_tensors(work.stage_block_path(stage, i)).items()})
    if getattr(config, "tie_word_embeddings", False):
        state = {k: v for k, v in state.items() if not k.endswith("lm_head.weight")}
    lm.load_state_dict(state, assign=True, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        lm.tie_weights()
    init_non_persistent_buffers(lm)
    missing = [n for n, p in list(lm.named_parameters()) + list(lm.named_buffers()) if p.is_meta]
    if missing:
        raise FreelunchError(f"could not assemble the model: no values for {missing[:4]}")
    return lm.to(device=device, dtype=dtype).eval()
