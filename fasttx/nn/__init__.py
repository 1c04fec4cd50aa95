"""fasttx.nn: use `import fasttx.nn as nn` in place of `import torch.nn as nn`.

Everything public in torch.nn is re-exported unchanged (Module, Linear, Embedding, Parameter,
ModuleList, init, utils, ...); `nn.functional` is fasttx.functional (ours where we have an op,
torch's for every other name). The modules fasttx overrides are the names in the `__all__` of
this package's submodules, collected here (a new module file needs no list entry): each
subclasses its torch.nn counterpart, so constructors, defaults, parameters, state_dict keys and
`isinstance(m, torch.nn.X)` are torch's; only the forward runs through fasttx.functional.
`TORCH_TO_FASTTX` (torch.nn class -> ours) is derived from them for fasttx.convert.
"""
import importlib as _importlib
import pkgutil as _pkgutil

import torch as _torch
from torch.nn import *  # noqa: F401,F403  (torch.nn has no __all__: this takes every public name)

from .. import functional  # noqa: F401  (fasttx's, in place of torch.nn.functional)

__all__ = []
for _info in _pkgutil.iter_modules(__path__):  # noqa: F405  (the package's own __path__)
    if _info.name.startswith("_"):
        continue
    _module = _importlib.import_module(f"{__name__}.{_info.name}")
    for _name in _module.__all__:
        globals()[_name] = getattr(_module, _name)
        __all__.append(_name)

# torch.nn class -> the fasttx.nn class that overrides it (same name, direct subclass).
TORCH_TO_FASTTX = {
    getattr(_torch.nn, _name): globals()[_name]
    for _name in __all__
    if isinstance(globals()[_name], type)
    and isinstance(getattr(_torch.nn, _name, None), type)
    and globals()[_name].__bases__ == (getattr(_torch.nn, _name),)
}


