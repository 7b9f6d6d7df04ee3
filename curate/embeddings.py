"""Sentence embeddings of reply texts, batched by length and cached per text.

``embed_texts`` reproduces sentence-transformers' pipeline for
all-MiniLM-L6-v2 (truncate to the model's ``max_seq_length``, mean-pool the
last hidden state over real tokens, L2-normalise) with plain transformers, so
the bundled offline model and any hub id work the same way.

Speed: texts are de-duplicated, sorted by token length and batched, so little
compute is spent on padding; vectors already in the cache are not recomputed.
The cache is one ``.npz`` file per (model, max_length) in ``cache_dir``,
keyed by the SHA-256 of each text.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from curate.errors import CurateError

DEFAULT_EMBEDDER = "all-minilm-l6-v2"
#: sentence-transformers' max_seq_length for all-MiniLM-L6-v2 (its sentence_bert_config.json)
DEFAULT_MAX_LENGTH = 256


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` [b, t, d] over positions where ``attention_mask`` [b, t] is 1."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    summed = (hidden * mask).sum(dim=1)
    counts = mask.sum(dim=1).clamp(min=1e-9)
    return summed / counts


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows of ``x`` scaled to unit L2 norm (as ``torch.nn.functional.normalize``)."""
    return x / x.norm(dim=-1, keepdim=True).clamp(min=eps)


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _local_dir(name: str) -> str:
    """The directory holding the model's files, where known without loading it."""
    if name.lower() in (DEFAULT_EMBEDDER, "sentence-transformers/all-minilm-l6-v2"):
        from curate.models import minilm_dir

        return str(minilm_dir())
    return name


def _model_max_length(name_or_path: str, tokenizer: Any) -> int:
    """sentence-transformers' max_seq_length if the model dir has one, else the tokenizer's limit, else 256."""
    path = Path(getattr(tokenizer, "name_or_path", "") or _local_dir(name_or_path))
    config = path / "sentence_bert_config.json"
    if config.is_file():
        return int(json.loads(config.read_text()).get("max_seq_length", DEFAULT_MAX_LENGTH))
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 100_000:
        return limit
    return DEFAULT_MAX_LENGTH


