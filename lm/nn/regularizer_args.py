"""The regularizer of a :class:`lm.nn.regularized.RegularizedLSTM` from its ``regularizer=`` argument:
a registry name with rates given as keyword arguments (the registry's option names and checks), a
:class:`lm.config.RegularizerConfig`, or a built :class:`lm.regularizers.Regularizer`."""

from __future__ import annotations

import dataclasses

from lm.config import RegularizerConfig
from lm.errors import UserError
from lm.regularizers import REGISTRY, Regularizer, build_regularizer

DEFAULT_RATES: dict[str, dict[str, float]] = {
    "weight_drop": {"weight_p": 0.5}, "wd_flipout": {"weight_p": 0.5},
    "gauss": {"sigma": 1.0}, "gauss_flipout": {"sigma": 1.0},
    "variational": {"hidden_p": 0.25}, "semeniuta": {"cell_p": 0.25},
    "zoneout": {"zoneout_c": 0.5, "zoneout_h": 0.05}, "dropout": {"input_p": 0.25, "output_p": 0.25},
}
"""The rates a regularizer name alone gets (the char-level configs in ``configs/``; ``bbb`` and
``bbb_flipout`` use :class:`lm.config.RegularizerConfig`'s defaults). A rate passed by name replaces
its default, the others stay."""

LM_ONLY = ("embed_p", "ar", "tar", "kl_scale", "kl_warmup_steps")
"""Registry options that only the language model's trainer reads (no embedding here; AR/TAR and the
KL's weight are loss terms: add ``kl()`` to your loss with the weight you choose)."""

_WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def make_regularizer(regularizer: str | RegularizerConfig | Regularizer, options: dict) -> Regularizer:
    """The regularizer of a :class:`RegularizedLSTM`: a registry name with rates, a config, or an instance."""
    if isinstance(regularizer, Regularizer) or isinstance(regularizer, RegularizerConfig):
        if options:
            raise UserError(f"regularizer options {sorted(options)} go with a regularizer name: pass "
                            "regularizer='<name>' with them, or put them in the RegularizerConfig")
        return regularizer if isinstance(regularizer, Regularizer) else build_regularizer(regularizer)
    if not isinstance(regularizer, str):
        raise UserError(f"regularizer={regularizer!r} is invalid: give a name ({', '.join(REGISTRY)}), "
                        "a RegularizerConfig or a Regularizer")
    known = {f.name for f in dataclasses.fields(RegularizerConfig)} - {"name", *LM_ONLY}
    for key in options:
        if key in LM_ONLY:
            raise UserError(f"regularizer option {key} is read by the language model's trainer, not by "
                            "RegularizedLSTM: remove it (add kl() or your own penalty to the loss instead)")
        if key not in known:
            raise UserError(f"regularizer option {key!r} is unknown: expected one of {', '.join(sorted(known))}")
    if regularizer not in REGISTRY:  # build_regularizer says the same, after the rates are merged
        raise UserError(f"config key regularizer.name={regularizer!r} is invalid: expected one of "
                        f"{', '.join(REGISTRY)}")
    return build_regularizer(RegularizerConfig(name=regularizer, **{**DEFAULT_RATES.get(regularizer, {}), **options}))
