"""`python -m fasttx.demo`: a thin entry to the demo, whose CLI lives in the repository's
examples/demo.py (`make demo` runs that file; the library holds only the library). From a source
checkout (editable install) this module is examples/demo.py itself: `from fasttx import demo` gives
that module. An installed wheel has no examples/, and says so."""
import importlib.util
import os
import sys

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "demo.py")


def _load(name: str):
    if not os.path.isfile(_PATH):
        raise ImportError(f"fasttx.demo runs examples/demo.py of a fasttx source checkout, not found at {_PATH}; "
                          "clone the repository and run `make demo` there")
    spec = importlib.util.spec_from_file_location(name, _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    _load("__main__")  # runs the example as the main program (it calls its own main())
else:
    _load(__name__)  # replaces this entry in sys.modules: `from fasttx import demo` is the example
