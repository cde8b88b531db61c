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
    state = dict(load_tensors(work.rest_path(stage)))
    for i in range(arch.num_blocks):
        state.update({arch.block_prefix(i) + k: v for k, v in load_tensors(work.model_block_path(stage, i)).items()})
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


FIT_SHARE = 0.8  # of a GPU's free memory a whole model may take before it is spread over the node's GPUs and host


def dispatch(lm: nn.Module, device) -> nn.Module:
    """Place a whole model for inference: on ``device`` when it fits ``FIT_SHARE`` of its free memory, else over every
    GPU of the node and the host with accelerate's device map (blocks kept whole; activations follow the hooks)."""
    device = torch.device(device)
    size = sum(p.numel() * p.element_size() for p in lm.parameters())
    if device.type != "cuda" or size <= FIT_SHARE * torch.cuda.mem_get_info(device)[0]:
        return lm.to(device)
    from accelerate import dispatch_model

    return dispatch_model(lm, device_map=device_map(lm, spread_memory()))


def spread_memory() -> dict:
    """What each GPU of the node and the host can hold: ``FIT_SHARE`` of their free memory."""
    from freelunch_cli.core.device import available_memory

    gpus = {i: int(FIT_SHARE * torch.cuda.mem_get_info(i)[0]) for i in range(torch.cuda.device_count())}
    return {**gpus, "cpu": int(FIT_SHARE * available_memory(torch.device("cpu")))}


def device_map(lm: nn.Module, max_memory: dict) -> dict:
    """accelerate's device map for ``lm`` under ``max_memory`` (device -> bytes), decoder blocks never split."""
    from accelerate import infer_auto_device_map

    blocks = {type(b).__name__ for b in lm.get_submodule(find_arch(lm, lm.config).layers_path)}
    return infer_auto_device_map(lm, max_memory=max_memory, no_split_module_classes=sorted(blocks))
