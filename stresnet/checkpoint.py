"""The checkpoint files: the one place that writes and reads them.

A checkpoint is a folder (Ray Train names it ``checkpoint_<step>``) holding

* ``model.pt``: ``{"model": state dict, "config": the run config as plain data, "shards": {"classes":
  [...], "params": {...}}}``. The config travels with the weights, so :func:`load_model` rebuilds
  exactly the network that was trained; ``shards`` (the training shards' class names and creation
  parameters, from their manifest; absent in older files) lets ``stresnet predict`` name classes
  and compute flow like the shards without the shard folder.
  The same file is what a registered MLflow model carries as ``artifacts/model.pt``.
* ``train_state.pt`` (training only): ``{"optimizer", "epoch", "step_in_epoch", "global_step",
  "mlflow_run_id"}``, what a resumed run needs besides the weights.

Every read is ``torch.load(weights_only=True)``: loading a file never runs code from it. Errors
name the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
CHECKPOINT_GLOB = "checkpoint_*"  # checkpoint folders inside a run folder; names sort by step


class WeightsError(RuntimeError):
    """A weights or checkpoint file cannot be read or does not fit the model."""


# --- writing ---------------------------------------------------------------------------------


def save_model_file(
    path: str | Path, state: dict[str, Tensor], config: dict, shards: dict | None = None
) -> Path:
    """Write ``model.pt`` (``path``: the file) from a model state dict, the run config dict and,
    when given, the training shards' ``{"classes", "params"}``."""
    path = Path(path)
    payload = {"model": state, "config": config}
    if shards is not None:
        payload["shards"] = shards
    torch.save(payload, path)
    return path


def save_checkpoint(
    folder: str | Path, model: nn.Module, config: dict, train_state: dict[str, Any] | None = None,
    shards: dict | None = None,
) -> Path:
    """Write a checkpoint folder: ``model.pt`` and, when given, ``train_state.pt``.

    ``model`` may be DDP-wrapped; its unwrapped weights are saved.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_model_file(folder / MODEL_FILE, getattr(model, "module", model).state_dict(), config, shards)
    if train_state is not None:
        torch.save(train_state, folder / STATE_FILE)
    return folder


# --- reading ---------------------------------------------------------------------------------


def load_file(path: str | Path | None, mmap: bool = False) -> dict:
    """``torch.load(weights_only=True)`` of a dict on the CPU; :class:`WeightsError` naming the file.
    ``mmap``: map the tensors instead of reading them (to look at the rest cheaply)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise WeightsError(f"{path}: weights file not found") from None
    except Exception as err:  # pickle/zip errors: say which file, keep the cause
        raise WeightsError(f"{path}: cannot load weights ({err})") from err
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: expected a dict, got {type(data).__name__}")
    return data


def checkpoint_file(path: str | Path) -> Path:
    """The ``model.pt`` that ``path`` names: the file itself, a checkpoint folder holding it, or a
    run folder, whose newest ``checkpoint_*`` folder is taken (names sort by step)."""
    path = Path(path)
    if not path.is_dir() or (path / MODEL_FILE).is_file():
        return path / MODEL_FILE if path.is_dir() else path
    newest = sorted(path.glob(f"{CHECKPOINT_GLOB}/{MODEL_FILE}"))
    if not newest:
        raise WeightsError(f"{path}: a folder without {MODEL_FILE} or {CHECKPOINT_GLOB}/{MODEL_FILE}")
    return newest[-1]


def read_model_file(path: str | Path | None, mmap: bool = False) -> tuple[str, dict]:
    """(file name, ``{"model": state dict, "config": dict}``) of what ``path`` names (see
    :func:`checkpoint_file`); ``mmap``: see :func:`load_file`."""
    file = checkpoint_file(str(path))
    payload = load_file(file, mmap)
    if not isinstance(payload.get("model"), dict):
        raise WeightsError(f"{file}: not a model checkpoint (expected a dict with key 'model')")
    return str(file), payload


def read_checkpoint(path: str | Path | None) -> tuple[str, dict[str, Tensor]]:
    """(file name, model state dict) of a checkpoint: see :func:`checkpoint_file`."""
    source, payload = read_model_file(path)
    return source, payload["model"]


def load_train_state(folder: str | Path) -> dict:
    """The ``train_state.pt`` of a checkpoint folder."""
    return load_file(Path(folder) / STATE_FILE)

