"""nfnets/data/options.py (named apart from tests/train/test_options.py: pytest imports test
modules by base name): the one RandAugment level parser and DataOptions' own checks."""

import pytest

from nfnets.data.options import DataOptions, parse_randaugment


@pytest.mark.parametrize("level,expected", [("405", (4, 5)), ("410", (4, 10)), ("415", (4, 15)),
                                            ("205", (2, 5)), ("1015", (10, 15)), (" 405 ", (4, 5)),
                                            ("", None), ("none", None), ("0", None), (None, None)])
def test_parse_randaugment(level, expected):
  assert parse_randaugment(level) == expected


@pytest.mark.parametrize("bad", ["abc", "100", "99", "4.05", "-405", "4o5", "٤٠٥"])
def test_bad_randaugment_levels_say_what_to_write(bad):
  with pytest.raises(ValueError, match=r"data.randaugment must be digits .* like '405'"):
    parse_randaugment(bad)


def test_decoded_inputs_per_example_follow_the_mixing_mode():
  assert DataOptions(mix_mode="paper").inputs_per_example == 2
  assert DataOptions(mix_mode="fast").inputs_per_example == 1
  off = DataOptions(mixup_alpha=0.0, cutmix=False, mix_mode="paper")
  assert not off.mixes and off.inputs_per_example == 1
  assert DataOptions(randaugment="").randaugment_plan is None
  assert DataOptions(randaugment="205").randaugment_plan == (2, 5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(mix_mode="exact"), "data.mix_mode must be one of"),
    (dict(image_size=0), "must be positive pixels"),
    (dict(mixup_alpha=-0.1), "data.mixup_alpha must be >= 0"),
    (dict(name=""), "data.name is empty"),
    (dict(randaugment="4o5"), "data.randaugment must be digits"),
])
def test_bad_options_are_one_line_errors(kwargs, match):
  with pytest.raises(ValueError, match=match) as info:
    DataOptions(**kwargs)
  assert "\n" not in str(info.value)
