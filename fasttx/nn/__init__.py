"""fasttx.nn: use `import fasttx.nn as nn` in place of `import torch.nn as nn`.

Everything public in torch.nn is re-exported unchanged (Module, Linear, Embedding, Parameter,
ModuleList, init, utils, functional, ...); only the transformer parts are overridden by modules
whose hot paths go through fasttx.functional (Triton kernels on CUDA, torch's ops elsewhere).
Each of ours subclasses its torch.nn counterpart, so constructors, defaults, parameters,
state_dict keys, repr and `isinstance(m, torch.nn.X)` are torch's.
"""
from torch.nn import *  # noqa: F401,F403  (torch.nn has no __all__: this takes every public name)

from .activation import GELU
from .dropout import Dropout
from .loss import CrossEntropyLoss, LinearCrossEntropyLoss
from .normalization import LayerNorm
from .positional import PositionalEncoding
from .attention import MultiheadAttention
from .transformer import (
    Transformer,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)
