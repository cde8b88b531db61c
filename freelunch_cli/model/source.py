"""Where a model comes from (a local folder, a Hub id, a GGUF file) and how it becomes block shards.

``import_model`` writes the work directory's dense model: ``config.json``, tokenizer files,
``rest.safetensors`` (embeddings, final norm, head) and one ``block_NNN.safetensors`` per decoder
block, with keys relative to the block. Safetensors checkpoints are streamed one block at a time;
GGUF files (which must be dequantized) and ``.bin`` checkpoints are loaded whole by ``transformers``.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from freelunch_cli.core.errors import FreelunchError
from freelunch_cli.model.arch import find_arch
from freelunch_cli.model.build import meta_model
from freelunch_cli.workdir.files import save_pretrained_atomic, save_tensors_atomic, write_bytes_atomic

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ModelSpec:
    """A resolved ``--model``: a local folder, optionally with a GGUF file inside it, and whether its own code may run."""

    spec: str
    folder: Path
    gguf_file: str | None = None
    hub_id: str | None = None
    trust_remote_code: bool = False

    def signature(self) -> dict:
        """What the manifest records of the model (``trust_remote_code`` only when given, so older runs still match)."""
        return {
            "model": self.hub_id or str(self.folder.resolve()),
            "gguf_file": self.gguf_file,
            "trust_remote_code": self.trust_remote_code or None,
        }

    def hf_kwargs(self) -> dict:
        """Keyword arguments of ``from_pretrained``: the GGUF file, and never an interactive prompt for custom code."""
        return {"trust_remote_code": self.trust_remote_code, **({"gguf_file": self.gguf_file} if self.gguf_file else {})}

    def model_kwargs(self) -> dict:
        """``hf_kwargs`` for loading the model itself: a compressed-tensors checkpoint (quantized weights packed in int32)
        is unpacked to float weights on load, since blocks are run and evaluated as plain modules."""
        kwargs = self.hf_kwargs()
        try:
            quant = json.loads((self.folder / "config.json").read_text()).get("quantization_config") or {}
        except (OSError, ValueError):
            quant = {}
        if quant.get("quant_method") == "compressed-tensors":
            import warnings

            index = _safetensors_index(self.folder) or {}
            config = AutoConfig.from_pretrained(self.folder, **self.hf_kwargs())
            del config.quantization_config  # the plain model's modules, as the checkpoint names them
            modules = dict(meta_model(config, self.trust_remote_code, split=False).named_modules())
            check_compressed_folder(self.folder, quant, modules, set(index))  # what transformers and vLLM would load wrong

            from transformers import CompressedTensorsConfig

            kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
            # transformers warns that the folder's own config wins except for the loading options: what is wanted here
            warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        return kwargs

    def code_files(self) -> list[Path]:
        """The model's own Python files (``auto_map`` in its config names classes in them)."""
        return sorted(self.folder.glob("*.py")) if custom_code(self.folder) else []


def custom_code(folder: Path) -> dict:
    """The ``auto_map`` of a model folder's config: the classes of its own code (empty when it has none)."""
    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("auto_map") or {}
    except (OSError, ValueError):
        return {}


def _check_gguf(path: Path) -> None:
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise FreelunchError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")


def resolve_model(model: str, gguf_file: str | None = None, trust_remote_code: bool = False) -> ModelSpec:
    """Turn ``--model``/``--gguf-file`` into a local folder, downloading from the Hub if needed.

    Raises FreelunchError for a missing model, a folder that is not a model, or a model with its own code (``auto_map``)
    without ``trust_remote_code``.
    """
    spec = _resolve(model, gguf_file)
    spec = ModelSpec(spec.spec, spec.folder, spec.gguf_file, spec.hub_id, trust_remote_code)
    auto_map = custom_code(spec.folder)
    if auto_map and not trust_remote_code:
        classes = ", ".join(sorted(set(auto_map.values())))
        raise FreelunchError(f"{model} runs its own code ({classes}); pass --trust-remote-code if you trust it")
    return spec


