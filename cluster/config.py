"""The whole run config: ``RunConfig``, YAML loading, overrides, and the launcher sections.

``RunConfig`` puts together the sections each layer defines: ``model``, ``sampling``, ``train``
and ``eval`` from ``stresnet.config``, ``dataset``, ``shards`` and ``data`` from
``pipelines.config``, and here the two that only the launcher reads: ``cluster`` (how Ray runs the
job) and ``tracking`` (MLflow). Reading a file (``load_config``: YAML, ``key.sub=value``
overrides, validation), writing it back (``dump_config``; loading that file gives an equal
object) and the arguments every command takes (``add_config_arguments``, ``config_from_args``)
live here too, because only commands read config files; the validation itself is
``stresnet.config.from_dict``.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import yaml

from pipelines.config import DataConfig, DatasetConfig, ShardsConfig
from stresnet.config import (
    ConfigError, EvalConfig, ModelConfig, SamplingConfig, TrainConfig, from_dict, num, path, to_dict,
)


@dataclass
class ClusterConfig:
    """How Ray runs the job."""

    address: Optional[str] = None  # None: start a local Ray; "auto": join the running cluster
    num_workers: int = num(2, min=1)
    use_gpu: bool = False
    cpus_per_worker: float = num(1.0, min=0.0)
    gpus_per_worker: float = num(1.0, min=0.0)
    dashboard: bool = False  # a local Ray's dashboard (costs seconds and processes at every start)
    dashboard_host: str = "127.0.0.1"

@dataclass
class TrackingConfig:
    """MLflow."""

    uri: str = path("sqlite:///mlflow.db")
    experiment: Optional[str] = None  # None: one experiment per dataset
    registered_model: Optional[str] = None  # None: stresnet-<dataset>
    alias: str = "current"  # registry alias moved to each new final model ("latest" is reserved)
    log_system_metrics: bool = True
    # Where a NEW experiment keeps its runs' artifacts (an existing one keeps its own). None:
    # sqlite stores use mlartifacts/<experiment> next to the database; servers their default.
    artifact_location: Optional[str] = path(None)

    def check(self) -> None:
        # MLflow's alias rules, checked here so that a bad alias stops the run before training,
        # not at registration after it: letters, digits, _ and -; "latest" (any case) and
        # version names such as v3 are reserved.
        if not re.fullmatch(r"[\w-]{1,255}", self.alias):
            raise ConfigError(f"alias: got {self.alias!r}, expected letters, digits, '_' or '-'")
        if self.alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", self.alias):
            raise ConfigError(
                f"alias: {self.alias!r} is reserved by MLflow's model registry; choose another "
                "(default: current)"
            )
        if self.registered_model is not None and (
            not self.registered_model.strip() or any(c in self.registered_model for c in "/:")
        ):
            raise ConfigError(
                f"registered_model: got {self.registered_model!r}, expected a name without '/' or ':'"
            )

@dataclass
class RunConfig:
    """One run: every command takes the whole file and reads the sections it needs."""

    name: str = "stresnet"
    seed: int = 0
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------------------------
# Loading, validation, overrides, dumping
# --------------------------------------------------------------------------------------------


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML run config, apply ``key.sub=value`` overrides, validate, return it.

    ``path=None`` starts from the defaults. Raises ``ConfigError`` naming the file and the key.
    """
    raw: dict = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(f"{path}: cannot read config file ({err.strerror})") from None
        try:
            raw = yaml.load(text, Loader=_UniqueKeyLoader)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if raw is None:  # a mistake (wrong file, truncated copy) more often than intended
            raise ConfigError(
                f"{path}: the config file is empty; give a run config, or leave out --config "
                "to start from the defaults"
            )
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    for item in overrides:
        apply_override(raw, item)
    try:
        return from_dict(RunConfig, raw)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None

class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (YAML keeps the last one
    without a word, so the first value would be ignored silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)

def apply_override(raw: dict, item: str) -> None:
    """Set ``key.sub=value`` in a raw config dict; the value is parsed as YAML."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    parts = key.strip().split(".")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as err:
        problem = str(err).splitlines()[0]
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem})") from None
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
        node = child
    node[parts[-1]] = parsed

def dump_config(config: RunConfig, path: str | Path | None = None) -> str:
    """Write the resolved config as YAML (to ``path`` if given) and return the text."""
    text = yaml.safe_dump(to_dict(config), sort_keys=False)
    if path is not None:
        Path(path).write_text(text)
    return text

def add_config_arguments(parser: "argparse.ArgumentParser") -> None:
    """The arguments every command takes: ``--config FILE`` and ``key.sub=value`` overrides."""
    parser.add_argument("--config", required=True, help="run config (YAML)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def config_from_args(args: "argparse.Namespace") -> RunConfig:
    return load_config(args.config, args.overrides)
