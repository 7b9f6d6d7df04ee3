"""Training checkpoints: written whole or not at all, found again on ``--resume``.

``OUT/checkpoints/step-000040/`` holds ``model.safetensors`` (the trainable
parameters: all of them, or the LoRA adapter), ``masks.safetensors`` (SparsePO
mask network, if any), ``optimizer.pt`` and ``state.json`` (step, scheduler,
the run's fingerprint). A checkpoint is built in a temporary sibling and
renamed into place, so a kill mid-write never leaves a half checkpoint that
``--resume`` would trust; the loop writes one only after checking that its
weights and a probe forward are finite.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from curate.errors import CurateError
from curate.fsutil import remove_inside

PREFIX = "step-"


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters only (tied weights appear once, as named_parameters yields them)."""
    return {name: p.detach().contiguous().cpu() for name, p in module.named_parameters() if p.requires_grad}


def save_checkpoint(root: Path, step: int, *, policy: torch.nn.Module, masks: torch.nn.Module | None,
                    optimizer: torch.optim.Optimizer, state: dict[str, Any], keep: int = 2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".{PREFIX}*"):  # temporaries of a write that was killed
        remove_inside(stale, root)
    target = root / f"{PREFIX}{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name}."))
    try:
        save_file(trainable_state(policy), str(tmp / "model.safetensors"))
        if masks is not None:
            save_file(trainable_state(masks), str(tmp / "masks.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
        remove_inside(target, root)
        os.replace(tmp, target)
    except BaseException:
        remove_inside(tmp, root)
        raise
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        remove_inside(old, root)
    return target


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / "state.json").read_text())


def check_compatible(checkpoint: Path, fingerprint: dict[str, Any],
                     may_change: tuple[str, ...] = ()) -> tuple[dict[str, Any], dict[str, tuple[Any, Any]]]:
    """The checkpoint's state and the ``may_change`` settings that differ, as ``{key: (then, now)}``.

    Any other difference is a CurateError naming the first setting that differs.
    """
    state = read_state(checkpoint)
    saved = state.get("fingerprint", {})
    changes = {}
    for key, value in fingerprint.items():
        if saved.get(key) == value:
            continue
        if key in may_change:
            changes[key] = (saved.get(key), value)
            continue
        raise CurateError(
            f"cannot resume from {checkpoint}: {key} was {saved.get(key)!r} there and is {value!r} now; "
            "resume with the same data and settings"
            + (f" (only {', '.join('--' + k for k in may_change)} may change)" if may_change else "")
            + ", or train into a new --out directory"
        )
    return state, changes


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