@torch.no_grad()
def encode_batched(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], *,
                   max_length: int = DEFAULT_MAX_LENGTH, batch_size: int = 64, device: str | torch.device = "cpu",
                   show_progress: bool = False) -> np.ndarray:
    """Embed ``texts`` with an encoder model: [n, d] float32, mean-pooled and L2-normalised.

    Texts are tokenised once, sorted by token length and run in batches, so
    each batch pads only to its own longest text; the output keeps the input order.
    """
    if len(texts) == 0:
        hidden_size = getattr(getattr(model, "config", None), "hidden_size", 0)
        return np.zeros((0, hidden_size), dtype=np.float32)
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length, add_special_tokens=True)
    ids = encoded["input_ids"]
    order = np.argsort([len(x) for x in ids], kind="stable")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: np.ndarray | None = None
    batches = range(0, len(order), batch_size)
    progress = _progress(batches, show_progress, "embedding")
    model.eval()
    for start in progress:
        rows = order[start : start + batch_size]
        width = max(len(ids[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            input_ids[r, : len(ids[i])] = torch.tensor(ids[i])
            attention[r, : len(ids[i])] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        hidden = model(input_ids=input_ids, attention_mask=attention).last_hidden_state
        pooled = l2_normalize(mean_pool(hidden.float(), attention)).cpu().numpy()
        if out is None:
            out = np.empty((len(texts), pooled.shape[1]), dtype=np.float32)
        out[rows] = pooled
    assert out is not None
    return out


def _progress(iterable, show: bool, description: str):
    if not show:
        return iterable
    from rich.console import Console
    from rich.progress import track

    return track(iterable, description=description, transient=True, console=Console(stderr=True))


class EmbeddingCache:
    """Vectors of texts already embedded by one model, stored as ``.npz`` (keys + matrix)."""

    def __init__(self, cache_dir: str | Path, model_name: str, max_length: int):
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name).strip("_")[-80:]
        self.path = Path(cache_dir) / f"embeddings-{slug}-L{max_length}.npz"
        self.vectors: dict[str, np.ndarray] = {}
        if self.path.exists():
            with np.load(self.path, allow_pickle=False) as data:
                self.vectors = dict(zip(data["keys"].tolist(), data["vectors"]))

    def lookup(self, keys: Sequence[str]) -> list[np.ndarray | None]:
        return [self.vectors.get(k) for k in keys]

    def add(self, keys: Sequence[str], vectors: np.ndarray) -> None:
        self.vectors.update(zip(keys, vectors))

    def save(self) -> None:
        import io

        from curate.rundir import atomic_write_bytes

        keys = list(self.vectors)
        buffer = io.BytesIO()
        np.savez(buffer, keys=np.array(keys, dtype=str), vectors=np.stack([self.vectors[k] for k in keys]))
        atomic_write_bytes(self.path, buffer.getvalue())


def embed_texts(texts: Sequence[str], *, model: str | tuple[torch.nn.Module, Any] = DEFAULT_EMBEDDER,
                device: str = "auto", batch_size: int = 64, cache_dir: str | Path | None = None,
                show_progress: bool = True, max_length: int | None = None) -> np.ndarray:
    """Embed each text with a sentence-embedding model: ``[len(texts), d]`` float32, unit-norm rows.

    ``model`` is a name understood by :func:`curate.models.load_embedder`
    (the bundled ``all-minilm-l6-v2`` by default, any hub id or local path),
    or an already loaded ``(model, tokenizer)`` pair. Identical texts are
    embedded once; with ``cache_dir`` the vectors are also kept on disk and
    reused by later calls with the same model and ``max_length``
    (default: the model's sentence-transformers ``max_seq_length`` when its
    files are local, 256 for MiniLM; 256 for a hub id). The model is loaded
    only if some text is not in the cache.
    """
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise CurateError(
            f"embed_texts needs strings, but item {bad[0]} is {type(texts[bad[0]]).__name__}: "
            "convert or drop non-text replies first"
        )
    model_name = model if isinstance(model, str) else _loaded_name(model[0])
    unique = list(dict.fromkeys(texts))
    keys = [text_key(t) for t in unique]
    if max_length is None:
        # Known without loading the model, so a fully cached call never loads it.
        max_length = _model_max_length(model_name, None if isinstance(model, str) else model[1])
    cache = EmbeddingCache(cache_dir, model_name, max_length) if cache_dir is not None else None
    found = cache.lookup(keys) if cache is not None else [None] * len(unique)
    missing = [i for i, v in enumerate(found) if v is None]
    if missing:
        encoder, tokenizer, device = _load(model, device)
        fresh = encode_batched(
            encoder, tokenizer, [unique[i] for i in missing], max_length=max_length,
            batch_size=batch_size, device=device, show_progress=show_progress,
        )
        for j, i in enumerate(missing):
            found[i] = fresh[j]
        if cache is not None:
            cache.add([keys[i] for i in missing], fresh)
            cache.save()
    if not unique:
        encoder, _, _ = _load(model, device)
        return np.zeros((0, encoder.config.hidden_size), dtype=np.float32)
    by_text = dict(zip(unique, found))
    return np.stack([by_text[t] for t in texts]).astype(np.float32, copy=False)


def _loaded_name(encoder: torch.nn.Module) -> str:
    return getattr(getattr(encoder, "config", None), "_name_or_path", "") or type(encoder).__name__


def _load(model: str | tuple[torch.nn.Module, Any], device: str):
    """(encoder, tokenizer, device) from a name (via curate.models.load_embedder) or a loaded pair."""
    if not isinstance(model, str):
        from curate.models import resolve_device

        encoder, tokenizer = model
        device = str(resolve_device(device))
        return encoder.to(device), tokenizer, device
    from curate.models import load_embedder

    encoder, tokenizer = load_embedder(model, device=device)
    return encoder, tokenizer, next(encoder.parameters()).device