def _resolve(model: str, gguf_file: str | None) -> ModelSpec:
    p = Path(model).expanduser()
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise FreelunchError(
                f"{p} is a file but not a .gguf file; pass a Hugging Face model folder, a Hub id or a .gguf file"
            )
        _check_gguf(p)
        return ModelSpec(model, p.parent, p.name)
    if p.is_dir():
        if gguf_file:
            g = p / gguf_file
            if not g.is_file():
                raise FreelunchError(f"no GGUF file {gguf_file!r} in {p}")
            _check_gguf(g)
            return ModelSpec(model, p, gguf_file)
        if not (p / "config.json").is_file():
            ggufs = sorted(x.name for x in p.glob("*.gguf"))
            hint = f"; it holds {ggufs[0]}: pass --gguf-file {ggufs[0]}" if ggufs else ""
            raise FreelunchError(f"{p} is not a Hugging Face model folder (no config.json){hint}")
        return ModelSpec(model, p)
    if model.startswith((".", "/", "~")) or not _HUB_ID.match(model):
        raise FreelunchError(f"model not found: {model} (no such file or folder)")
    return _from_hub(model, gguf_file)


def _from_hub(repo_id: str, gguf_file: str | None) -> ModelSpec:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]
    patterns += [gguf_file] if gguf_file else ["*.safetensors"]
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated repo: all end the same way for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FreelunchError(
            f"model not found: {repo_id} is not a local path, and the Hugging Face Hub could not provide it ({first})"
        ) from None
    return ModelSpec(repo_id, folder, gguf_file, hub_id=repo_id)


def load_config(spec: ModelSpec):
    try:
        config = AutoConfig.from_pretrained(spec.folder, **spec.hf_kwargs())
    except Exception as e:
        raise FreelunchError(f"cannot read the model config in {spec.folder}: {str(e).splitlines()[0]}") from None
    if getattr(config, "quantization_config", None) is not None and spec.gguf_file:
        # GGUF weights are dequantized on load; the working model is plain floating point.
        del config.quantization_config
    return config


def load_tokenizer(spec: ModelSpec):
    try:
        return AutoTokenizer.from_pretrained(spec.folder, **spec.hf_kwargs())
    except Exception as e:
        raise FreelunchError(f"cannot load the tokenizer of {spec.spec}: {str(e).splitlines()[0]}") from None


