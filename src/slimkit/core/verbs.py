"""Technique packages that are also verbs: ``sk.prune(model, sk.prune.Channel(...))``.

``slimkit.prune`` is a package (configs, criteria, helpers) and, by the API's convention, the verb
that prunes. A module cannot be called, and once any of its submodules is imported Python binds
the package itself to ``slimkit.prune``, so a plain function of that name would be shadowed. The
package's module object therefore gets a class with ``__call__``, forwarding to the verb.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any


def make_callable(module_name: str, target: str) -> None:
    """Make module ``module_name`` callable; calls go to ``"pkg.mod:function"`` (lazily)."""
    mod_name, _, attr = target.partition(":")

    class _VerbModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return getattr(importlib.import_module(mod_name), attr)(*args, **kwargs)

    sys.modules[module_name].__class__ = _VerbModule
