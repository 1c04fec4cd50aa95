"""`config.output_attentions = True` on a model whose attention implementation is "fasttx".

transformers refuses that flag for every implementation but eager: the setter of
`PreTrainedConfig.output_attentions` (and the class validator `validate_output_attentions`, run by
`config.validate()` and so by `save_pretrained`) raise `ValueError: The output_attentions attribute
is not supported when using the attn_implementation set to fasttx`. fasttx keeps that contract
another way: a call that asks for the weights (argument or config) runs transformers' eager
attention for that call (attention.py: eager_for_this_call, used by the patched model forward in
loss.py), so the weights are eager's. allow() teaches transformers that "fasttx" accepts the flag.
"""
from __future__ import annotations

import functools

_MARK = "_fasttx_allows_output_attentions"


def _config_class():
    try:
        from transformers.configuration_utils import PreTrainedConfig
    except ImportError:  # transformers 4.x spells it PretrainedConfig
        from transformers.configuration_utils import PretrainedConfig as PreTrainedConfig
    return PreTrainedConfig


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def allow(implementation: str) -> None:
    """Make transformers' config accept output_attentions=True while its attention implementation
    is `implementation` (otherwise unchanged: every other implementation is judged by transformers'
    own rule). Idempotent.

    Why this mechanism: the rule lives in one property setter and one validator of the base config
    class, with nothing per model to hook (a config class swapped per instance would break pickling
    and transformers' config -> model lookups, and the model-level forward cannot see an attribute
    assignment). So the two are wrapped once, on the base class, and they defer to the originals
    for every other implementation. strict dataclasses copy their validators into a list per class
    when the class is created, so the lists of the classes created before this call are updated too.
    """
    base = _config_class()
    prop = base.__dict__.get("output_attentions")
    if not isinstance(prop, property) or prop.fset is None or getattr(prop.fset, _MARK, False):
        return  # a transformers without the rule, or already allowed

    def ours(self) -> bool:
        return getattr(self, "_attn_implementation", None) == implementation

    @functools.wraps(prop.fset)
    def fset(self, value):
        if value and ours(self):
            self._output_attentions = value
            return
        prop.fset(self, value)

    setattr(fset, _MARK, True)
    base.output_attentions = property(prop.fget, fset, prop.fdel, prop.__doc__)

    validate = base.__dict__.get("validate_output_attentions")
    if validate is None:
        return

    @functools.wraps(validate)
    def validate_output_attentions(self):
        if not ours(self):
            validate(self)

    base.validate_output_attentions = validate_output_attentions
    for cls in [base, *_subclasses(base)]:
        validators = cls.__dict__.get("__class_validators__")
        if isinstance(validators, list):
            validators[:] = [validate_output_attentions if v is validate else v for v in validators]
