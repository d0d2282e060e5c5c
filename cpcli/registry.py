"""Node types installed here: the `cpcli.nodes` entry points and their parameters."""

from __future__ import annotations

import inspect
import types
import typing
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from cpcli.errors import NodeConfigError
from cpcli.node import Node

ENTRY_POINT_GROUP = "cpcli.nodes"
_NO_DEFAULT = inspect.Parameter.empty


@dataclass(frozen=True)
class ParamSpec:
    """One keyword-only parameter of a node type."""

    name: str
    annotation: Any
    type_name: str
    required: bool
    default: Any = None


@dataclass(frozen=True)
class NodeType:
    """An installed node type: its class, where it came from, its parameters."""

    name: str
    cls: type[Node]
    origin: str
    doc: str
    params: tuple[ParamSpec, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class Registry:
    """Every node type found, and the entry points that failed to load (with why)."""

    types: dict[str, NodeType]
    broken: dict[str, str]

    def get(self, name: str) -> NodeType | None:
        return self.types.get(name)


def _type_name(annotation: Any) -> str:
    if annotation is _NO_DEFAULT:
        return "any"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def describe(name: str, cls: type[Node], origin: str = "") -> NodeType:
    """Read a node class's keyword-only parameters, outputs and one-line doc."""
    if not (isinstance(cls, type) and issubclass(cls, Node)):
        raise NodeConfigError(f"node type {name!r} ({origin}) is not a subclass of cpcli.node.Node")
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an unresolvable annotation in a plugin: check nothing rather than fail
        hints = {}
    params = []
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.name == "self" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        annotation = hints.get(p.name, p.annotation)
        params.append(
            ParamSpec(
                name=p.name,
                annotation=annotation,
                type_name=_type_name(annotation),
                required=p.default is _NO_DEFAULT,
                default=None if p.default is _NO_DEFAULT else p.default,
            )
        )
    doc = (inspect.getdoc(cls) or "").strip().splitlines()
    return NodeType(
        name=name,
        cls=cls,
        origin=origin or f"{cls.__module__}:{cls.__qualname__}",
        doc=doc[0] if doc else "",
        params=tuple(params),
        outputs=tuple(cls.outputs),
    )


def load_registry() -> Registry:
    """Load every node type registered under the `cpcli.nodes` entry-point group."""
    found: dict[str, NodeType] = {}
    broken: dict[str, str] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found:
            continue  # the first distribution to register a name keeps it
        try:
            found[ep.name] = describe(ep.name, ep.load(), ep.value)
        except Exception as err:  # a broken plugin must not hide the working ones
            broken[ep.name] = f"{type(err).__name__}: {err}"
    return Registry(types=dict(sorted(found.items())), broken=broken)


def check_value(value: Any, annotation: Any) -> bool:
    """Whether a recipe value (plain YAML data) fits a parameter's annotation."""
    if annotation is _NO_DEFAULT or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(check_value(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple, typing.Sequence) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(check_value(v, a) for v, a in zip(value, args, strict=True))
        return not args or all(check_value(v, args[0]) for v in value)
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            return False
        return not args or all(check_value(k, args[0]) and check_value(v, args[1]) for k, v in value.items())
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True  # an annotation we cannot judge: leave it to the node's own checks
