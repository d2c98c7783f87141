"""disagg: disaggregated prefill/decode LLM serving on vLLM, Ray and NIXL.

The source tree keeps ``transfer/``, ``kernels/``, ``scheduler/`` and ``launch/`` beside
``disagg/``; installed, they are ``disagg.transfer`` and so on. When this package is imported
straight from a checkout (the checkout root on the import path, as in a Ray job's
working_dir), the checkout root joins this package's ``__path__`` so those subpackages
resolve the same way. Type checkers and IDEs see the installed link tree instead
(``scripts/setup.sh``).
"""

from pathlib import Path as _Path

__version__ = "0.1.0"

_root = _Path(__file__).resolve().parent.parent
if (_root / "pyproject.toml").is_file() and (_root / "transfer" / "__init__.py").is_file():
    __path__.append(str(_root))  # noqa: F821  # a package's __path__, set by the import system
