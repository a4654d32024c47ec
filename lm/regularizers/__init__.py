"""The regularizer registry: a small explicit name -> class table.

To add a regularizer: subclass :class:`Regularizer` in its own module, set ``name``,
``summary``, ``perturbs``, ``granularity``, ``paper`` and ``options``, override the hooks it
needs, and add the class to ``_BUILTINS`` below (or call :func:`register`).

May import ``lm.nn`` (the noise plan it hands the layers) and the top-level modules only.
"""

from __future__ import annotations

from lm.config import RegularizerConfig
from lm.errors import UserError
from lm.regularizers.base import NoRegularizer, Regularizer
from lm.regularizers.bayes import BayesByBackprop, BBBFlipout
from lm.regularizers.dropout import Dropout
from lm.regularizers.semeniuta import Semeniuta
from lm.regularizers.variational import Variational
from lm.regularizers.weight_noise import Gauss, GaussFlipout, WDFlipout, WeightDrop
from lm.regularizers.zoneout import Zoneout

REGISTRY: dict[str, type[Regularizer]] = {}


def register(cls: type[Regularizer]) -> type[Regularizer]:
    """Add ``cls`` under ``cls.name``; a second class with the same name is an error."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in REGISTRY:
        raise ValueError(f"regularizer {cls.name!r} is already registered by {REGISTRY[cls.name].__name__}")
    REGISTRY[cls.name] = cls
    return cls


_BUILTINS = (NoRegularizer, Dropout, Variational, Semeniuta, Zoneout, WeightDrop, WDFlipout, Gauss, GaussFlipout,
             BayesByBackprop, BBBFlipout)
for _cls in _BUILTINS:
    register(_cls)


def build_regularizer(cfg: RegularizerConfig) -> Regularizer:
    """Instantiate the regularizer named ``cfg.name`` (validating its options)."""
    if cfg.name not in REGISTRY:
        raise UserError(f"config key regularizer.name={cfg.name!r} is invalid: expected one of "
                        f"{', '.join(REGISTRY)}")
    return REGISTRY[cfg.name](cfg)


def describe() -> str:
    """One line per regularizer, for ``train.py --list-regularizers``."""
    width = max(map(len, REGISTRY))
    return "\n".join(f"{name:<{width}}  {cls.summary}" for name, cls in REGISTRY.items())


__all__ = ["REGISTRY", "Regularizer", "register", "build_regularizer", "describe"]
