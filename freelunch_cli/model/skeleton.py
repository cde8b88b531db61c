"""A causal LM with its decoder blocks held elsewhere.

``Skeleton`` keeps the embeddings, final norm and head of a Hugging Face causal LM in memory and
replaces each decoder block by a stub. Running the model's own ``forward`` through the stubs gives the
embedding output and the exact arguments the model passes to each block (position embeddings, masks),
and, with the last stub injecting a hidden state, the logits. Blocks are built one at a time from
their shards. This is what lets every stage stream: one block plus its activations in memory.
"""

from __future__ import annotations

import copy
import threading

import torch
from torch import nn

from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.model.arch import Arch, find_arch
from freelunch_cli.model.build import init_non_persistent_buffers, meta_model, prepare_config
from freelunch_cli.model.moe import split_experts
from freelunch_cli.model.source import trusts_remote_code, work_config
from freelunch_cli.workdir.files import load_tensors


class _Capture(threading.local):
    """What the stubs record during one forward pass, and the hidden state the last one injects: one per thread, so
    two threads running the same skeleton (a prefetching loader and the training step) never see each other's."""

    def __init__(self, last: int):
        self.last = last
        self.calls: dict[int, tuple] = {}
        self.embed: torch.Tensor | None = None
        self.inject: torch.Tensor | None = None


