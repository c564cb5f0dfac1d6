"""Tests for nfnets.train.reporting: progress lines, JSON-lines log, TensorBoard, MFU."""

import io
import json
import os

import numpy as np

from nfnets.train import reporting


def test_format_eta():
  assert reporting.format_eta(3725) == "1:02:05"
  assert reporting.format_eta(float("inf")) == "?"
  assert reporting.format_eta(None) == "?"


def test_format_progress_shows_key_fields():
  line = reporting.format_progress(
      50, 200, {"train_loss": np.float32(0.5), "train_top_1_acc": 0.75, "learning_rate": 0.1},
      images_per_sec_per_device=123.4, eta_seconds=60)
  assert line.startswith("step  50/200 (25.0%)")
  assert "loss 0.5" in line and "top1 0.75" in line and "lr 0.1" in line
  assert "123 img/s/dev" in line and "ETA 0:01:00" in line


def test_progress_bar_is_clamped():
  assert reporting.progress_bar(5, 10, width=10) == "[#####.....]"
  assert reporting.progress_bar(50, 10, width=4) == "[####]"


def test_throughput_excludes_compile_step(monkeypatch):
  clock = [100.0]
  monkeypatch.setattr(reporting.time, "monotonic", lambda: clock[0])
  t = reporting.Throughput(images_per_step=64, num_devices=8, total_steps=110)
  assert t.rates(1) == (None, None)
  t.start(1)  # After the first step; its compile time must not count.
  clock[0] = 110.0  # 10 steps in 10 s -> 1 step/s -> 64 img/s over 8 devices.
  ips, eta = t.rates(11)
  assert abs(ips - 8.0) < 1e-9
  assert abs(eta - 99.0) < 1e-9


def test_reporter_writes_jsonl_and_tensorboard(tmp_path):
  out = io.StringIO()
  rep = reporting.Reporter(str(tmp_path), total_steps=10, images_per_step=8, num_devices=2,
                           stream=out)
  rep.compile_done(1, 2.5)
  rep.log_train(2, {"loss": np.float32(1.5), "learning_rate": 0.01})
  rep.log_eval(2, {"top_1_acc": 0.9, "ema_top_1_acc": 0.8})
  rep.write_scalars(3, "train", {"loss": float("nan")})
  rep.close()
  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [r["split"] for r in records] == ["timing", "train", "eval", "train"]
  assert records[1]["step"] == 2 and records[1]["loss"] == 1.5
  assert records[1]["core_hours"] > 0  # Devices x hours since the reporter started.
  assert records[2]["ema_top_1_acc"] == 0.8
  assert records[3]["loss"] == "nan"
  text = out.getvalue()
  assert "took 2.5s" in text and "[eval @ step 2]" in text and "loss 1.5" in text
  assert "\r" not in text  # StringIO is not a TTY: no in-place bar.
  events = os.listdir(tmp_path / "tb")
  assert len(events) == 1 and events[0].startswith("events.out.tfevents")
  # Read the event file back: the scalar must be there, tagged.
  from nfnets.quiet_tensorflow import tf  # pylint: disable=g-import-not-at-top
  found = {}
  for event in tf.compat.v1.train.summary_iterator(str(tmp_path / "tb" / events[0])):
    for value in event.summary.value:
      found[(value.tag, event.step)] = (float(tf.make_ndarray(value.tensor)),
                                        value.metadata.plugin_data.plugin_name)
  assert found[("train/loss", 2)] == (1.5, "scalars")
  assert abs(found[("eval/top_1_acc", 2)][0] - 0.9) < 1e-6


def test_progress_bar_only_on_tty(tmp_path):
  class Tty(io.StringIO):
    def isatty(self):
      return True
  tty = Tty()
  rep = reporting.Reporter(str(tmp_path), total_steps=4, images_per_step=1, num_devices=1,
                           tensorboard=False, stream=tty)
  rep.tick(2)
  rep.print("hello")
  rep.close()
  assert tty.getvalue().startswith("\r[")
  assert "hello\n" in tty.getvalue()
  plain = io.StringIO()
  rep = reporting.Reporter(str(tmp_path / "p"), total_steps=4, images_per_step=1, num_devices=1,
                           tensorboard=False, stream=plain)
  rep.tick(2)
  rep.close()
  assert plain.getvalue() == ""


def test_non_writer_writes_nothing(tmp_path):
  out = io.StringIO()
  rep = reporting.Reporter(str(tmp_path / "w"), total_steps=4, images_per_step=1, num_devices=1,
                           is_writer=False, stream=out)
  rep.log_train(1, {"loss": 1.0})
  rep.close()
  assert not os.path.exists(tmp_path / "w")
  assert out.getvalue() == ""


def test_mfu_and_core_hours(monkeypatch):
  clock = [0.0]
  monkeypatch.setattr(reporting.time, "monotonic", lambda: clock[0])
  t = reporting.Throughput(images_per_step=64, num_devices=8, total_steps=100,
                           train_flops_per_image=1e9, peak_flops_per_device=1e12)
  t.start(0)
  clock[0] = 3600.0  # 100 steps of 64 images in an hour on 8 devices.
  extras = t.extras(100)
  assert abs(extras["core_hours"] - 8.0) < 1e-9
  ips = 100 * 64 / 8 / 3600
  assert abs(extras["images_per_sec_per_device"] - ips) < 1e-9
  assert abs(extras["mfu"] - ips * 1e9 / 1e12) < 1e-12
  # An unknown peak (e.g. a CPU) reports no MFU rather than a made-up one.
  assert "mfu" not in reporting.Throughput(64, 8, 100, 1e9, None).extras(0)
  assert reporting.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert reporting.peak_flops("cpu") is None
