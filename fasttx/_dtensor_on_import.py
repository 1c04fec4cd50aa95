"""Imported (once) by fasttx._registry.route when it first runs under torch.compile: registers the
DTensor sharding rules if torch.distributed.tensor is loaded (dynamo executes an import, it does not
trace it; see fasttx._registry._dtensor_rules)."""
from fasttx import _registry
from fasttx.distributed import register_if_dtensor_loaded

if register_if_dtensor_loaded():
    _registry._DTENSOR_RULES_PENDING[0] = False
