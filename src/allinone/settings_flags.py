"""Command-line flags built from the settings classes, so flags, environment variables and help
never drift apart (llama-cpp-python's server builds its flags the same way).

Every field ``foo_bar`` of a settings class becomes ``--foo-bar``, typed from the field, with the
field's description, default and environment variable (``ALLINONE_FOO_BAR``) in its help. A flag
left out is None and does not override the environment, ``.env`` or the default.
``given_flags`` writes the flags that were given back as a command line, for a child
``allinone serve`` (``allinone soak``).
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from pathlib import Path
from typing import Any

from pydantic_settings import BaseSettings

# Fields that are no flags: set through the environment only, or given a flag of their own.
_SKIP = {"tasks_dir"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _scalar(annotation: Any) -> tuple[Any, bool]:
    """(the non-None type of a field, whether it is a list)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _scalar(args[0]) if len(args) == 1 else (str, False)
    if origin is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def settings_group_title(cls: type[BaseSettings]) -> str:
    """The title of ``cls``'s flags in ``--help``."""
    return f"{cls.__name__} (flag > env ALLINONE_* > .env)"


def add_settings_flags(parser: argparse.ArgumentParser, *classes: type[BaseSettings]) -> None:
    """Add one flag per field of each settings class (fields already present are skipped)."""
    taken = {a.dest for a in parser._actions}
    for cls in classes:
        group = parser.add_argument_group(settings_group_title(cls))
        for name, field in cls.model_fields.items():
            if name in _SKIP or name in taken:
                continue
            taken.add(name)
            kind, is_list = _scalar(field.annotation)
            # The field's own default (a factory's value on this host: threads, cache_dir); the
            # flag's default stays None so that a flag left out does not hide the environment.
            default = field.get_default(call_default_factory=True)
            if is_list:
                default = json.dumps(default, ensure_ascii=False)
            help_ = f"{field.description or ''} (default: {default}; env ALLINONE_{name.upper()})"
            kwargs: dict[str, Any] = {
                "dest": name,
                "default": None,
                "help": help_.replace("%", "%%"),
            }
            if kind is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            elif is_list:
                kwargs["type"] = json.loads
                kwargs["metavar"] = "JSON_LIST"
            elif typing.get_origin(kind) is typing.Literal:
                kwargs["choices"] = typing.get_args(kind)
            elif kind in (int, float, Path):
                kwargs["type"] = kind
            group.add_argument(_flag(name), **kwargs)


def _given(args: argparse.Namespace, cls: type[BaseSettings]) -> dict[str, Any]:
    # An append flag given no value (``[]``) is "not given": it must not hide the env variable
    # (ALLINONE_TASKS_DIR was ignored by ``serve`` that way).
    return {
        name: getattr(args, name)
        for name in cls.model_fields
        if getattr(args, name, None) not in (None, [])
    }


def settings_from_flags(args: argparse.Namespace, cls: type[BaseSettings], **extra: Any):
    """An instance of ``cls`` with every flag that was given (and ``extra``) overriding."""
    given = _given(args, cls)
    given.update({k: v for k, v in extra.items() if v is not None})
    return cls(**given)


def given_flags(
    args: argparse.Namespace, *classes: type[BaseSettings], skip: tuple[str, ...] = ()
) -> list[str]:
    """The flags of ``classes``' fields that were given, as a command line that
    ``add_settings_flags`` parses back to the same values (fields in ``skip`` left out)."""
    out: list[str] = []
    for cls in classes:
        for name, value in _given(args, cls).items():
            if name in _SKIP or name in skip:
                continue
            if isinstance(value, bool):
                out.append(_flag(name) if value else "--no-" + name.replace("_", "-"))
            elif isinstance(value, list):
                out += [_flag(name), json.dumps(value, ensure_ascii=False)]
            else:
                out += [_flag(name), str(value)]
    return out
