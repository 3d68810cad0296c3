"""Before any worker starts: everything that would otherwise fail inside a worker minutes later.

:func:`preflight` checks the config, the shards, the init weights, the batch arithmetic and the
tracking URI; :func:`resolve_run_name` picks the run's name; :func:`fetch_registered_init` turns
``models:/...`` init weights into files on shared storage. Each problem is a
:class:`PreflightError` whose message says what to fix.
"""

from __future__ import annotations

import secrets
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from cluster.config import RunConfig
from stresnet.config import ConfigError, from_dict, to_dict
from stresnet.train_step import accumulation_steps


class PreflightError(RuntimeError):
    """The run cannot start; the message says what to fix."""


def preflight(cfg: RunConfig) -> None:
    """Check ``cfg`` (paths already absolute) against the files and services it names."""
    from cluster.tracking import TrackingError, check_tracking_uri, is_model_uri
    from pipelines.shard_format import read_manifest

    # Configs built in code skip load_config's validation: validate them the same way.
    try:
        from_dict(RunConfig, to_dict(cfg))
    except ConfigError as err:
        raise PreflightError(f"config: {err}") from None

    try:
        manifest = read_manifest(cfg.data.shards)
    except (FileNotFoundError, ValueError) as err:
        raise PreflightError(f"data.shards: {err}") from None
    for key in ("train_split", "val_split"):
        split = getattr(cfg.data, key)
        samples = manifest.get("splits", {}).get(split, {}).get("samples", 0)
        if samples == 0:
            raise PreflightError(
                f"data.{key}: the shards in {cfg.data.shards} have no {split!r} videos "
                f"(splits: {sorted(manifest.get('splits', {}))}); fix data.{key} or re-make the shards"
            )
    # The skip policy before any worker starts: missing shards, truncated ones (index files
    # make this cheap; shards without one are scanned).
    from pipelines.loaders.shard_reader import DamagedShardsError, ShardIndex

    indexed = [cfg.data.val_split]  # evaluation reads by random access in either mode
    if cfg.data.access == "random":
        indexed.insert(0, cfg.data.train_split)
    else:  # streamed: the first shard must open and start like a tar
        from pipelines.loaders.stream import ShardStreamError, probe

        try:
            probe(cfg, cfg.data.train_split)
        except (ShardStreamError, ValueError) as err:
            raise PreflightError(f"data.stream_url: {err}") from None
    for split in dict.fromkeys(indexed):
        try:
            ShardIndex(cfg.data.shards, split, cfg.data.max_damaged_fraction)
        except DamagedShardsError as err:
            raise PreflightError(f"data.shards: {err}") from None

    classes = len(manifest["classes"])
    if classes != cfg.model.num_classes:
        raise PreflightError(
            f"model.num_classes: got {cfg.model.num_classes}, but the shards in {cfg.data.shards} "
            f"have {classes} classes; set model.num_classes={classes}"
        )

    for key, path in cfg.model.init.files().items():
        registered = key != "torchvision_weights" and is_model_uri(path)  # fetched after preflight
        if path != "imagenet" and not registered and not Path(path).exists():
            raise PreflightError(f"model.init.{key}: {path} does not exist")

    # Build the network without memory (meta device): a model config that only the builder can
    # reject (a temporal unit past the end of a stage, ...) fails here, not in every worker.
    import torch

    from stresnet.config import InitConfig
    from stresnet.model import build_model

    try:
        with torch.device("meta"):
            build_model(replace(cfg.model, init=InitConfig()))
    except (ValueError, ConfigError) as err:
        raise PreflightError(str(err) if str(err).startswith("model.") else f"model: {err}") from None
    # Init weights that cannot be read (random bytes, truncated copy) fail here too.
    from stresnet.checkpoint import WeightsError, read_model_file

    for key, path in cfg.model.init.files().items():
        if key == "torchvision_weights" or path == "imagenet" or is_model_uri(path):
            continue
        try:
            read_model_file(path)
        except WeightsError as err:
            raise PreflightError(f"model.init.{key}: {err}") from None

    try:
        accumulation_steps(cfg.train.global_batch_size, cfg.data.batch_size_per_worker,
                           cfg.cluster.num_workers)
    except ConfigError as err:
        raise PreflightError(str(err)) from None

    try:
        check_tracking_uri(cfg.tracking.uri)
    except TrackingError as err:
        raise PreflightError(str(err)) from None


def resolve_run_name(cfg: RunConfig) -> str:
    """A fresh unique name, or the configured one; an existing run is only reused on resume."""
    storage = Path(cfg.train.storage_path)
    if cfg.train.run_name is None:
        if cfg.train.resume:
            raise PreflightError("train.resume: true needs train.run_name: the run to resume")
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        return f"{cfg.name}-{stamp}-{secrets.token_hex(2)}"
    name = cfg.train.run_name
    if (storage / name).exists() and not cfg.train.resume:
        raise PreflightError(
            f"train.run_name: a run named {name!r} already exists in {storage}; set "
            f"train.resume=true to continue it, or choose another train.run_name (or none)"
        )
    return name


def fetch_registered_init(cfg: RunConfig, run_dir: Path) -> tuple[RunConfig, dict[str, str]]:
    """Replace each ``models:/...`` in ``model.init`` by the registered model's weights, fetched
    into ``{run_dir}/init/<key>.pt`` (shared storage: every worker reads it; ``stresnet/`` never
    sees MLflow). A resumed run reuses the file it started from, wherever the alias points now.

    Returns the config and tags recording which version each URI resolved to.
    """
    from cluster.tracking import TrackingError, fetch_registered_weights, is_model_uri
    from cluster.worker import progress

    init, tags = cfg.model.init, {}
    for key, uri in init.files().items():
        if key == "torchvision_weights" or not is_model_uri(uri):
            continue
        file = run_dir / "init" / f"{key}.pt"
        if not file.is_file():
            try:
                resolved = fetch_registered_weights(uri, cfg.tracking.uri, file)
            except TrackingError as err:
                raise PreflightError(f"model.init.{key}: {err}") from None
            tags[f"model.init.{key}"] = f"{uri} = {resolved}"
            progress(f"model.init.{key}: {uri} ({resolved}) -> {file}")
        init = replace(init, **{key: str(file)})
    return replace(cfg, model=replace(cfg.model, init=init)), tags
