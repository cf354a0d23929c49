"""Third-party modules imported when first used: diffrax is read only by code that builds a solve, so a process
whose programs all load from the caches (a warm ``gradflow run``) never imports it (about half a second), nor
optimistix (its event bisection and Newton iteration, read by the same code), and optax
only by training and design, and matplotlib only by a figure drawn (a warm ``gradflow run`` whose figure the figure
cache holds draws none).

``on_first_use(name)`` returns a stand-in module whose attribute reads import ``name`` (``importlib.import_module``,
thread-safe under the import system's locks) and read the attribute there.  gradflow's modules import the
stand-in (``from gradflow._imports import diffrax``); ``sys.modules`` is left alone, so ``import diffrax`` anywhere
else imports the real module as always.
"""

from __future__ import annotations

import importlib
import types


class _OnFirstUse(types.ModuleType):
    """Stands in for the module of its name: every attribute it lacks is read from that module, imported then."""

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self.__name__), attr)


def on_first_use(name: str) -> types.ModuleType:
    """A stand-in for module ``name`` that imports it at the first attribute read (``_OnFirstUse``)."""
    return _OnFirstUse(name)


diffrax = on_first_use("diffrax")  # what gradflow's modules import as diffrax ...
optax = on_first_use("optax")  # ... and as optax (0.1 s, for training and design only)
optx = on_first_use("optimistix")  # ... and as optx (with lineax 0.2 s, for a solve built: its event bisection)
matplotlib = on_first_use("matplotlib")  # ... and as matplotlib and its pyplot (0.5 s, for figures only)
plt = on_first_use("matplotlib.pyplot")
