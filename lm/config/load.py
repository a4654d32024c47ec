"""Loading configs: YAML files (strict reader), dotted CLI overrides, merging onto the schema, --help.

OmegaConf merges the layers (dataclass defaults < YAML file < ``--section.key value`` overrides)
and rejects unknown keys and wrong types; each section's ``__post_init__`` (lm/config/schema.py)
checks the values.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lm.config.schema import SECTIONS, Config
from lm.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def resolve_config_path(name: str) -> Path:
    """A path as given, else a file name (with or without ``.yaml``) under ``configs/``."""
    if Path(name).is_dir():
        raise UserError(f"config {name!r} is a directory: give a YAML file (a path or a file name under {CONFIG_DIR})")
    for candidate in (Path(name), CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    raise UserError(f"config file {name!r} not found: give a path or a file name under {CONFIG_DIR}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise UserError(f"key {key!r} appears twice (lines {seen[key]} and {key_node.start_mark.line + 1}): "
                                "keep one")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path, what: str = "config") -> dict:
    """A YAML mapping of sections from ``path``; bad syntax (with its line), duplicate keys or a
    section that is not a mapping are a one-line :class:`UserError`."""
    try:
        data = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UserError as e:
        raise UserError(f"{what} {path}: {e}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise UserError(f"cannot read {what} {path}: {where}{e.problem or e.context}; fix the YAML syntax") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read {what} {path}: {first}; fix the YAML syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} must be a mapping of sections (data, model, ...), got {type(data).__name__}")
    for section, value in data.items():
        if section in SECTIONS and value is not None and not isinstance(value, dict):
            raise UserError(f"{what} {path}: section {section} must be a mapping of keys (e.g. {section}: "
                            f"{{key: value}}), got {type(value).__name__} {value!r}")
    return data


def _config_error(e: OmegaConfBaseException) -> UserError:
    key = getattr(e, "full_key", None) or ""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if type(e).__name__ == "ConfigKeyError" and key:
        section = key.split(".")[0]
        if section in SECTIONS and "." in key:
            valid = ", ".join(f.name for f in dataclasses.fields(SECTIONS[section]))
            return UserError(f"unknown config key {key!r}: valid keys in {section} are {valid}")
        return UserError(f"unknown config key {key!r}: valid sections are {', '.join(SECTIONS)}")
    where = f"config key {key}: " if key else "config: "
    return UserError(f"{where}{msg}")


def parse_overrides(args: Sequence[str]) -> list[str]:
    """Turn ``['--optim.lr', '0.1', '--train.seed=3']`` into OmegaConf dotlist ``['optim.lr=0.1', ...]``."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=")[0]:
            raise UserError(f"unrecognised argument {arg!r}: config overrides look like --section.key VALUE")
        if "=" in arg:
            out.append(arg[2:])
            i += 1
        else:
            following = args[i + 1] if i + 1 < len(args) else None
            if following is None or (following.startswith("--") and "." in following.split("=")[0]):
                raise UserError(f"override {arg} has no value: write {arg} VALUE")
            out.append(f"{arg[2:]}={args[i + 1]}")
            i += 2
    return out


def check_keys(overrides: Sequence[str]) -> None:
    """Refuse unknown keys and values of the wrong type in ``overrides`` against the schema alone.

    Checked before anything about the run directory, so a typo is reported as a typo; the values'
    own checks (``__post_init__``) need the whole config and run in :func:`load_config`.
    """
    try:
        OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise _config_error(e) from None


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                base: dict | None = None) -> Config:
    """Build a validated :class:`Config` from defaults, an optional YAML file or dict, and dotlist overrides."""
    try:
        cfg = OmegaConf.structured(Config)
        if base is not None:
            cfg = OmegaConf.merge(cfg, base)
        if path is not None:
            cfg = OmegaConf.merge(cfg, read_yaml(resolve_config_path(str(path))))
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]  # runs every __post_init__
    except OmegaConfBaseException as e:
        raise _config_error(e) from None


def to_dict(cfg: Config) -> dict:
    """Plain nested dict (YAML/JSON/checkpoint friendly)."""
    return dataclasses.asdict(cfg)


def config_help() -> str:
    """Every key with its type, default and meaning, for ``--help``."""
    lines = ["config keys (override any with --section.key VALUE):"]
    for section, cls in SECTIONS.items():
        lines.append(f"  {section}:")
        for f in dataclasses.fields(cls):
            default = f.default
            lines.append(f"    --{section}.{f.name} (default: {default!r})")
            lines.append(f"        {f.metadata.get('help', '')}")
    return "\n".join(lines)


RUNTIME_KEYS = {"train.device", "train.threads", "train.progress", "train.tensorboard"}  # may change on resume


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
