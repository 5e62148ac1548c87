"""Config models and YAML loading.

Every stage owns a pydantic model derived from `Config`; this module only loads YAML, applies
`--set a.b=c` overrides and turns pydantic's validation errors into one message a person can act on:
which file, which key, what was expected, and a "did you mean" for misspelled keys.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from fabrika.errors import FabrikaError


class Config(BaseModel):
    """Base of every config model: unknown keys are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_default=True, protected_namespaces=())


C = TypeVar("C", bound=BaseModel)
SECRET = re.compile(r"(^|_)(key|token|password|secret)(_|$)", re.IGNORECASE)  # values never echoed


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FabrikaError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise FabrikaError(f"{path}{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    except UnicodeDecodeError as e:
        raise FabrikaError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FabrikaError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides in place; the value is parsed as YAML (`3`, `true`, `[a, b]`)."""
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise FabrikaError(f"--set {item!r}: expected KEY=VALUE, e.g. --set stages.pretrain.train.lr=3e-4")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise FabrikaError(f"--set {item!r}: {part!r} holds a {type(child).__name__}, not a mapping")
            node = child
        node[parts[-1]] = value
    return data


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def interpolate(data: dict[str, Any]) -> dict[str, Any]:
    """Replace `${key}` in string values by the top-level scalar of that name (e.g. `runs/${name}`)."""
    scalars = {k: v for k, v in data.items() if isinstance(v, (str, int, float))}

    def sub(value: Any) -> Any:
        if isinstance(value, str):
            def one(m: re.Match) -> str:
                if m.group(1) not in scalars:
                    raise FabrikaError(f"${{{m.group(1)}}}: no top-level key {m.group(1)!r} to substitute")
                return str(scalars[m.group(1)])
            return _VAR.sub(one, value)
        if isinstance(value, dict):
            return {k: sub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [sub(v) for v in value]
        return value

    return sub(data)


def _fields_at(model: type[BaseModel] | None, loc: tuple) -> list[str]:
    """The field names valid at `loc` (a pydantic error location), to suggest a spelling from."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(part)
        if field is None:
            break
        current = field.annotation
        # Optional[Sub] / Sub | None: take the model inside.
        for arg in getattr(current, "__args__", ()) or ():
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                current = arg
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def describe_validation_error(err: ValidationError, model: type[BaseModel] | None, source: str,
                              prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in (prefix.split(".") if prefix else []) + list(loc))
        if e["type"] == "extra_forbidden":
            known = _fields_at(model, loc[:-1])
            guess = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"; did you mean {guess[0]!r}?" if guess else (f"; known keys: {', '.join(known)}" if known else "")
            lines.append(f"{source}: {key}: unknown key{hint}")
        else:
            got = e.get("input")
            secret = SECRET.search(str(loc[-1]) if loc else "")  # a key put in the wrong place stays unprinted
            shown = "" if isinstance(got, (dict, list)) or got is None or secret else f" (got {got!r})"
            lines.append(f"{source}: {key}: {e['msg']}{shown}")
    return "\n".join(lines)


def validate(model: type[C], data: Any, source: str, prefix: str = "") -> C:
    """`model.model_validate(data)`, with errors that name `source` and the dotted key."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise FabrikaError(describe_validation_error(err, model, source, prefix)) from None


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `top` over `base` (nested mappings merge, everything else is replaced)."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load(model: type[C], path: str | Path | None = None, flags: dict[str, Any] | None = None,
         overrides: list[str] | None = None) -> C:
    """Load a stage config: the YAML file, then command-line flags over it, then `--set` overrides."""
    data = load_yaml(path) if path is not None else {}
    data = merge(data, {k: v for k, v in (flags or {}).items() if v is not None})
    apply_overrides(data, overrides)
    return validate(model, data, str(path) if path else "command line")