class _Stub(nn.Module):
    """Stands in for decoder block ``index``: records its call and passes the hidden state through."""

    def __init__(self, index: int, capture: _Capture, original: nn.Module):
        super().__init__()
        self.index = index
        self.capture = capture
        if hasattr(original, "attention_type"):
            self.attention_type = original.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        capture = self.capture  # this thread's
        capture.calls[self.index] = (args, kwargs)
        if self.index == 0:
            capture.embed = hidden_states
        if capture.inject is not None and self.index == capture.last:
            return capture.inject
        return hidden_states


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def run_block(block: nn.Module, hidden: torch.Tensor, call) -> torch.Tensor:
    """Call a decoder block with the arguments its model would pass; return the hidden state."""
    args, kwargs = call
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class Skeleton:
    """Embeddings, final norm and head on a device; decoder blocks built on demand.

    Safe to call from several threads: what a forward pass records lives in per-thread state (``_Capture``), and the
    cache of block calls is replaced whole, never changed in place."""

    def __init__(
        self,
        lm: nn.Module,
        config,
        blocks: list[nn.Module],
        device: torch.device,
        dtype: torch.dtype,
        rest_device: torch.device | None = None,
    ):
        self.lm = lm
        self.config = config
        self.arch: Arch = find_arch(lm, config)
        self.device = torch.device(device)  # where blocks run
        self.rest_device = torch.device(rest_device or device)  # where embeddings, norm and head live
        self.dtype = dtype
        self._templates = blocks  # meta-device blocks (work directory) or real blocks (in-memory model)
        self._capture = _Capture(self.arch.num_blocks - 1)
        stubs = nn.ModuleList([_Stub(i, self._capture, b) for i, b in enumerate(blocks)])
        _set_submodule(lm, self.arch.layers_path, stubs)
        self._calls_cache: dict[tuple[int, int], dict] = {}
        self.lm.eval()

    # ---- construction ------------------------------------------------------------------------------
    @classmethod
    def from_rest(
        cls, config, rest: dict[str, torch.Tensor], device, dtype, rest_device=None, trust_remote_code: bool = False
    ) -> Skeleton:
        """Build from a config and the non-block tensors (embeddings, norms, head).

        ``rest_device`` (default: ``device``) holds the embeddings and head; stages that never need logits
        keep them on the CPU so that a large vocabulary does not take accelerator memory.
        """
        rest_device = rest_device or device
        config = prepare_config(config)
        lm = meta_model(config, trust_remote_code)
        arch = find_arch(lm, config)
        templates = list(lm.get_submodule(arch.layers_path))
        _set_submodule(lm, arch.layers_path, nn.ModuleList())
        lm.to_empty(device=rest_device)
        init_non_persistent_buffers(lm)
        missing, unexpected = lm.load_state_dict(rest, strict=False)
        tied = set(getattr(lm, "all_tied_weights_keys", {}) or {})
        missing = [k for k in missing if k not in tied and not _is_tied_head(lm, k)]
        if missing or unexpected:
            raise FreelunchError(
                f"the model's non-block tensors do not match its config (missing {missing[:4]}, unexpected {unexpected[:4]})"
            )
        if getattr(config, "tie_word_embeddings", False):
            lm.tie_weights()
        lm.to(dtype)
        lm.requires_grad_(False)  # embeddings, norm and head are never trained through the skeleton
        _set_submodule(lm, arch.layers_path, nn.ModuleList(templates))
        return cls(lm, config, templates, device, dtype, rest_device)

    @classmethod
    def from_work(cls, work, stage: str, device, dtype, rest_device=None) -> Skeleton:
        rest = load_tensors(work.rest_path(stage))
        sk = cls.from_rest(work_config(work), rest, device, dtype, rest_device, trusts_remote_code(work))
        sk.block_source = lambda i: load_tensors(work.model_block_path(stage, i))
        return sk

    @classmethod
    def from_checkpoint(cls, checkpoint, config, device, dtype) -> Skeleton:
        """Stream a model's own checkpoint (``source.Checkpoint``), one block at a time, as from a work directory."""
        sk = cls.from_rest(config, checkpoint.rest(), device, dtype, trust_remote_code=checkpoint.spec.trust_remote_code)
        sk.block_source = checkpoint.block
        return sk

    @classmethod
    def from_model(cls, lm: nn.Module, device, dtype) -> Skeleton:
        """Wrap an in-memory model (e.g. ``--model PATH`` for eval): its real blocks are reused."""
        config = prepare_config(lm.config)
        split_experts(lm)
        lm.config = config
        for m in lm.modules():
            if hasattr(m, "config") and m.config is not lm.config and type(m.config) is type(config):
                m.config = config
        lm.to(device=device, dtype=dtype)
        arch = find_arch(lm, config)
        blocks = list(lm.get_submodule(arch.layers_path))
        sk = cls(lm, config, blocks, device, dtype)
        sk.block_source = None
        return sk

    # ---- blocks ------------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.arch.num_blocks

    @property
    def templates(self) -> list[nn.Module]:
        """The blocks' modules as built from the config (on the meta device for a work directory): shapes only."""
        return self._templates

    def block_state(self, i: int) -> dict[str, torch.Tensor]:
        """The stored tensors of block ``i`` (keys relative to the block)."""
        if self.block_source is None:
            return {k: v.detach().clone() for k, v in self._templates[i].state_dict().items()}
        return self.block_source(i)

    def build_block(self, i: int, state: dict[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None) -> nn.Module:
        """A real, eval-mode copy of block ``i`` on the device, loaded from ``state`` or its shard."""
        if self.block_source is None and state is None:
            return self._templates[i]
        state = self.block_state(i) if state is None else state
        block = copy.deepcopy(self._templates[i])
        block.load_state_dict(
            {k: v.to(self.device, dtype or self.dtype) if v.is_floating_point() else v.to(self.device) for k, v in state.items()},
            assign=True,
            strict=True,
        )
        return block.eval()

    # ---- running ----------------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The embedding output ``[batch, seqlen, hidden]`` on the blocks' device, for ``input_ids`` ``[batch, seqlen]``."""
        capture = self._capture
        capture.inject, capture.calls = None, {}
        self._base_forward(input_ids.to(self.rest_device))
        return capture.embed.to(self.device)

    @torch.no_grad()
    def block_call(self, i: int, batch: int, seqlen: int):
        """The (args, kwargs) the model passes to block ``i`` for a batch of this shape."""
        key = (batch, seqlen)
        calls = self._calls_cache.get(key)  # one read: another thread may replace the cache meanwhile
        if calls is None:
            self.embed(torch.zeros(batch, seqlen, dtype=torch.long))
            calls = {j: _to_device(c, self.device) for j, c in self._capture.calls.items()}
            self._calls_cache = {key: calls}  # keep one shape: masks can be large
        return calls[i]

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and head applied to the last block's output."""
        return self.head(hidden)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and head (frozen), differentiable in ``hidden``: for a loss on the logits."""
        batch, seqlen = hidden.shape[:2]
        capture = self._capture
        capture.inject = hidden.to(self.rest_device, self.dtype)
        try:
            out = self.lm(input_ids=torch.zeros(batch, seqlen, dtype=torch.long, device=self.rest_device), use_cache=False)
        finally:
            capture.inject = None
        return out.logits

    def _base_forward(self, input_ids):
        # The base model (no head): the stubs capture what we need, the logits are not computed.
        return self.lm.base_model(input_ids=input_ids, use_cache=False)


def block_templates(work) -> tuple[object, list[nn.Module]]:
    """(config, the decoder blocks on the meta device) of a work directory's model, from its config alone: module
    structure, names and shapes, without reading a tensor (planning windows and estimating memory need no more)."""
    config = prepare_config(work_config(work))
    lm = meta_model(config, trusts_remote_code(work))
    return config, list(lm.get_submodule(find_arch(lm, config).layers_path))


def float_call(call, dtype: torch.dtype):
    """A block call (args, kwargs) with its floating tensors (position embeddings, additive masks) in ``dtype``."""
    return _map_tensors(call, lambda t: t.to(dtype) if t.is_floating_point() else t)


def _to_device(obj, device):
    return _map_tensors(obj, lambda t: t.to(device))


def _map_tensors(obj, fn):
    """``obj`` with ``fn`` applied to every tensor inside it (through tuples, lists and dicts)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _is_tied_head(lm, key: str) -> bool:
    return key.endswith("lm_head.weight") and getattr(lm.config, "tie_word_embeddings", False)
