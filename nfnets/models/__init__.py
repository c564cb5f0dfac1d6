"""The networks: NFNet-F0..F7(+), NF-ResNet, NF-RegNet, the BatchNorm ResNet baseline.

Haiku modules only. Nothing here imports training, data, weights or analysis code, so
`import nfnets.models` loads JAX and Haiku but neither TensorFlow, scipy nor orbax (a test
enforces this).

  layers.py       WSConv2D, SqueezeExcite, StochDepth and the block pieces every family shares
  blocks.py       the body loop: blocks in order, rematerialised or scanned (scan_blocks)
  activations.py  the gamma-scaled nonlinearities (the official constants)
  residual_scaling.py  the NF residual bookkeeping: beta, variance reset, stochastic-depth ramp
  variants.py     one variant resolver for every family; the shared ResNet depth table
  nfnet.py nf_resnet.py nf_regnet.py resnet.py   one family each, variant tables on the class
  registry.py     MODELS, create_model, make_forward
"""

from nfnets.models.activations import GAMMAS
from nfnets.models.activations import get_activation
from nfnets.models.layers import SqueezeExcite
from nfnets.models.layers import StochDepth
from nfnets.models.layers import WSConv2D
from nfnets.models.nf_regnet import NF_RegNet
from nfnets.models.nf_regnet import NFRegNetVariant
from nfnets.models.nf_resnet import NF_ResNet
from nfnets.models.nfnet import NFNet
from nfnets.models.nfnet import NFNetVariant
from nfnets.models.registry import create_model
from nfnets.models.registry import make_forward
from nfnets.models.registry import model_class
from nfnets.models.registry import MODELS
from nfnets.models.registry import resolve_kwargs
from nfnets.models.resnet import ResNet
from nfnets.models.variants import ResNetVariant

__all__ = [
    'GAMMAS', 'get_activation', 'SqueezeExcite', 'StochDepth', 'WSConv2D', 'NF_RegNet',
    'NFRegNetVariant', 'NF_ResNet', 'NFNet', 'NFNetVariant', 'create_model', 'make_forward',
    'model_class', 'MODELS', 'resolve_kwargs', 'ResNet', 'ResNetVariant',
]