def _safetensors_index(folder: Path) -> dict[str, Path] | None:
    """Checkpoint key -> file, or None when the folder has no safetensors weights."""
    idx = folder / "model.safetensors.index.json"
    if idx.is_file():
        wm = json.loads(idx.read_text())["weight_map"]
        return {k: folder / v for k, v in wm.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = f
    return out


def _key_mapping(expected: set[str], found: set[str], base_prefix: str) -> dict[str, str] | None:
    """Map model keys to checkpoint keys when they differ at most by the base-model prefix."""
    p = base_prefix + "."
    for f in (lambda k: k, lambda k: k[len(p) :] if k.startswith(p) else None, lambda k: p + k):
        mapping = {k: f(k) for k in expected}
        if all(v in found for v in mapping.values() if v is not None) and None not in mapping.values():
            return mapping
    return None


class Checkpoint:
    """A model checkpoint read part by part: ``rest()`` (embeddings, final norm, head) and ``block(i)``, keys relative to
    the part. A safetensors checkpoint is streamed, one block's tensors at a time (``streamable``); GGUF and ``.bin``
    checkpoints are loaded whole by ``transformers`` on first use."""

    def __init__(self, spec: ModelSpec, config, log=print):
        self.spec, self.log = spec, log
        lm = meta_model(config, spec.trust_remote_code)
        self.arch = find_arch(lm, config)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        expected = {k for k in lm.state_dict() if not (self.tied and k.endswith("lm_head.weight"))}
        self.index = None if spec.gguf_file else _safetensors_index(spec.folder)
        self.mapping = _key_mapping(expected, set(self.index), lm.base_model_prefix) if self.index else None
        self._whole: dict | None = None

    @property
    def streamable(self) -> bool:
        return self.mapping is not None

    def rest(self) -> dict[str, torch.Tensor]:
        layer_pre = self.arch.layers_path + "."
        if self.streamable:
            return self._read([k for k in self.mapping if not k.startswith(layer_pre)], "")
        return {
            k: v
            for k, v in self._load_whole().items()
            if not k.startswith(layer_pre) and not (self.tied and k.endswith("lm_head.weight"))
        }

    def block(self, i: int) -> dict[str, torch.Tensor]:
        pre = self.arch.block_prefix(i)
        if self.streamable:
            return self._read([k for k in self.mapping if k.startswith(pre)], pre)
        return {k[len(pre) :]: v for k, v in self._load_whole().items() if k.startswith(pre)}

    def _read(self, keys: list[str], strip: str) -> dict[str, torch.Tensor]:
        by_file = defaultdict(list)
        for k in keys:
            by_file[self.index[self.mapping[k]]].append(k)
        out = {}
        for f, ks in by_file.items():
            with safe_open(str(f), framework="pt") as h:
                for k in ks:
                    out[k[len(strip) :]] = h.get_tensor(self.mapping[k])
        return out

    def _load_whole(self) -> dict[str, torch.Tensor]:
        if self._whole is None:
            self.log(f"loading {self.spec.spec} whole (GGUF or non-safetensors checkpoint; it cannot be streamed)")
            try:
                full, info = AutoModelForCausalLM.from_pretrained(
                    self.spec.folder, dtype="auto", output_loading_info=True, **self.spec.model_kwargs()
                )
            except Exception as e:
                raise FreelunchError(f"cannot load the model {self.spec.spec}: {str(e).splitlines()[0]}") from None
            params = {k for k, _ in full.named_parameters()}  # a tied head is one parameter, the embeddings
            _refuse_missing(self.spec, sorted(k for k in info.get("missing_keys", ()) if k in params), self.tied)
            self._whole = full.state_dict()
        return self._whole


def _refuse_missing(spec: ModelSpec, missing: list[str], tied: bool) -> None:
    """FreelunchError naming the model weights ``missing`` from the checkpoint (nothing for none): the model would
    otherwise run with random values in their place."""
    if not missing:
        return
    head = " (the config does not tie the head to the embeddings: tie_word_embeddings is false)"
    more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
    raise FreelunchError(
        f"the checkpoint of {spec.spec} has no {', '.join(missing[:3])}{more}, which the model needs"
        + (head if not tied and any(k.endswith("lm_head.weight") for k in missing) else "")
        + "; every weight must come from the checkpoint"
    )


def iter_model_parts(spec: ModelSpec, config, log=print):
    """Yield ("rest", tensors) then (i, tensors) per block, keys relative to the part (``Checkpoint``)."""
    checkpoint = Checkpoint(spec, config, log)
    yield "rest", checkpoint.rest()
    for i in range(checkpoint.arch.num_blocks):
        yield i, checkpoint.block(i)


def import_model(spec: ModelSpec, work, dtype: torch.dtype | None, tokenizer=None, log=print, config=None) -> dict:
    """Write the dense model of ``spec`` into ``work`` as block shards (``dtype``: cast floating tensors, None keeps the
    checkpoint's), with its tokenizer, config and own code (``--trust-remote-code``); files already recorded are kept.
    Every file lands atomically and is recorded. Returns the block count, storage dtype and model type."""
    folder = work.model_dir("dense")
    files = work.manifest()["files"]

    def part_path(part) -> Path:
        return work.own_rest_path("dense") if part == "rest" else work.block_path("dense", part)

    def written(path: Path) -> bool:
        return work.rel(path) in files and path.exists()

    if written(folder / "config.json"):
        config = work_config(work)
        if all(written(part_path(p)) for p in ["rest", *range(config.num_hidden_layers)]):
            return {
                "num_blocks": config.num_hidden_layers,
                "storage_dtype": str(config.dtype).removeprefix("torch."),
                "model_type": config.model_type,
            }
    config = config or load_config(spec)  # a GGUF file is parsed anew by every load: reuse what the caller read
    for code in spec.code_files():
        if not written(folder / code.name):
            work.record_file(folder / code.name, write_bytes_atomic(folder / code.name, code.read_bytes()))
    if not any(written(folder / name) for name in ("tokenizer_config.json", "tokenizer.json")):
        for path, info in save_pretrained_atomic(tokenizer or load_tokenizer(spec), folder).items():
            work.record_file(path, info)
    storage = None
    for part, tensors in iter_model_parts(spec, config, log=log):
        if dtype is not None:
            tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        if storage is None:
            storage = next((v.dtype for v in tensors.values() if v.is_floating_point()), torch.float32)
        _check_finite(tensors, part)
        if not written(part_path(part)):
            work.record_file(part_path(part), save_tensors_atomic(part_path(part), tensors))
    config.dtype = str(storage).removeprefix("torch.")
    if getattr(config, "quantization_config", None) is not None:
        # a compressed-tensors source was unpacked to float weights: the work directory's config, which every export
        # writes, must not claim the source's quantization
        del config.quantization_config
    for path, info in save_pretrained_atomic(config, folder).items():  # last: the import is complete once it is recorded
        work.record_file(path, info)
    return {"num_blocks": config.num_hidden_layers, "storage_dtype": config.dtype, "model_type": config.model_type}


def _check_finite(tensors: dict[str, torch.Tensor], part) -> None:
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        where = "the embeddings, final norm or head" if part == "rest" else f"block {part}"
        raise FreelunchError(
            f"the model's weights hold NaN or inf values in {where} ({', '.join(bad[:3])}): the checkpoint is "
            f"damaged, or --storage-dtype is too narrow for it (use float32 or bfloat16)"
        )


def trusts_remote_code(work) -> bool:
    """Whether calibrate was told to run the model's own code (later stages follow it)."""
    st = work.stage("calibrate")
    return bool(st is not None and st.signature.get("trust_remote_code"))


def work_config(work):
    """The work directory's model config."""
    return AutoConfig.from_pretrained(work.model_dir("dense"), trust_remote_code=trusts_remote_code(work))


def work_tokenizer(work):
    """The work directory's tokenizer."""
    return AutoTokenizer.from_pretrained(work.model_dir("dense"), trust_remote_code=trusts_remote_code(work))


def check_compressed_folder(folder, quant: dict, modules: dict[str, torch.nn.Module], keys: set[str]) -> None:
    """Refuse a compressed-tensors folder that transformers and vLLM would load wrong: every module its
    ``quant`` (the ``quantization_config`` of config.json) targets and does not ignore must be stored packed
    (``name.weight_packed``, with the zero point an asymmetric scheme needs, ``name.weight_zero_point``), and every
    other linear layer as a plain ``name.weight``; those loaders fill a weight the checkpoint lacks with random
    values (NaN in practice). ``modules``: the model's modules by checkpoint name (a meta model's will do);
    ``keys``: the checkpoint's tensor names. Raises FreelunchError naming the first module that does not match.
    """
    from compressed_tensors.utils.match import is_match

    if quant.get("format") not in (None, "pack-quantized") or not quant.get("config_groups"):
        return
    ignore = quant.get("ignore") or []
    said = f"its quantization_config (ignore {ignore})"
    for name, module in modules.items():
        if not isinstance(module, torch.nn.Linear):
            continue
        for group in quant["config_groups"].values():
            if is_match(name, module, group.get("targets") or [], ignore):
                if f"{name}.weight_packed" not in keys:
                    raise FreelunchError(
                        f"{folder}: {name} is quantized by {said} but stored as "
                        f"{'a float weight' if f'{name}.weight' in keys else 'nothing'}; transformers and vLLM would "
                        f"load it with missing weights (the quantization_config must ignore every unquantized layer)"
                    )
                weights = group.get("weights") or {}
                if not weights.get("symmetric", True) and f"{name}.weight_zero_point" not in keys:
                    raise FreelunchError(f"{folder}: {name} is quantized asymmetrically but has no weight_zero_point")
                break
        else:
            if f"{name}.weight" not in keys and f"{name}.weight_packed" in keys:
                raise FreelunchError(
                    f"{folder}: {name} is stored packed but {said} does not quantize it; transformers and vLLM would "
                    f"load it with a missing weight"
                )
