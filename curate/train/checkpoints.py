"""Training checkpoints: written whole or not at all, found again on ``--resume``.

``OUT/checkpoints/step-000040/`` holds ``model.safetensors`` (the trainable
parameters: all of them, or the LoRA adapter), ``masks.safetensors`` (SparsePO
mask network, if any), ``optimizer.pt`` and ``state.json`` (step, scheduler,
the run's fingerprint). A checkpoint is built in a temporary sibling and
renamed into place, so a kill mid-write never leaves a half checkpoint that
``--resume`` would trust.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from curate.errors import CurateError

PREFIX = "step-"


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters only (tied weights appear once, as named_parameters yields them)."""
    return {name: p.detach().contiguous().cpu() for name, p in module.named_parameters() if p.requires_grad}


def save_checkpoint(root: Path, step: int, *, policy: torch.nn.Module, masks: torch.nn.Module | None,
                    optimizer: torch.optim.Optimizer, state: dict[str, Any], keep: int = 2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{PREFIX}{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name}."))
    try:
        save_file(trainable_state(policy), str(tmp / "model.safetensors"))
        if masks is not None:
            save_file(trainable_state(masks), str(tmp / "masks.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def check_compatible(checkpoint: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's state, or a CurateError naming the first setting that differs."""
    state = json.loads((checkpoint / "state.json").read_text())
    saved = state.get("fingerprint", {})
    for key, value in fingerprint.items():
        if saved.get(key) != value:
            raise CurateError(
                f"cannot resume from {checkpoint}: {key} was {saved.get(key)!r} there and is {value!r} now; "
                "resume with the same data and settings, or train into a new --out directory"
            )
    return state


def load_checkpoint(checkpoint: Path, *, policy: torch.nn.Module, masks: torch.nn.Module | None,
                    optimizer: torch.optim.Optimizer) -> None:
    _load_into(policy, load_file(str(checkpoint / "model.safetensors")), checkpoint)
    if masks is not None:
        _load_into(masks, load_file(str(checkpoint / "masks.safetensors")), checkpoint)
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True))


def _load_into(module: torch.nn.Module, tensors: dict[str, torch.Tensor], checkpoint: Path) -> None:
    params = dict(module.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(tensors) != expected:
        raise CurateError(f"cannot resume from {checkpoint}: its weights do not match this model "
                          f"({len(set(tensors) ^ expected)} parameter names differ); use a new --out directory")
    with torch.no_grad():
        for name, value in tensors.items():
            if params[name].shape != value.shape:
                raise CurateError(f"cannot resume from {checkpoint}: {name} has shape {tuple(value.shape)} there, "
                                  f"{tuple(params[name].shape)} here; use a new --out directory")
            params[name].copy_(value)
