"""Tests for nfnets.train.plan (--mode=plan): estimates that track the compiled train step.

The plan estimates peak memory from grad-only probe compilations plus exact state and batch
bytes; here the estimate is held against the memory analysis of the real train step (the one
`loop.run` builds: augmentation, accumulation, AGC, optimizer, EMA) compiled for the same
setting on this machine's compiler.
"""

import jax
import jax.numpy as jnp
import pytest

from configs import common
from configs import fake_data
from configs import nfnet as nfnet_config
from nfnets.models import registry
from nfnets.train import loop
from nfnets.train import mesh as mesh_lib
from nfnets.train import optim
from nfnets.train import plan as plan_lib
from nfnets.train import state as state_lib
from nfnets.train import step as step_lib
from nfnets.train.options import ExperimentOptions

SIZE, BATCH = 16, 8


def _options(config, **plan) -> ExperimentOptions:
  config.model.kwargs = common.small_nfnet_kwargs()
  config.data.image_size = config.data.eval_image_size = SIZE
  config.train.batch_size = BATCH
  config.plan.num_devices = 1
  for k, v in plan.items():
    config.plan[k] = v
  return ExperimentOptions.from_config(config)


def _setting(result, k, remat):
  return next(s for s in result["settings"] if s["accum_steps"] == k and s["remat"] == remat)


@pytest.fixture(scope="module")
def tiny():
  options = _options(fake_data.get_config())
  return options, plan_lib.plan(options, remat_modes=("none",))


def _compiled_step_peak(options: ExperimentOptions, accum_steps: int) -> float:
  """Peak bytes of the real train step on one device: inputs + temporaries (state donated)."""
  num_classes = options.data.num_classes
  forward = registry.make_forward(options.model.name, num_classes, **options.model.kwargs)
  optimizer, schedule = optim.build_optimizer(options.optimizer, batch_size=BATCH,
                                              steps_per_epoch=1.0, total_steps=100)
  channels = options.data.fake_channels
  ts = state_lib.abstract_train_state(forward, optimizer, (SIZE, SIZE, channels))
  mesh = mesh_lib.make_mesh(jax.devices()[:1])
  replicated = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=mesh_lib.replicated(mesh)), ts)
  rows = mesh_lib.batch_sharding(mesh)
  batch = {"images": jax.ShapeDtypeStruct((BATCH, SIZE, SIZE, channels), jnp.uint8,
                                          sharding=rows),
           "labels": jax.ShapeDtypeStruct((BATCH,), jnp.int32, sharding=rows)}
  train_step = step_lib.make_train_step(
      forward, optimizer, schedule, options.train, num_classes,
      ema_decay=options.optimizer.ema_decay, augment=loop.make_augment(options),
      accum_steps=accum_steps, mesh=mesh)
  compiled = train_step.lower(replicated, batch).compile(
      compiler_options=state_lib.fast_compile_options())
  memory = compiled.memory_analysis()
  return float(memory.argument_size_in_bytes + memory.temp_size_in_bytes)


def test_the_estimate_is_within_25_percent_of_the_compiled_train_step(tiny):
  # Measured 2026-12-02 (XLA:CPU, 32 px): estimate / compiled = 1.01-1.11 for k = 1, 2, 4
  # with and without remat. The estimate errs high, as a plan should.
  options, result = tiny
  want = _compiled_step_peak(options, accum_steps=2)
  got = _setting(result, 2, "none")["peak_bytes"]
  assert 0.95 * want <= got <= 1.25 * want, (got, want)


def test_accounting_is_exact_where_it_can_be(tiny):
  options, result = tiny
  forward = registry.make_forward(options.model.name, options.data.num_classes,
                                  **options.model.kwargs)
  params, _ = jax.eval_shape(lambda: forward.init(
      jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)), is_training=True))
  count = sum(x.size for x in jax.tree.leaves(params))
  assert result["params"] == count
  assert result["params_bytes"] == 4 * count
  # SGD-Nesterov keeps one momentum buffer; the EMA keeps one copy of params (+ tiny state).
  assert result["optimizer_bytes"] >= 4 * count
  assert result["ema_bytes"] >= 4 * count
  assert result["flops_per_step"] == pytest.approx(6 * result["macs_per_image"] * BATCH)


def test_memory_falls_with_accumulation_and_the_first_fitting_setting_is_chosen(tiny):
  options, result = tiny
  peaks = [_setting(result, k, "none")["peak_bytes"] for k in (1, 2, 4, 8)]
  assert peaks == sorted(peaks, reverse=True), peaks
  # A budget between k=2 and k=4 (remat off) picks k=4, remat off: accumulation first.
  k2, k4 = (_setting(result, k, "none")["peak_bytes"] for k in (2, 4))
  chosen = plan_lib.choose(result["settings"], (k2 + k4) / 2)
  assert (chosen["accum_steps"], chosen["remat"]) == (4, "none")
  assert plan_lib.choose(result["settings"], 0.5 * k4 * 0.1) is None
  text = plan_lib.format_plan(dict(result, chosen=chosen), options)
  assert "ESTIMATES" in text
  assert "--config.train.grad_accum_steps=4 --config.model.remat=none" in text
  assert "nothing fits" in plan_lib.format_plan(dict(result, chosen=None), options)


def test_a_paper_config_plans_without_its_data_set(tmp_path, monkeypatch):
  # The F0 recipe (ImageNet, RandAugment, MixUp+CutMix) with no data on this machine: the plan
  # must not touch the data set. (Its memory probes are tested above; here they are stubbed
  # to keep this test to the data and input-rate side.)
  probed = []
  monkeypatch.setattr(plan_lib, "_activation_bytes",
                      lambda options, remat, micro, *_: probed.append(remat) or 1e6 * micro)
  config = nfnet_config.get_config("F0")
  config.data.data_dir = str(tmp_path / "no_such_dir")
  options = _options(config, images_per_sec_per_device=100.0, devices_per_host=8,
                     cores_per_host=16)
  result = loop.run(options, str(tmp_path / "workdir"), mode="plan")
  assert result["per_device_batch"] == BATCH
  # Each MixUp/CutMix example decodes two images on the host.
  assert result["input_images_per_sec_per_host"] == 800.0
  assert result["decoded_images_per_sec_per_core"] == pytest.approx(
      800.0 * options.data.inputs_per_example / 16)
  assert not (tmp_path / "workdir").exists()
  assert set(probed) == {"none", "block"}
  assert result["chosen"] == _setting(result, 1, "none")  # 80 GB holds the tiny model.


def test_a_batch_that_does_not_split_over_the_devices_is_refused():
  config = fake_data.get_config()
  options = _options(config, num_devices=3)
  with pytest.raises(ValueError, match=r"batch_size=8 does not split over plan.num_devices=3"):
    plan_lib.plan(options)
