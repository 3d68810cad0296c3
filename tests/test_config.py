"""The run config: validation messages, overrides, YAML round trip."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from cluster.config import RunConfig, dump_config, load_config
from stresnet.config import ConfigError, flatten


def write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_load_and_sections_are_typed():
    config = load_config(None)
    assert isinstance(config, RunConfig)
    assert config.model.depth == 50 and config.model.flow_length == 10
    assert config.sampling.crop_scale == (0.75, 1.25)


def test_round_trip_through_yaml_is_identical(tmp_path):
    config = load_config(None, ["model.depth=101", "sampling.crop_scale=[0.8, 1.2]",
                                "model.injection.stages=[3, 5]", "shards.fps=12.5"])
    path = tmp_path / "resolved.yaml"
    dump_config(config, path)
    assert load_config(path) == config


def test_overrides_apply_to_nested_keys_and_parse_yaml_values(tmp_path):
    path = write(tmp_path, "model:\n  depth: 152\n  temporal:\n    init: center\n")
    config = load_config(path, ["model.temporal.padding=zero", "train.lr_steps=[10, 20]",
                                "train.run_name=abc"])
    assert config.model.depth == 152
    assert config.model.temporal.init == "center"
    assert config.model.temporal.padding == "zero"
    assert config.train.lr_steps == [10, 20]
    assert config.train.run_name == "abc"


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.depth=34", "model.depth: got 34 (int), expected one of [50, 101, 152]"),
        ("model.injection.direction=both",
         "model.injection.direction: got 'both' (str), expected one of "
         "['motion_to_appearance', 'bidirectional']"),
        ("model.width=8", "model.width: got 8.0, expected a value in [0.03125 .. 4.0]"),
        ("train.lr=fast", "train.lr: got 'fast' (str), expected a number"),
        ("train.epochs=1.5", "train.epochs: got 1.5 (float), expected an integer"),
        ("sampling.flip=1", "sampling.flip: got 1 (int), expected true or false"),
        ("model.injection.stages=[1, 2]",
         "model.injection.stages[0]: got 1 (int), expected one of [2, 3, 4, 5]"),
        ("sampling.crop_scale=[1.0]", "sampling.crop_scale: got [1.0] (list), expected a list of 2 values"),
        ("train.stage=true", "train.stage: got True (bool), expected one of [0, 1, 2]"),
        ("sampling.stride_min=20", "sampling.stride_min: got 20, expected <= stride_max (15)"),
        ("dataset.kind=csv", "dataset.csv: required when dataset.kind is 'csv'"),
        ("model.init.kind=checkpoint", "model.init.checkpoint: required when init.kind is 'checkpoint'"),
        ("model.temporal.kernel=4", "model.temporal.kernel: got 4, expected an odd number"),
        # issue 13 item 1: MLflow refuses these only at registration, after the whole training
        ("tracking.alias=latest", "tracking.alias: 'latest' is reserved by MLflow's model registry"),
        ("tracking.alias=Latest", "tracking.alias: 'Latest' is reserved by MLflow's model registry"),
        ("tracking.alias=v3", "tracking.alias: 'v3' is reserved by MLflow's model registry"),
        ("tracking.alias=new model", "tracking.alias: got 'new model', expected letters, digits"),
        ("tracking.registered_model=team/st", "tracking.registered_model: got 'team/st', expected a name without"),
        # issue 13 item 6: NaN is neither below a minimum nor above a maximum
        ("train.lr=.nan", "train.lr: got nan, expected a finite number"),
        ("train.momentum=.nan", "train.momentum: got nan, expected a finite number"),
        ("train.weight_decay=.inf", "train.weight_decay: got inf, expected a finite number"),
        ("model.width=-.inf", "model.width: got -inf, expected a finite number"),
        ("train.lr=1.0e+999", "train.lr: got inf, expected a finite number"),
        ("sampling.crop_scale=[.nan, 1.0]", "sampling.crop_scale[0]: got nan, expected a finite number"),
        ("train.epochs=.inf", "train.epochs: got inf (float), expected an integer"),
    ],
)
def test_bad_values_are_rejected_with_key_path_and_allowed_values(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_unknown_key_names_the_path_and_the_allowed_keys(tmp_path):
    path = write(tmp_path, "model:\n  temporal:\n    kernal: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert text.startswith(str(path))
    assert "model.temporal.kernal: unknown key" in text
    assert "'kernel'" in text and "'padding'" in text


def test_unknown_top_level_section(tmp_path):
    with pytest.raises(ConfigError, match=r"modle: unknown key; allowed keys here: \[.*'model'"):
        load_config(write(tmp_path, "modle: {}\n"))


def test_malformed_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(None, ["model.depth"])
    with pytest.raises(ConfigError, match="model: expected a mapping, got 5"):
        load_config(None, ["model=5"])


@pytest.mark.parametrize("text, overrides, message", [
    # issue 13 item 10: an override that is not YAML gave a traceback
    ("", ["model.depth=[50"], "override 'model.depth=[50': the value is not valid YAML"),
    # issue 13 item 12
    ("train: {lr: 0.1}\ntrain: {epochs: 3}\n", [], "not valid YAML: key 'train' is given twice"),
    ("model: {depth: 50, depth: 101}\n", [], "not valid YAML: key 'depth' is given twice"),
    ("\n# nothing but a comment\n", [], "the config file is empty"),
    ("", ["train.run_name=../elsewhere"], "train.run_name: got '../elsewhere', expected a folder name"),
    ("", ["train.run_name=.."], "train.run_name: got '..', expected a folder name"),
])
def test_mistakes_in_files_and_overrides_are_named(tmp_path, text, overrides, message):
    file = write(tmp_path, text or "seed: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(file, overrides)
    assert message in str(err.value)


def test_flatten_gives_dotted_keys_for_every_leaf():
    flat = flatten(load_config(None))
    assert flat["model.injection.variant"] == "code"
    assert flat["sampling.crop_scale"] == [0.75, 1.25]
    assert not any(isinstance(v, dict) for v in flat.values())


@pytest.mark.parametrize(
    "old,new",
    [
        ("train.batch_size", "train.global_batch_size"),
        ("data.batch_size", "data.batch_size_per_worker"),
        ("eval.batch_size", "eval.batch_size_per_worker"),
        ("sampling.frames", "sampling.train_positions"),
        ("dataset.synthetic.frames", "dataset.synthetic.video_frames"),
        ("shards.workers", "shards.processes"),
        ("model.injection.kind", "model.injection.variant"),
    ],
)
def test_an_old_key_fails_naming_the_new_one(tmp_path, old, new):
    *sections, key = old.split(".")
    text = "".join(f"{'  ' * i}{s}:\n" for i, s in enumerate(sections)) + f"{'  ' * len(sections)}{key}: 1\n"
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{old}: renamed to {new}" in str(err.value)
    assert str(err.value).startswith(str(path))


def test_every_path_field_is_made_absolute_and_nothing_else(tmp_path, monkeypatch):
    import dataclasses

    from stresnet.config import absolute_paths

    monkeypatch.chdir(tmp_path)
    # Every field declared as a path gets a relative value; every other string field is left.
    relative = load_config(None, ["model.init.checkpoint=ckpt", "model.init.appearance_checkpoint=a",
                                  "model.init.motion_checkpoint=models:/m@current",
                                  "model.init.torchvision_weights=imagenet",
                                  "dataset.csv=list.csv", "dataset.splits_dir=splits",
                                  "tracking.artifact_location=art", "train.run_name=name"])
    resolved = absolute_paths(relative)

    def leaves(config, prefix=""):
        for f in dataclasses.fields(config):
            value = getattr(config, f.name)
            if dataclasses.is_dataclass(value):
                yield from leaves(value, f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}", f, value

    before = {key: value for key, _, value in leaves(relative)}
    changed = {key for key, _, value in leaves(resolved) if value != before[key]}
    marked = {key for key, f, _ in leaves(relative) if f.metadata.get("path")}
    kept = {"model.init.motion_checkpoint", "model.init.torchvision_weights"}  # URI, keep-word
    assert changed == marked - kept
    assert resolved.dataset.csv == str(tmp_path / "list.csv")
    assert resolved.tracking.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert resolved.train.run_name == "name"


REPO = Path(__file__).resolve().parents[1]
PAPER_CONFIGS = sorted((REPO / "configs").glob("[uh][cm][fd]*/*.yaml"))
TRAIN_VIDEOS = {"ucf101": 9537, "hmdb51": 3570}  # split 1 (spec section 8)


def test_paper_configs_have_no_dropout_in_the_st_stages():
    """The code removes every dropout layer in the ST-ResNet stages (dropOutRatio = 0); 0.8 is the
    motion base stream's only."""
    from stresnet.model import STResNet

    stages = [p for p in PAPER_CONFIGS if p.stem.startswith("stresnet_stage")]
    assert len(stages) == 4
    for path in stages:
        cfg = load_config(path, ["model.width=0.0625"])
        assert cfg.model.dropout_appearance == cfg.model.dropout_motion == 0.0, path
        model = STResNet(cfg.model)
        active = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
        assert active == [], (path, active)
        assert cfg.train.loss == "per_step" and cfg.sampling.test_crops == "full_frame", path
        assert cfg.eval.score_average == "logits", path
    for dataset in TRAIN_VIDEOS:
        assert load_config(REPO / f"configs/{dataset}/motion_base.yaml").model.dropout_motion == 0.8


