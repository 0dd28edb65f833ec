"""Every field of a method config from text: `--set KEY=VALUE`, `--config FILE` and `fiseclip-jax methods`.

    m = fiseclip_jax.methods.get("fiseclip")
    m = apply_overrides(m, parse_assignments(["alpha=0.2", "layers=3,6,9,12"]))   # strings parsed
    m = apply_overrides(m, {"tta": {"steps": 10}})                                 # typed (TOML / JSON)
    name, values = load_config("run.json")      # a TOML [method] table, or the config a run recorded
    print(describe("fiseclip"))                  # each field: type, default, meaning (`methods` command)

Values are converted to the field's annotated type (int, float, bool, str, tuples as "6,12,18,24",
"none" for an optional field, nested configs by dotted keys: "tta.steps=10") and checked against
the field's allowed values (`option(..., choices)`) before the config's own `__post_init__` checks.
Every error is one `FiseclipError` line: an unknown key lists the valid keys, a bad value the
allowed values.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

from . import methods
from .errors import FiseclipError

_NONE = ("none", "null")
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


@dataclasses.dataclass(frozen=True)
class FieldInfo:
    """One settable field: dotted `key`, its `type` in words, `default` in --set syntax, `meaning`,
    allowed `choices` (empty: any value of the type), `encoding` (whether it changes `encode`), `stage`
    (whether it changes the first scoring stage, `Method.stage_fields`)."""

    key: str
    type: str
    default: str
    meaning: str
    choices: tuple
    encoding: bool
    stage: bool = False


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _optional(tp):
    """(inner type, True) for Optional[inner], else (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _is_config(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def type_text(tp) -> str:
    """A field's annotation in words: "int", "tuple[int, ...]", "str | none"."""
    inner, optional = _optional(tp)
    if typing.get_origin(inner) is tuple:
        args = typing.get_args(inner)
        text = (f"tuple[{args[0].__name__}, ...]" if len(args) == 2 and args[1] is Ellipsis
                else f"tuple[{', '.join(a.__name__ for a in args)}]")
    elif typing.get_origin(inner) is not None or inner is typing.Callable:
        text = "function (Python only)"
    else:
        text = getattr(inner, "__name__", str(inner))
    return f"{text} | none" if optional else text


def format_value(value) -> str:
    """A value in --set syntax: none, true/false, 1,3,5, plain text."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(format_value(v) for v in value)
    if dataclasses.is_dataclass(value):
        return "default" if value == type(value)() else "(set)"
    if callable(value):
        return getattr(value, "__name__", "function")
    return str(value)


def fields(config) -> list[FieldInfo]:
    """Every settable field of a method config (or config class), nested configs as dotted keys."""
    cls = config if isinstance(config, type) else type(config)
    instance = None if isinstance(config, type) else config
    encoding = set(getattr(cls, "encoding_fields", ()))
    stage = set(getattr(cls, "stage_fields", ()))
    hints = _hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        default = getattr(instance, f.name) if instance is not None else (
            f.default if f.default is not dataclasses.MISSING else f.default_factory())
        meta = f.metadata or {}
        out.append(FieldInfo(f.name, type_text(tp), format_value(default), meta.get("meaning", ""),
                             tuple(meta.get("choices", ())), f.name in encoding, f.name in stage))
        inner, _ = _optional(tp)
        if _is_config(inner):
            sub = default if default is not None else inner
            out += [dataclasses.replace(i, key=f"{f.name}.{i.key}", encoding=f.name in encoding, stage=f.name in stage)
                    for i in fields(sub)]
    return out


def valid_keys(config) -> list[str]:
    return [f.key for f in fields(config) if not f.type.startswith("function")]


def describe(name: str | None = None) -> str:
    """The `fiseclip-jax methods [NAME]` text: per method, each field's key, type, default and meaning;
    [enc] marks fields that change the encoding, [stage] those that change the first scoring stage."""
    blocks = []
    for n in ([name] if name else methods.names()):
        method = methods.get(n)
        cls = type(method)
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        rows = fields(method)
        wk = max(len(r.key) for r in rows)
        wt = max(len(r.type) for r in rows)
        wd = max(len(r.default) for r in rows)
        lines = [f"{n}: {doc}"]
        for r in rows:
            allowed = f" [{', '.join(format_value(c) for c in r.choices)}]" if r.choices else ""
            enc = " [enc]" if r.encoding else " [stage]" if r.stage else ""
            lines.append(f"  {r.key:<{wk}}  {r.type:<{wt}}  {r.default:<{wd}}  {r.meaning}{allowed}{enc}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + (
        "\n\n[enc]: changes the encoding (the forward pass); [stage]: changes the first, costly scoring stage "
        "(matching); the other fields only change the rest of the scoring: a sweep over them encodes and matches "
        "once (with a feature cache). Set any field with --set KEY=VALUE or a --config TOML [method] table.\n")


# ------------------------------------------------------------------ parsing
def parse_assignments(items: Sequence[str], option: str = "--set") -> dict[str, str]:
    """["KEY=VALUE", ...] -> {KEY: VALUE} (later ones win); a missing '=' is an error naming the option."""
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FiseclipError(f"{option} {item!r}: expected KEY=VALUE (e.g. {option} alpha=0.2)")
        out[key.strip()] = value.strip()
    return out


def _flatten(values: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"tta": {"steps": 10}} -> {"tta.steps": 10}; an empty or None nested value stays a leaf."""
    out = {}
    for k, v in values.items():
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _bad(source, key, raw, what):
    return FiseclipError(f"{source} {key}={format_value(raw) if not isinstance(raw, str) else raw}: {what}")


def convert(tp, raw, *, key: str = "value", source: str = "--set"):
    """`raw` (text from --set, or a TOML/JSON value) as a value of annotation `tp`."""
    inner, optional = _optional(tp)
    if raw is None or (isinstance(raw, str) and raw.lower() in _NONE):
        if optional:
            return None
        raise _bad(source, key, raw, f"expected {type_text(tp)}, not none")
    if _is_config(inner):
        if isinstance(raw, str) and raw.lower() == "default":
            return inner()
        if isinstance(raw, Mapping):
            return apply_overrides(inner(), raw, source=source, prefix=f"{key}.")
        raise _bad(source, key, raw, f"expected none, default, or its fields as {key}.FIELD=VALUE")
    if inner is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in _TRUE + _FALSE:
            return raw.lower() in _TRUE
        raise _bad(source, key, raw, "allowed values: true, false")
    if inner is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        try:
            return int(raw) if isinstance(raw, str) else _no()
        except ValueError:
            raise _bad(source, key, raw, "expected an integer") from None
    if inner is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        try:
            return float(raw) if isinstance(raw, str) else _no()
        except ValueError:
            raise _bad(source, key, raw, "expected a number") from None
    if inner is str:
        if isinstance(raw, str):
            return raw
        raise _bad(source, key, raw, "expected text")
    if typing.get_origin(inner) is tuple:
        args = typing.get_args(inner)
        items = [s.strip() for s in raw.split(",") if s.strip()] if isinstance(raw, str) else raw
        if not isinstance(items, (list, tuple)):
            raise _bad(source, key, raw, f"expected {type_text(tp)}, comma-separated (e.g. 6,12,18,24)")
        kinds = [args[0]] * len(items) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(kinds) != len(items):
            raise _bad(source, key, raw, f"expected {len(kinds)} comma-separated values ({type_text(tp)})")
        try:
            return tuple(convert(k, v, key=key, source=source) for k, v in zip(kinds, items))
        except FiseclipError:
            raise _bad(source, key, raw, f"expected {type_text(tp)}, comma-separated (e.g. 6,12,18,24)") from None
    raise _bad(source, key, raw, "this field is set from Python only")


def _no():
    raise ValueError


def apply_overrides(config, values: Mapping[str, Any], *, source: str = "--set", prefix: str = ""):
    """`config` with `values` ({dotted key: text or typed value}, or nested mappings) applied; each value
    converted to its field's type and checked against its allowed values, then the config checks itself."""
    flat = _flatten(values)
    cls = type(config)
    hints = _hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    changes: dict[str, Any] = {}
    nested: dict[str, dict] = {}
    for key, raw in flat.items():
        head, dot, rest = key.partition(".")
        field = names.get(head)
        inner, _ = _optional(hints[head]) if field else (None, False)
        python_only = field is not None and type_text(hints[head]).startswith("function")
        if python_only and not dot and raw is None and getattr(config, head) is None:
            continue  # a recorded config's unset function field (run.json): nothing to set
        if field is None or (dot and not _is_config(inner)) or python_only:
            label = getattr(config, "label", cls.__name__)
            keys = valid_keys(config)
            raise FiseclipError(f"{source}: unknown key {prefix + key!r} for {label}; valid keys: "
                                f"{', '.join(prefix + k for k in keys)}")
        if dot:
            nested.setdefault(head, {})[rest] = raw
            continue
        value = convert(hints[head], raw, key=prefix + key, source=source)
        choices = field.metadata.get("choices", ()) if field.metadata else ()
        if choices and value not in choices:
            raise _bad(source, prefix + key, raw, f"allowed values: {', '.join(format_value(c) for c in choices)}")
        changes[head] = value
    for head, sub in nested.items():
        base = changes.get(head, getattr(config, head))
        if base is None:
            inner, _ = _optional(hints[head])
            raise FiseclipError(f"{source} {prefix}{head}.{next(iter(sub))}: {prefix}{head} is none for "
                                f"{getattr(config, 'label', cls.__name__)} (set {prefix}{head}=default first, "
                                f"or use a method that has it, e.g. anoclip+ for tta)")
        changes[head] = apply_overrides(base, sub, source=source, prefix=f"{prefix}{head}.")
    try:
        return dataclasses.replace(config, **changes)
    except FiseclipError as err:
        raise FiseclipError(f"{source}: {err}") from None
    except (TypeError, ValueError) as err:
        raise FiseclipError(f"{source}: invalid value for {cls.__name__}: {err}") from None


# ------------------------------------------------------------------ config files
def load_config(path) -> tuple[str | None, dict]:
    """(method name or None, {field: value}) from `path`: a TOML file with a [method] table (its optional
    `method` key names the method), or a JSON run record (`run.json` of detect, evaluate or a sweep row:
    the method config it recorded). Errors name the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise FiseclipError(f"--config {path}: cannot read it ({err.strerror or err})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as err:
        raise FiseclipError(f"--config {path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: "
                            f"{str(err).splitlines()[0]}") from None
    table = _method_table(data)
    if not isinstance(table, Mapping):
        raise FiseclipError(f"--config {path}: no [method] table (nor the method config of a run.json) in it")
    table = dict(table)
    name = table.pop("method", None)
    table.pop("name", None)
    if name is not None and not isinstance(name, str):
        raise FiseclipError(f"--config {path}: method must be a method name, got {name!r}")
    return name, table


def _method_table(data):
    """The method config in a TOML table or a run record (evaluate/sweep: run_config.method_config;
    detect: config)."""
    if not isinstance(data, Mapping):
        return None
    if isinstance(data.get("method"), Mapping):
        return data["method"]
    run = data.get("run_config")
    if isinstance(run, Mapping):
        for k in ("method_config", "config"):
            if isinstance(run.get(k), Mapping):
                return run[k]
    for k in ("method_config", "config"):
        if isinstance(data.get(k), Mapping):
            return data[k]
    return None


def resolve_method(name: str | None = None, *, base=None, config=None, sets: Mapping[str, Any] | None = None,
                   run_options: Mapping[str, Any] | None = None):
    """The method a command runs: `base` (e.g. a protocol's) or the registered `name` (default fiseclip),
    then a --config file's values, then the run options given (`Method.with_run_options`), then --set."""
    file_name, file_values = load_config(config) if config else (None, {})
    if name and file_name and name != file_name:
        raise FiseclipError(f"--config {config} is for method {file_name}, but --method says {name}")
    if base is None or (file_name and file_name != base.label):
        base = methods.get(name or file_name or "fiseclip")
    method = apply_overrides(base, file_values, source=f"--config {config}") if file_values else base
    method = method.with_run_options(**(run_options or {}))
    return apply_overrides(method, sets or {}) if sets else method


__all__ = ["FieldInfo", "apply_overrides", "convert", "describe", "fields", "format_value", "load_config",
           "parse_assignments", "resolve_method", "type_text", "valid_keys"]
