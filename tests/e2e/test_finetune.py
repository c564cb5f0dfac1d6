"""Fine-tune on your images, as the README says: the demo's grey MNIST model on colour photos.

Three commands, as a user types them: train the demo (briefly), fine-tune its workdir on a
folder of real-photograph crops (3 classes, RGB) with configs/finetune_folder.py, and predict
with the fine-tuned workdir. The architecture comes from the demo's workdir, the classifier is
re-initialised for 3 classes and the grey input convolution adapted to colour.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.e2e import e2e_helpers as rh  # pylint: disable=g-import-not-at-top

pytestmark = pytest.mark.slow


def _run(args, env, cwd=rh.REPO, timeout=900):
  proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc


def test_fine_tune_the_grey_demo_on_colour_photos_and_predict(e2e_env, tmp_path, tiny_folder):
  demo, tuned = tmp_path / "demo", tmp_path / "tuned"
  _run(["experiment.py", "--config=configs/demo.py", f"--workdir={demo}", "--mode=train",
        f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.train.num_steps=4",
        "--config.train.batch_size=32", "--config.optimizer.warmup_epochs=0"], e2e_env)
  proc = _run(["experiment.py", "--config=configs/finetune_folder.py", f"--workdir={tuned}",
               f"--config.data.folder={tiny_folder}", f"--config.init.weights={demo}",
               "--config.data.image_size=32", "--config.data.eval_image_size=32",
               "--config.train.batch_size=24", "--config.eval.batch_size=12",
               "--config.train.num_steps=24", "--config.train.log_every_steps=6",
               "--config.optimizer.lr=1.0", "--config.optimizer.warmup_epochs=0"], e2e_env)
  out = proc.stdout
  assert (f"Initialised from {demo} (step 4, EMA weights) (input channels adapted to 3 in "
          "NFNet/~/stem_conv0; classifier re-initialised for 3 classes).") in out, out
  assert "Data folder: 24 train / 12 eval examples, 3 classes" in out
  losses = [r["loss"] for r in rh.records(tuned, "train")]
  assert len(losses) == 4 and losses[-1] < losses[0], losses
  assert "FINAL step 24" in out
  saved = json.loads((tuned / "config.json").read_text())
  assert saved["model"]["kwargs"]["variant"]["width"] == [32, 64, 128, 128]  # The demo's.
  image = os.path.join(tiny_folder, "test", "china", "0.jpg")
  proc = _run(["-m", "nfnets.predict", f"--weights={tuned}", "--top=3", image], e2e_env)
  line = next(l for l in proc.stdout.splitlines() if l.startswith(image))
  assert all(name in line for name in ("china", "flower", "grace_hopper")), line
