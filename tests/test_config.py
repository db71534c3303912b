"""Run recipes as users write them: YAML files and dotted overrides, read into typed sections."""
from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from dali_ba import config as data_config
from dali_ba.errors import ConfigError
from trainers.config import config_from_dict, load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("spelling, expected", [("off", "off"), ("bf16", "bf16"), ("fp16", "fp16")])
def test_amp_spellings_survive_yaml_on_the_command_line_and_in_files(tmp_path, spelling, expected):
    """YAML 1.1 reads `off` as False; the documented spellings must stay strings, unquoted."""
    assert config_from_dict({}, [f"train.amp={spelling}"]).train.amp == expected
    path = tmp_path / "run.yaml"
    path.write_text(f"train:\n  amp: {spelling}\n")
    assert load_config(path).train.amp == expected


def test_boolean_options_still_take_yes_no_on_off(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  channels_last: yes\n  compile: off\ndata:\n  trivial_augment: on\n")
    cfg = load_config(path, ["train.tensorboard=no"])
    assert (cfg.train.channels_last, cfg.train.compile, cfg.data.trivial_augment, cfg.train.tensorboard) == (
        True, False, True, False)
    assert config_from_dict({}, ["optim.weight_decay=1e-4"]).optim.weight_decay == pytest.approx(1e-4)  # YAML 1.2 float


def test_the_last_override_wins_in_every_entry_point(tmp_path):
    args = ["data.num_views=2", "data.num_views=3", "data.num_views=2"]
    assert config_from_dict({}, args).data.num_views == 2
    from dali_ba.train_launcher import build_command

    assert build_command("c.yaml", args)[-3:] == args  # passed on in order, none dropped


def test_float16_images_need_autocast():
    with pytest.raises(ConfigError, match="data.dtype=float16 needs train.amp=fp16 or bf16"):
        config_from_dict({"data": {"dtype": "float16"}}, ["train.amp=off"])
    assert config_from_dict({"data": {"dtype": "float16"}, "train": {"amp": "bf16"}}).data.dtype == "float16"


@pytest.mark.parametrize("text, message", [("data:\n  num_views: 2\n  num_views: 3\n", "duplicate key 'num_views'"),
                                           ("a: &x [1]\nb: *x\n", "aliases"),
                                           ("data: [unclosed\n", "not valid YAML")])
def test_yaml_mistakes_are_one_clear_error(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_the_data_library_reads_only_its_own_section(tmp_path):
    """dali_ba.load_config gives the data section of a full recipe; the trainer's sections are its
    own business (and still checked by trainers.config)."""
    cfg = data_config.load_config(REPO / "pipelines" / "fashion-mnist-ba4.yaml", ["data.num_views=2", "model.depth=3"])
    assert cfg.data.num_views == 2 and not hasattr(cfg, "model")
    with pytest.raises(ConfigError, match="model.depth: unknown key"):
        load_config(REPO / "pipelines" / "fashion-mnist-ba4.yaml", ["model.depth=3"])


def test_loader_options_are_written_once():
    """DataConfig's loader options have the loaders' names and defaults (from_config maps by name)."""
    from dali_ba.config import DataConfig
    from dali_ba.loader import BatchAugmentLoader, EvalLoader
    from dali_ba.options import PipelineOptions

    options = {f.name: f for f in dataclasses.fields(PipelineOptions)}
    for loader in (BatchAugmentLoader, EvalLoader):
        params = inspect.signature(loader).parameters
        assert set(options) <= set(params)
        assert all(p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.annotation != p.empty
                   for p in params.values())
        assert not any(p.kind == p.VAR_KEYWORD for p in params.values())
    data_only = {"train_root", "val_root", "train_list", "train_split", "val_split", "num_views", "global_batch_size"}
    for f in dataclasses.fields(DataConfig):
        if f.name in data_only:
            continue
        assert f.name in options, f.name
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        assert list(default) == list(options[f.name].default) if f.name in ("mean", "std") \
            else default == options[f.name].default, f.name


def test_importing_the_loaders_pulls_in_no_trainer_or_plotting_code():
    code = ("import sys\nfrom dali_ba import BatchAugmentLoader, EvalLoader\nimport dali_ba.loader\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'trainers', 'matplotlib', 'torchvision', "
            "'benchmarks'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_per_view_augmentations_as_users_type_them(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  rand_augment: [2, 9]\n  cutout: 16\n  random_erase: 0.25\n")
    cfg = load_config(path)
    assert (cfg.data.rand_augment, cfg.data.cutout, cfg.data.cutout_holes, cfg.data.random_erase) == ([2, 9], 16, 1,
                                                                                                      0.25)
    assert load_config(path, ["data.rand_augment=null"]).data.rand_augment is None
    assert load_config(path, ["data.rand_augment=[]"]).data.rand_augment == []  # off, like null
    assert load_config(path, ["data.rand_augment=[1, 5]"]).data.rand_augment == [1, 5]
    with pytest.raises(ConfigError, match="data.rand_augment") as info:
        load_config(path, ["data.rand_augment=[2, nine]"])
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="data.auto_augment: at most one of trivial_augment, rand_augment, "
                                          "auto_augment may be on; got data.rand_augment and data.auto_augment"):
        load_config(path, ["data.auto_augment=true"])