def documented_schedules() -> dict[str, dict]:
    """The schedule table of docs/training.md, by config path."""
    rows = {}
    for line in (REPO / "docs" / "training.md").read_text().splitlines():
        if not line.startswith("| `configs/"):
            continue
        cells = [c.strip().strip("`") for c in line.strip("|").split("|")]
        numbers = lambda text: [int(x.replace(",", "")) for x in re.findall(r"[\d,]+", text)]
        rows[cells[0]] = {"videos": numbers(cells[1])[0], "batch": numbers(cells[2])[0],
                          "steps_per_pass": numbers(cells[3])[0], "passes": numbers(cells[4])[0],
                          "steps": numbers(cells[6])[0], "drops": numbers(cells[7])}
    return rows


def test_schedules_give_the_step_counts_in_docs():
    from stresnet.train_step import learning_rate, lr_boundaries, steps_per_pass

    documented = documented_schedules()
    train_configs = [p for p in PAPER_CONFIGS if p.stem != "test"]
    assert sorted(documented) == sorted(str(p.relative_to(REPO)) for p in train_configs)
    for path in train_configs:
        cfg = load_config(path)
        videos = TRAIN_VIDEOS[cfg.dataset.kind]
        per_pass = steps_per_pass(videos, cfg.train.global_batch_size,
                                  cfg.data.batch_size_per_worker, cfg.cluster.num_workers)
        row = documented[str(path.relative_to(REPO))]
        assert row["videos"] == videos and row["batch"] == cfg.train.global_batch_size, path
        assert row["steps_per_pass"] == per_pass, path
        assert row["passes"] == cfg.train.epochs, path
        assert row["steps"] == cfg.train.epochs * per_pass, path
        assert row["drops"] == lr_boundaries(cfg.train, per_pass), path
        # the last rate is lr / decay^(number of drops) and is reached before the end
        last = learning_rate(cfg.train, row["steps"] - 1, per_pass)
        assert last == pytest.approx(cfg.train.lr / cfg.train.lr_decay ** len(row["drops"]))
