"""Loading a ``Config``: one YAML file, ``key=value`` overrides, job flags; and dumping the resolved config.

Unknown keys and wrong types are errors naming the key, not silent defaults (timm's YAML-to-argparse habit, made
strict). Credentials never live here: S3 endpoint and keys come from the standard AWS environment, so a dumped config
can be shared as is.
"""

from __future__ import annotations

import dataclasses
import datetime
import types
import typing
from typing import Any

from whale_dist.config.schema import RESOLVED_CONFIG, Config, ConfigError
from whale_dist.storage import join, read_text, write_text


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if tp is str and isinstance(value, datetime.date):  # YAML reads 2026-11-28 (a night, a date filter) as a date
        return value.isoformat()
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"config key '{key}': expected {tp.__name__}, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"config key '{key}': expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _apply(obj: Any, mapping: dict, prefix: str = "") -> None:
    """Set fields of dataclass ``obj`` from a nested mapping, strictly."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {mapping!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in mapping.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{full}' (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, full + ".")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def _parse_override(item: str) -> dict:
    """``a.b.c=value`` -> nested mapping; the value is parsed as YAML (so ``3``, ``true``, ``[a, b]`` work)."""
    import yaml

    if "=" not in item:
        raise ConfigError(f"override '{item}' is not key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    nested: dict = {}
    cursor = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return nested


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file at ``path`` (any storage URL), then ``key=value`` overrides in order."""
    import yaml

    cfg = Config()
    if path:
        try:
            data = yaml.safe_load(read_text(path)) or {}
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
        _apply(cfg, data)
    for item in overrides:
        _apply(cfg, _parse_override(item))
    return cfg


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, folder: str) -> str:
    """Write the resolved config as ``{folder}/config.yaml``, next to the output it produced; returns its URL."""
    import yaml

    url = join(folder, RESOLVED_CONFIG)
    write_text(url, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return url


def split_argv(argv: list[str]) -> tuple[str | None, list[str], list[str]]:
    """Split job arguments into (--config path, key=value overrides, remaining flags)."""
    config_path, overrides, rest = None, [], []
    items = list(argv)
    while items:
        item = items.pop(0)
        if item == "--config":
            if not items:
                raise ConfigError("--config needs a path")
            config_path = items.pop(0)
        elif item.startswith("--config="):
            config_path = item.split("=", 1)[1]
        elif "=" in item and not item.startswith("-"):
            overrides.append(item)
        else:
            rest.append(item)
    return config_path, overrides, rest


def config_from_argv(argv: list[str], flags: dict[str, str] | None = None) -> Config:
    """``[--config FILE] [--flag VALUE ...] [key=value ...]`` -> resolved ``Config``.

    ``flags`` maps job-specific flags to config keys (``{"--out": "synth.out"}``) so that the documented command
    lines (``whale-dist identify --catalogue URL --images URL --out URL``) are plain overrides underneath.
    """
    flags = flags or {}
    config_path, overrides, rest = split_argv(argv)
    while rest:
        flag = rest.pop(0)
        name, _, inline = flag.partition("=")
        if name not in flags:
            known = " ".join(sorted(flags)) or "none"
            raise ConfigError(f"unknown argument '{flag}' (flags: --config {known}; or key=value overrides)")
        if not inline:
            if not rest:
                raise ConfigError(f"{name} needs a value")
            inline = rest.pop(0)
        overrides.append(f"{flags[name]}={inline}")
    return load_config(config_path, overrides)
