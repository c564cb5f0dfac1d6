"""Tests for nfnets.train.options: one place for every default, typed, unknown keys refused."""

import dataclasses
import json

import ml_collections
import pytest

from nfnets.data.options import DataOptions
from nfnets.train import options as options_lib
from nfnets.train.options import ExperimentOptions, TrainOptions

REPO_CONFIGS = ("demo", "fake_data", "finetune_folder", "nf_resnet50_agc", "nfnet:F0",
                "nfnet:F3", "nfnet:F7", "resnet50_bn")


def test_config_dict_round_trip_and_json_round_trip():
  options = ExperimentOptions()
  config = options_lib.to_config_dict(options)
  assert ExperimentOptions.from_config(config) == options
  assert ExperimentOptions.from_json(options.to_json()) == options
  # Lists from JSON come back as the tuples the fields declare.
  back = ExperimentOptions.from_json(options.to_json())
  assert isinstance(back.optimizer.agc.exclude, tuple)


def test_every_field_has_a_config_key_with_its_default():
  config = options_lib.to_config_dict()

  def walk(opts, section):
    for field in dataclasses.fields(opts):
      value = getattr(opts, field.name)
      assert field.name in section, field.name
      if dataclasses.is_dataclass(value):
        walk(value, section[field.name])
      elif field.name != "kwargs":
        assert section[field.name] == value, field.name
  walk(ExperimentOptions(), config)


def test_unknown_and_mistyped_keys_are_refused_by_name():
  config = options_lib.to_config_dict()
  config.train.batchsize = 8  # A typo in a config file (not locked while it is written).
  with pytest.raises(ValueError, match=r"Unknown config key\(s\) \['config.train.batchsize'\]"):
    ExperimentOptions.from_config(config)
  with pytest.raises(ValueError, match="config.data must be a section"):
    ExperimentOptions.from_config({"data": 3})
  # Range checks sit on the dataclasses, so they apply however the options were made.
  with pytest.raises(ValueError, match="train.label_smoothing"):
    TrainOptions(label_smoothing=1.0)
  with pytest.raises(ValueError, match="data.mix_mode"):
    DataOptions(mix_mode="lazy")
  with pytest.raises(ValueError, match="model.remat"):
    options_lib.ModelOptions(remat="all")


def test_optional_fields_take_typed_overrides():
  config = options_lib.to_config_dict()
  config.lock()
  config.data.data_dir = "/data/tfds"  # None by default: a typed FieldReference.
  config.data.num_classes = None
  options = ExperimentOptions.from_config(config)
  assert options.data.data_dir == "/data/tfds" and options.data.num_classes is None
  with pytest.raises(TypeError):
    config.data.data_dir = 3


def test_old_config_json_takes_new_defaults():
  # A workdir written before a key existed (here: train.grad_accum_steps) still loads.
  saved = json.loads(ExperimentOptions().to_json())
  del saved["train"]["grad_accum_steps"], saved["plan"]
  options = ExperimentOptions.from_json(json.dumps(saved))
  assert options.train.grad_accum_steps == 1


@pytest.mark.parametrize("name", REPO_CONFIGS)
def test_every_config_file_reads_into_options(name):
  name, _, arg = name.partition(":")
  module = __import__(f"configs.{name}", fromlist=["get_config"])
  config = module.get_config(arg) if arg else module.get_config()
  config.lock()
  options = ExperimentOptions.from_config(config)
  assert options.train.batch_size > 0
  assert isinstance(config, ml_collections.ConfigDict)
