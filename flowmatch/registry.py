"""Names -> implementations, each checking the arguments a config section gives it.

A tagged config section names its implementation with a key (``model.arch``, ``data.kind``,
``path.scheduler``, ``train.time_sampler.name``, ``train.coupling.name``) and passes the section's
other keys to it. A :class:`Registry` is that explicit table (no import strings) plus the checks of
its arguments, so each registry lives beside its pieces and the schema (:mod:`flowmatch.config`)
needs to know none of them::

    COUPLINGS = Registry("train.coupling", "name", {"none": NoCoupling, "sinkhorn": SinkhornCoupling})
    COUPLINGS.resolve("sinkhorn", {"reg": 0.1})  # {'reg': 0.1, 'iters': 100, 'tol': 0.001}
    COUPLINGS.build("sinkhorn", {"reg": 0})      # ConfigError: train.coupling.reg: must be > 0, got 0.0

The schema of an entry is its constructor's signature, or its fields for a config dataclass; the
values are type-checked by :func:`flowmatch.config.check_value`, the one type checker of the
configuration. Every mistake is a one-line :class:`~flowmatch.config.ConfigError` naming the dotted
key. A registry is a mutable mapping ``name -> entry``, so code that reads (or extends) the old
plain dicts keeps working.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

from flowmatch.config import ConfigError, check_value

__all__ = ["REQUIRED", "Registry", "config_errors", "params_schema"]

#: The default of an argument the config must give.
REQUIRED: Any = inspect.Parameter.empty


def params_schema(target: Any, hidden: Iterable[str] = ()) -> dict[str, tuple[Any, Any]]:
    """``{name: (annotation, default)}`` of a dataclass's fields or a callable's keyword arguments.

    ``default`` is :data:`REQUIRED` for an argument without one; ``hidden`` arguments (set by the
    caller itself, never by a config) and ``*args`` / ``**kwargs`` are left out."""
    hidden = set(hidden)
    hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    if dataclasses.is_dataclass(target):
        out = {}
        for f in dataclasses.fields(target):
            if f.name in hidden or not f.init:
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = REQUIRED
            out[f.name] = (hints.get(f.name, Any), default)
        return out
    out = {}
    for name, p in inspect.signature(target).parameters.items():
        if name in hidden or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        out[name] = (hints.get(name, Any), p.default)
    return out


# "reg must be > 0" or "DiTConfig.depth must be >= 1": a message that starts with an argument's name.
_LEADING_NAME = re.compile(r"^(?:[A-Za-z_]\w*\.)?([A-Za-z_]\w*)\s+(.*)$", re.DOTALL)


@contextmanager
def config_errors(section: str, keys: Iterable[str] = ()):
    """Turn a ValueError / TypeError raised inside into a :class:`ConfigError` naming the section.

    Constructors say what is wrong in their own words ("reg must be > 0, got 0.0"); when the
    message starts with one of ``keys`` the error names that key: "train.coupling.reg: must be > 0,
    got 0.0", otherwise the section: "path: need 0 <= beta_min <= beta_max ...". A ConfigError
    passes through unchanged."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        msg = " ".join(str(e).split())  # one line, whatever the constructor wrote
        m = _LEADING_NAME.match(msg)
        if m and m.group(1) in set(keys):
            raise ConfigError(f"{section}.{m.group(1)}: {m.group(2)}") from None
        raise ConfigError(f"{section}: {msg}") from None


class Registry(MutableMapping):
    """The implementations one tagged config section can name, and the checks of their arguments.

    Args:
        section: the dotted config section, e.g. ``"train.coupling"`` (used in error messages).
        tag: the section's key that names the implementation, e.g. ``"name"``.
        entries: ``name -> entry``.
        constructor: the part of an entry whose signature is the schema and which :meth:`build`
            calls (default: the entry itself; e.g. ``lambda e: e[0]`` for ``(ConfigClass, Module)``).
        hidden: constructor arguments the caller sets itself, so a config must not offer them.
    """

    def __init__(self, section: str, tag: str, entries: dict[str, Any] | None = None, *,
                 constructor: Callable[[Any], Any] | None = None, hidden: Iterable[str] = ()):
        self.section = section
        self.tag = tag
        self._entries: dict[str, Any] = dict(entries or {})
        self._constructor = constructor or (lambda entry: entry)
        self.hidden = frozenset(hidden)

    # -- the mapping -------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Any:
        return self._entries[name]

    def __setitem__(self, name: str, entry: Any) -> None:
        self._entries[name] = entry

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.section!r}, {self.tag!r}, {self._entries!r})"

    # -- config checks -----------------------------------------------------------------------
    def constructor(self, name: str) -> Any:
        """What :meth:`build` calls for ``name``; an unknown name is a ConfigError listing the valid ones."""
        if name not in self._entries:
            raise ConfigError(f"{self.section}.{self.tag}: unknown value {name!r} "
                              f"(valid: {', '.join(sorted(self._entries))})")
        return self._constructor(self._entries[name])

    def schema(self, name: str) -> dict[str, tuple[Any, Any]]:
        """``{argument: (annotation, default)}`` that a config may give ``name``."""
        return params_schema(self.constructor(name), self.hidden)

    def resolve(self, name: str, params: dict[str, Any]) -> dict[str, Any]:
        """``params`` checked against ``name``'s schema, every default filled in (a new dict).

        Raises ConfigError naming the dotted key for an unknown name or key, a wrong type or a
        missing required argument. Idempotent: resolving resolved params returns equal params."""
        schema = self.schema(name)
        out = {}
        for k, v in params.items():
            if k not in schema:
                valid = ", ".join(sorted(schema)) or "none"
                raise ConfigError(f"{self.section}.{k}: unknown key for {self.tag} {name!r} (valid: {valid})")
            out[k] = check_value(f"{self.section}.{k}", v, schema[k][0])
        for k, (_, default) in schema.items():
            if k not in out:
                if default is REQUIRED:
                    raise ConfigError(f"{self.section}.{k}: required for {self.tag} {name!r}")
                out[k] = default
        return out

    def build(self, name: str, params: dict[str, Any]) -> Any:
        """``name``'s constructor called with the resolved ``params``; its own ValueError or
        TypeError (an impossible value) becomes a ConfigError naming the key (:func:`config_errors`)."""
        params = self.resolve(name, params)
        with config_errors(self.section, params):
            return self.constructor(name)(**params)
