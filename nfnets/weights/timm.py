"""The parameter mapping between our NFNets and timm's `dm_nfnet_f*` state_dicts.

Conv kernels HWIO <-> OIHW, gains (O,) <-> (O,1,1,1), SE linears <-> 1x1 convs, classifier
transpose. Both directions use one table, so they are exact inverses. timm's names follow
`stages.{s}.{b}`; the Haiku block index is k = sum(depths[:s]) + b.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

Params = dict[str, dict[str, np.ndarray]]


class _Entry(NamedTuple):
  module: str  # Haiku module path.
  name: str    # Haiku param name.
  key: str     # timm state_dict key.
  kind: str    # Key of _TO_TIMM / _TO_HAIKU.


# Haiku -> timm and back, each with the ndim its input must have.
_BOTH_WAYS = {"fc": (2, lambda w: w.T),  # (I,O) <-> (O,I)
              "vector": (1, lambda b: b), "scalar": (0, lambda s: s)}
_TO_TIMM: dict[str, tuple[int, Callable[[np.ndarray], np.ndarray]]] = {
    "conv": (4, lambda w: w.transpose(3, 2, 0, 1)),  # HWIO -> OIHW
    "gain": (1, lambda g: g.reshape(-1, 1, 1, 1)),   # (O,) -> (O,1,1,1)
    "se": (2, lambda w: w.T[:, :, None, None]),      # (I,O) -> 1x1 conv (O,I,1,1)
    **_BOTH_WAYS}
_TO_HAIKU: dict[str, tuple[int, Callable[[np.ndarray], np.ndarray]]] = {
    "conv": (4, lambda w: w.transpose(2, 3, 1, 0)),  # OIHW -> HWIO
    "gain": (4, lambda g: g.reshape(-1)),
    "se": (4, lambda w: w[:, :, 0, 0].T),
    **_BOTH_WAYS}


def _block_module(name: str, k: int) -> str:
  # Haiku names repeated modules nf_block, nf_block_1, nf_block_2, ...
  return f"{name}/~/nf_block" + (f"_{k}" if k else "")


def _conv(module: str, key: str) -> list[_Entry]:
  # Entries follow timm's state_dict order, so converted dicts list like timm's.
  return [_Entry(module, "w", f"{key}.weight", "conv"),
          _Entry(module, "bias", f"{key}.bias", "vector"),
          _Entry(module, "gain", f"{key}.gain", "gain")]


def _layout(name: str, depths: Sequence[int], shortcut: Sequence[bool]) -> list[_Entry]:
  """All (Haiku, timm) param pairs of an NFNet with these depths."""
  entries: list[_Entry] = []
  for i in range(4):
    entries += _conv(f"{name}/~/stem_conv{i}", f"stem.conv{i + 1}")
  k = 0
  for s, depth in enumerate(depths):
    for b in range(depth):
      p, t = _block_module(name, k), f"stages.{s}.{b}"
      entries.append(_Entry(p, "skip_gain", f"{t}.skipinit_gain", "scalar"))
      if shortcut[k]:
        entries += _conv(f"{p}/~/conv_shortcut", f"{t}.downsample.conv")
      for hk_conv, timm_conv in (("conv0", "conv1"), ("conv1", "conv2"),
                                 ("conv1b", "conv2b"), ("conv2", "conv3")):
        entries += _conv(f"{p}/~/{hk_conv}", f"{t}.{timm_conv}")
      for hk_lin, timm_fc in (("linear", "fc1"), ("linear_1", "fc2")):
        se = f"{p}/~/squeeze_excite/~/{hk_lin}"
        entries += [_Entry(se, "w", f"{t}.attn_last.{timm_fc}.weight", "se"),
                    _Entry(se, "b", f"{t}.attn_last.{timm_fc}.bias", "vector")]
      k += 1
  entries += _conv(f"{name}/~/final_conv", "final_conv")
  entries += [_Entry(f"{name}/~/linear", "w", "head.fc.weight", "fc"),
              _Entry(f"{name}/~/linear", "b", "head.fc.bias", "vector")]
  return entries


def _check_keys(have: set[str], want: set[str], what: str) -> None:
  missing, unknown = sorted(want - have), sorted(have - want)
  if missing or unknown:
    raise ValueError(
        f"{what} does not match an NFNet (timm dm_nfnet_f*) layout: missing "
        f"{len(missing)} {missing[:4]}, unknown {len(unknown)} {unknown[:4]}; "
        "pass the right depths or an NFNet/dm_nfnet params tree")


def _convert(value: np.ndarray, kind: str, table: dict, where: str) -> np.ndarray:
  ndim, fn = table[kind]
  if value.ndim != ndim:
    raise ValueError(f"{where} has shape {value.shape}, expected {ndim} dims "
                     f"for a {kind} param")
  # A C-ordered copy (np.ascontiguousarray would turn 0-d skip gains into 1-d).
  return np.array(fn(value), order="C")


def _haiku_name(params: Mapping[str, Any]) -> str:
  for module in params:
    if module.endswith("/~/stem_conv0"):
      return module[: -len("/~/stem_conv0")]
  raise ValueError("params have no '<name>/~/stem_conv0' module; not NFNet params")


def haiku_to_timm(params: Mapping[str, Mapping[str, Any]],
                  depths: Sequence[int] | None = None) -> dict[str, np.ndarray]:
  """Converts NFNet Haiku params to a timm `dm_nfnet_f*` state_dict (numpy).

  Load it with `model.load_state_dict({k: torch.from_numpy(v) ...})`.

  Args:
    params: Haiku params of `nfnets.nfnet.NFNet` (or DeepMind's released ones).
    depths: Blocks per stage; default: inferred (each stage starts with the only
      block that has a `conv_shortcut`).

  Returns:
    `{timm_key: ndarray}` with the same number of values as `params`.
  """
  name = _haiku_name(params)
  block = re.compile(re.escape(name) + r"/~/nf_block(?:_(\d+))?")
  indices = sorted(int(m.group(1) or 0) for p in params if (m := block.fullmatch(p)))
  if indices != list(range(len(indices))):
    raise ValueError(f"NFNet blocks are not numbered 0..N-1 (got {indices[:6]}...)")
  shortcut = [f"{_block_module(name, k)}/~/conv_shortcut" in params for k in indices]
  if depths is None:
    starts = [k for k in indices if shortcut[k]]
    if not starts or starts[0] != 0:
      raise ValueError("cannot infer depths (block 0 has no conv_shortcut); pass depths")
    depths = [b - a for a, b in zip(starts, starts[1:] + [len(indices)])]
  if sum(depths) != len(indices):
    raise ValueError(f"depths {list(depths)} sum to {sum(depths)} but params have "
                     f"{len(indices)} blocks")
  entries = _layout(name, depths, shortcut)
  have = {f"{m}/{n}" for m, inner in params.items() for n in inner}
  _check_keys(have, {f"{e.module}/{e.name}" for e in entries}, "Haiku params")
  return {e.key: _convert(np.asarray(params[e.module][e.name]), e.kind, _TO_TIMM,
                          f"{e.module}/{e.name}") for e in entries}


def _to_numpy(value: Any) -> np.ndarray:
  # Torch tensors without importing torch: detach and move to host; bf16 has no
  # numpy twin in torch, so it is upcast to float32 (exact).
  if hasattr(value, "detach"):
    value = value.detach().cpu()
    try:
      return value.numpy()
    except TypeError:
      return value.float().numpy()
  return np.asarray(value)


def timm_to_haiku(state_dict: Mapping[str, Any], depths: Sequence[int] | None = None,
                  *, name: str = "NFNet") -> Params:
  """Converts a timm `dm_nfnet_f*` state_dict to `nfnets.nfnet.NFNet` Haiku params.

  Args:
    state_dict: timm keys -> torch tensors or numpy arrays.
    depths: Blocks per stage; default: inferred from the `stages.{s}.{b}` keys.
    name: Haiku name of the NFNet module (the top of every module path).

  Returns:
    Haiku params `{module_path: {param_name: ndarray}}`.
  """
  per_stage: dict[int, set[int]] = {}
  for m in filter(None, (re.match(r"stages\.(\d+)\.(\d+)\.", k) for k in state_dict)):
    per_stage.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
  inferred = [len(per_stage.get(s, ())) for s in range(len(per_stage))]
  if depths is None:
    if sorted(per_stage) != list(range(len(per_stage))) or any(
        per_stage[s] != set(range(d)) for s, d in enumerate(inferred)):
      raise ValueError("timm state_dict has gaps in its stages.{s}.{b} keys; pass depths")
    depths = inferred
  if sum(depths) != sum(inferred):
    raise ValueError(f"depths {list(depths)} sum to {sum(depths)} but the state_dict "
                     f"has {sum(inferred)} blocks")
  shortcut = []
  for s, depth in enumerate(depths):
    shortcut += [f"stages.{s}.{b}.downsample.conv.weight" in state_dict
                 for b in range(depth)]
  entries = _layout(name, depths, shortcut)
  _check_keys(set(state_dict), {e.key for e in entries}, "timm state_dict")
  params: Params = {}
  for e in entries:
    value = _convert(_to_numpy(state_dict[e.key]), e.kind, _TO_HAIKU, e.key)
    params.setdefault(e.module, {})[e.name] = value
  return params
