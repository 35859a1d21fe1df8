"""``python -m alit_fast.evaluate`` (also under ``torchrun``): the ``alit-fast evaluate`` command.

``alit_fast.evaluate(model, images, ...)`` is the Python API (alit_fast.evaluation.evaluate).
Importing this module binds the name ``alit_fast.evaluate`` to the module instead of the function
(Python sets a package attribute to each submodule it imports), so the module is made callable
and forwards to the function: the API works either way."""
from __future__ import annotations

import sys
import types

from .evaluation import evaluate as _evaluate


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return _evaluate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    from .cli.evaluate import main

    sys.exit(main())
