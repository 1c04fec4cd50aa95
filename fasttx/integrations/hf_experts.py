"""Moved to fasttx.integrations.huggingface.experts; this name stays importable (the same module
object, so `import fasttx.integrations.hf_experts` registers "fasttx" in ExpertsInterface as before)."""
import sys

from .huggingface import experts as _experts

sys.modules[__name__] = _experts
