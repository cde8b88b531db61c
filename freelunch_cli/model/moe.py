"""Mixture-of-experts blocks: each expert's matrices as ``nn.Linear`` modules, so that everything that prunes,
measures, masks or adapts a linear layer also does it for every expert.

transformers 5 stores a block's experts fused, as 3-D parameters (``gate_up_proj [experts, 2 x intermediate,
hidden]`` and ``down_proj [experts, hidden, intermediate]``). ``split_experts`` replaces such a module by an
``ExpertLinears`` holding one linear layer per expert matrix (``mlp.experts.gate_up_proj.3``), which runs the same
computation and reads and writes the same fused state-dict keys, so shards and exported checkpoints keep the
library's layout. A layout it does not know (transposed, biased or interleaved experts, or any other parameter of
three or more dimensions) is refused with a message, never skipped.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from freelunch_cli.core.errors import FreelunchError

_FUSED = ("gate_up_proj", "down_proj")


class ExpertLinears(nn.Module):
    """The experts of one MoE block, one ``nn.Linear`` per expert matrix; the forward is the fused module's eager one.

    ``forward(hidden [tokens, hidden], top_k_index [tokens, k], top_k_weights [tokens, k]) -> [tokens, hidden]``.
    State dicts use the fused keys (``gate_up_proj``, ``down_proj``) of the module it replaces.
    """

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.num_experts = experts.num_experts
        self.act_fn = experts.act_fn
        fused = {name: getattr(experts, name) for name in _FUSED}
        device = fused["down_proj"].device
        self.gate_up_proj = nn.ModuleList()
        self.down_proj = nn.ModuleList()
        for name, modules in (("gate_up_proj", self.gate_up_proj), ("down_proj", self.down_proj)):
            weight = fused[name]
            for e in range(self.num_experts):
                lin = nn.Linear(weight.shape[2], weight.shape[1], bias=False, device=device, dtype=weight.dtype)
                if not weight.is_meta:
                    with torch.no_grad():
                        lin.weight.copy_(weight[e])
                modules.append(lin)
        self._register_state_dict_hook(_fuse)
        self._register_load_state_dict_pre_hook(_split, with_module=True)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        routed = top_k_index.T  # [k, tokens]: the reference loop's order (by rank, then token)
        for e in range(self.num_experts):
            position, token_idx = torch.where(routed == e)
            if token_idx.numel() == 0:
                continue
            gate, up = self.gate_up_proj[e](hidden_states[token_idx]).chunk(2, dim=-1)
            h = self.down_proj[e](self.act_fn(gate) * up) * top_k_weights[token_idx, position, None]
            out.index_add_(0, token_idx, h.to(out.dtype))
        return out


def _fuse(module, state, prefix, local_metadata):
    """State-dict hook: the per-expert weights stacked back into the fused 3-D tensors."""
    for name in _FUSED:
        keys = [f"{prefix}{name}.{e}.weight" for e in range(module.num_experts)]
        state[f"{prefix}{name}"] = torch.stack([state.pop(k) for k in keys])
    return state


def _split(module, state, prefix, *args):
    """Load pre-hook: fused 3-D tensors split into the per-expert weights."""
    for name in _FUSED:
        fused = state.pop(f"{prefix}{name}", None)
        if fused is not None:
            for e in range(module.num_experts):
                state[f"{prefix}{name}.{e}.weight"] = fused[e]


def _is_fused_experts(module: nn.Module) -> bool:
    """A module holding experts fused as 3-D ``gate_up_proj`` and ``down_proj`` tensors, in any layout."""
    return all(isinstance(getattr(module, n, None), torch.Tensor) and getattr(module, n).dim() == 3 for n in _FUSED)


def _layout_problem(module: nn.Module) -> str | None:
    """Why ``ExpertLinears`` cannot reproduce a fused experts module (None when it can): the tensors' shapes must be
    ``gate_up_proj [experts, 2 x intermediate, hidden]`` and ``down_proj [experts, hidden, intermediate]`` (Llama 4
    keeps them transposed without a flag saying so), and its forward must take the router's choice
    ``(hidden_states, top_k_index, top_k_weights)`` (Llama 4's takes tokens already routed and weighted)."""
    gate_up, down = (tuple(getattr(module, n).shape) for n in _FUSED)
    if gate_up[0] != down[0] or gate_up[1] != 2 * down[2] or gate_up[2] != down[1]:
        if gate_up[0] == down[0] and gate_up[2] == 2 * down[1] and gate_up[1] == down[2]:
            return (
                f"stored transposed: gate_up_proj {gate_up} is [experts, hidden, 2 x intermediate] and down_proj "
                f"{down} [experts, intermediate, hidden]"
            )
        return f"gate_up_proj {gate_up} and down_proj {down} are not [experts, 2 x intermediate, hidden] and [experts, hidden, intermediate]"
    try:
        params = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        params = []
    if len(params) < 3:
        return f"its forward takes ({', '.join(params)}), not the router's choice (hidden_states, top_k_index, top_k_weights)"
    return None


def _is_plain_experts(module: nn.Module) -> bool:
    """The layout ``ExpertLinears`` reproduces: concatenated [gate; up], not transposed, no bias, no post-expert norm,
    called with the router's choice."""
    return (
        _is_fused_experts(module)
        and _layout_problem(module) is None
        and getattr(module, "has_gate", True)
        and not getattr(module, "has_bias", False)
        and not getattr(module, "is_transposed", False)
        and getattr(module, "is_concatenated", True)
        and not getattr(module, "has_post_expert_norm", False)
        and hasattr(module, "num_experts")
        and hasattr(module, "act_fn")
    )


def split_experts(model: nn.Module) -> int:
    """Replace every fused experts module of ``model`` by an ``ExpertLinears``; return how many were replaced.

    Raises FreelunchError naming the first parameter of three or more dimensions that remains: a layout that is
    not supported, which pruning would otherwise skip.
    """
    found = [(name, m) for name, m in model.named_modules() if _is_plain_experts(m)]
    for name, module in found:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, ExpertLinears(module))
    for name, module in model.named_modules():  # a known layout's shapes, another one's meaning: say which
        problem = _is_fused_experts(module) and _layout_problem(module)
        if problem:
            raise FreelunchError(
                f"unsupported mixture-of-experts layout: the experts {name} ({type(module).__name__}) are {problem}; "
                f"freelunch supports experts stored as gate_up_proj [experts, 2 x intermediate, hidden] and down_proj "
                f"[experts, hidden, intermediate], as Mixtral, Qwen2-MoE, Qwen3-MoE and DeepSeek-V3 keep them"
            )
    left = [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.dim() >= 3]
    if left:
        name, shape = left[0]
        raise FreelunchError(
            f"unsupported mixture-of-experts layout: {name} is a {len(shape)}-D parameter {shape} freelunch cannot split "
            f"into expert matrices (supported: experts stored as gate_up_proj [experts, 2 x intermediate, hidden] and "
            f"down_proj [experts, hidden, intermediate], as Mixtral and Qwen2-MoE keep them)"
        )
    return len(found)


