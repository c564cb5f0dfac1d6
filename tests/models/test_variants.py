"""Tests for nfnets.models.variants: the one variant resolver and the shared checks."""

import ml_collections
import pytest

from nfnets.models import nf_regnet, nfnet, variants
from nfnets.models.variants import RESNET_VARIANTS, ResNetVariant


def test_names_instances_and_mappings_resolve_alike():
  table, kind = nfnet.NFNet.VARIANTS, nfnet.NFNetVariant
  f0 = variants.resolve_variant('NFNet', table, kind, 'F0')
  assert f0 is table['F0']
  assert variants.resolve_variant('NFNet', table, kind, f0) is f0
  fields = {'width': [16, 32, 64, 64], 'depth': [1, 1, 1, 1], 'group_width': 8}
  tiny = variants.resolve_variant('NFNet', table, kind, fields)
  assert tiny.depth == (1, 1, 1, 1) and tiny.group_width == (8, 8, 8, 8)
  # A ConfigDict (what configs/*.py hold) is a mapping too.
  assert variants.resolve_variant('NFNet', table, kind,
                                  ml_collections.ConfigDict(fields)) == tiny


def test_errors_name_the_family_and_the_choices():
  with pytest.raises(ValueError, match=r"Unknown NF_RegNet variant 'B9'; use one of .*'B8'"):
    variants.resolve_variant('NF_RegNet', nf_regnet.NF_REGNET_VARIANTS,
                             nf_regnet.NFRegNetVariant, 'B9')
  with pytest.raises(ValueError, match=r"unknown fields \['widht'\] / lacks \['width'\]"):
    variants.resolve_variant('NFNet', nfnet.NFNet.VARIANTS, nfnet.NFNetVariant,
                             {'widht': 1, 'depth': [1]}, required=('width', 'depth'))
  with pytest.raises(ValueError, match='must be a name, a ResNetVariant or a dict'):
    variants.resolve_variant('ResNet', RESNET_VARIANTS, ResNetVariant, 50)


def test_shared_checks():
  assert variants.check_num_classes(10) == 10
  for bad in (0, -1, 2.5, True):
    with pytest.raises(ValueError, match='positive integer'):
      variants.check_num_classes(bad)
  assert variants.check_rate('drop_rate', 0.0) == 0.0
  for bad in (-0.1, 1.0):
    with pytest.raises(ValueError, match=r'drop_rate must be in \[0, 1\)'):
      variants.check_rate('drop_rate', bad)


def test_resnet_table_and_widths():
  assert RESNET_VARIANTS['ResNet50'].depth == (3, 4, 6, 3)
  assert variants.resnet_stage_widths(4) == (256, 512, 1024, 2048)
  with pytest.raises(ValueError, match='too small'):
    variants.resnet_stage_widths(0.05)
  with pytest.raises(ValueError, match='4 positive block counts'):
    ResNetVariant(depth=(1, 1, 1))
