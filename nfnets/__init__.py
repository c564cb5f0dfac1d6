"""Normalizer-Free Networks (NFNets, NF-ResNets, NF-RegNets) in JAX/Haiku.

The public names below cover models, layers, optimisation and weights. The input
pipeline lives in `nfnets.data` and is imported explicitly, because it brings in
TensorFlow, which model-only users should not have to load.
"""

from nfnets.activations import compute_gamma
from nfnets.activations import GAMMAS
from nfnets.activations import get_activation
from nfnets.agc import adaptive_grad_clip
from nfnets.agc import agc_metrics
from nfnets.flops import count_macs
from nfnets.flops import count_params
from nfnets.layers import SqueezeExcite
from nfnets.layers import StochDepth
from nfnets.layers import WSConv2D
from nfnets.models import create_model
from nfnets.models import make_forward
from nfnets.models import MODELS
from nfnets.nf_regnet import NF_RegNet
from nfnets.nf_resnet import NF_ResNet
from nfnets.nfnet import NFNet
from nfnets.nfnet import NFNetVariant
from nfnets.optim import build_optimizer
from nfnets.optim import ema_update
from nfnets.resnet import ResNet
from nfnets.weights import haiku_to_timm
from nfnets.weights import load_official
from nfnets.weights import load_params
from nfnets.weights import save_params
from nfnets.weights import timm_to_haiku
from nfnets.weights import UnsafeWeightsError

__version__ = "0.1.0"