def matrix_in_state(state: dict[str, torch.Tensor], name: str) -> tuple[str, int | None]:
    """Where the weight of matrix ``name`` lives in a block's state dict: (``name.weight``, None) for a linear layer,
    (``mlp.experts.gate_up_proj``, 3) for an expert's slice of a fused tensor (``mlp.experts.gate_up_proj.3``)."""
    if f"{name}.weight" in state:
        return f"{name}.weight", None
    fused, _, expert = name.rpartition(".")
    if expert.isdigit() and fused in state and state[fused].dim() == 3:
        return fused, int(expert)
    raise KeyError(f"no weight of {name} in the block's tensors")


def get_matrix(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The ``[out, in]`` weight of matrix ``name`` (a view into a fused expert tensor for an expert's matrix)."""
    key, index = matrix_in_state(state, name)
    return state[key] if index is None else state[key][index]


def set_matrix(state: dict[str, torch.Tensor], name: str, weight: torch.Tensor) -> None:
    """Replace the weight of matrix ``name`` in ``state``, in the stored dtype (an expert's slice is written in place)."""
    key, index = matrix_in_state(state, name)
    if index is None:
        state[key] = weight.to(state[key].dtype)
    else:
        state[key][index] = weight.to(state[key].dtype)


def put_tensor(state: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    """Set ``key`` of a block's state dict, where ``key`` may name one expert's weight (``...gate_up_proj.3.weight``)
    inside a fused tensor."""
    if key in state or not key.endswith(".weight"):
        state[key] = value
    else:
        set_matrix(state, key.removesuffix(".weight"), value)
