"""Recipe checks that need the installed node types: params, inputs, ports, input counts, cycles."""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import Any

from cpcli.errors import NodeConfigError
from cpcli.graph import find_cycle, format_cycle
from cpcli.registry import NodeType, check_value

Problems = list[tuple[int, str]]
"""Problems found so far, as (1-based line, message without the `file:line: ` prefix)."""


@dataclass
class Draft:
    """What was read of one node so far; the lines point at the keys that set each field."""

    id: str
    line: int
    type: str = ""
    node_type: NodeType | None = None
    params: dict[str, Any] = field(default_factory=dict)
    param_lines: dict[str, int] = field(default_factory=dict)
    params_line: int = 0
    params_ok: bool = True  # False once a param could not be read, so its type checks would mislead
    worker: str | None = None
    record: bool = False
    inputs: list[tuple[str, int]] = field(default_factory=list)
    inputs_line: int = 0
    inputs_ok: bool = True  # False once an input could not be read, so counting them would mislead
    sync: str = "latest"
    tolerance_ms: float = 0.0

    @property
    def where(self) -> str:
        return f"node {self.id}: "


def show(value: Any) -> str:
    """A value as a message shows it: its YAML type and a short repr."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"bool {str(value).lower()}"
    if isinstance(value, (dict, list)):
        return "a mapping" if isinstance(value, dict) else "a list"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def did_you_mean(word: str, choices: list[str]) -> str:
    """`; did you mean 'x'?` for the closest choice, or nothing if none is close."""
    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _takes_any_keyword(cls: type) -> bool:
    """Whether a node's __init__ has **kwargs, so params beyond its signature are its own business."""
    init = cls.__init__  # type: ignore[misc]
    if init is object.__init__:  # object's (*args, **kwargs) accepts nothing in practice
        return False
    try:
        return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(init).parameters.values())
    except (TypeError, ValueError):
        return False


def param_problems(node_type: NodeType, params: dict[str, Any]) -> list[str]:
    """What is wrong with params that came over the network: unknown names, wrong types, missing ones.

    A worker checks these before a node process starts (the sender's own recipe check cannot be
    trusted); the node's constructor is not called here, its process does that.
    """
    specs = {spec.name: spec for spec in node_type.params}
    problems = []
    for name, value in params.items():
        spec = specs.get(name)
        if spec is None and not _takes_any_keyword(node_type.cls):
            problems.append(f"unknown param {name[:40]!r} for {node_type.name}")
        elif spec is not None and not check_value(value, spec.annotation):
            problems.append(f"param {name!r} of {node_type.name} must be {spec.type_name}, got {show(value)}")
    problems.extend(f"missing required param {spec.name!r} for {node_type.name}" for spec in node_type.params
                    if spec.required and spec.name not in params)
    return problems


def check_params(draft: Draft, problems: Problems) -> None:
    """Check a node's params against its type's signature; if they fit, let the node check them."""
    node_type = draft.node_type
    if node_type is None or not draft.params_ok:
        return
    where = draft.where
    specs = {spec.name: spec for spec in node_type.params}
    accepts = f"(accepts: {', '.join(specs)})" if specs else "(it takes no params)"
    count = len(problems)
    for name, value in draft.params.items():
        spec = specs.get(name)
        line = draft.param_lines[name]
        if spec is None and not _takes_any_keyword(node_type.cls):
            hint = did_you_mean(name, list(specs))
            problems.append((line, f"{where}unknown param {name!r} for {node_type.name}{hint} {accepts}"))
        elif spec is not None and not check_value(value, spec.annotation):
            wanted = f"{spec.type_name}, got {show(value)}"
            problems.append((line, f"{where}param {name!r} of {node_type.name} must be {wanted}"))
    for spec in node_type.params:
        if spec.required and spec.name not in draft.params:
            problems.append(
                (
                    draft.params_line,
                    f"{where}missing required param {spec.name!r} ({spec.type_name}) for {node_type.name}; "
                    f"add it under params:",
                )
            )
    if len(problems) > count:
        return  # a TypeError from the constructor would only repeat these, less clearly
    try:
        node_type.cls(**draft.params)
    except NodeConfigError as err:
        problems.append((draft.params_line, f"{where}{err}"))
    except Exception as err:  # a plugin's __init__ may fail any way; that is a problem, not a crash
        problems.append((draft.params_line, f"{where}{node_type.name}(...) raised {type(err).__name__}: {err}"))


def check_wiring(drafts: list[Draft], problems: Problems) -> list[tuple[str, str, str, str]]:
    """Resolve every input to an upstream node and port; check input counts and cycles.

    Returns:
        the edges as (source, port, target, key), in node order then input order.
    """
    by_id = {draft.id: draft for draft in drafts}  # unique: a repeated id is reported, not drafted
    edges: list[tuple[str, str, str, str]] = []
    links: dict[tuple[str, str], tuple[int, str]] = {}  # (source, target) -> line, input as written
    for draft in drafts:
        where = draft.where
        written: dict[str, int] = {}
        resolved: dict[tuple[str, str], str] = {}
        for text, line in draft.inputs:
            if text in written:
                problems.append((line, f"{where}input {text!r} is listed twice (first at line {written[text]})"))
                continue
            written[text] = line
            source_id, dot, port = text.partition(".")
            source = by_id.get(source_id)
            if source is None:
                hint = did_you_mean(source_id, list(by_id)) or f" (nodes: {', '.join(by_id)})"
                problems.append((line, f"{where}input {text!r}: there is no node {source_id!r}{hint}"))
                continue
            links.setdefault((source_id, draft.id), (line, text))
            port = _resolve_port(draft, source, text, port if dot else None, line, problems)
            if not port:
                continue
            if (source_id, port) in resolved:
                first = resolved[(source_id, port)]
                problems.append((line, f"{where}input {text!r} repeats {first!r}: both read {source_id}.{port}"))
                continue
            resolved[(source_id, port)] = text
            edges.append((source_id, port, draft.id, text))
        _check_input_count(draft, len(written), problems)
    _check_cycles([draft.id for draft in drafts], links, problems)
    return edges


def _resolve_port(draft: Draft, source: Draft, text: str, port: str | None, line: int, problems: Problems) -> str:
    """The output port an input reads, or "" after recording why it cannot be known."""
    node_type = source.node_type
    if node_type is None:
        return ""  # the source's type is unknown; that is reported on its own line
    outputs = list(node_type.outputs)
    listed = ", ".join(outputs) or "none"
    about = f"{draft.where}input {text!r}: {source.id} ({node_type.name})"
    if port is not None:
        if port in outputs:
            return port
        problems.append((line, f"{about} has no output {port!r}{did_you_mean(port, outputs)} (outputs: {listed})"))
    elif len(outputs) == 1:
        return outputs[0]
    elif not outputs:
        problems.append((line, f"{about} has no outputs to read"))
    else:
        example = f"{source.id}.{outputs[0]}"
        problems.append((line, f"{about} has several outputs ({listed}); name one, e.g. {example!r}"))
    return ""


def _check_input_count(draft: Draft, count: int, problems: Problems) -> None:
    node_type = draft.node_type
    if node_type is None or not draft.inputs_ok:
        return
    wanted = node_type.cls.input_count
    line = draft.inputs_line or draft.line
    name = f"{draft.where}{node_type.name}"
    if wanted == 0 and count:
        problems.append((line, f"{name} is a source and takes no inputs; remove inputs:"))
    elif wanted is None and not count:
        problems.append((line, f"{name} needs at least one input; add e.g. inputs: [some_node]"))
    elif wanted and count != wanted:
        plural = "input" if wanted == 1 else "inputs"
        problems.append((line, f"{name} takes exactly {wanted} {plural}, got {count}"))


def _check_cycles(ids: list[str], links: dict[tuple[str, str], tuple[int, str]], problems: Problems) -> None:
    """Name every independent cycle: report one, cut the input that closes it, look again."""
    remaining = dict(links)
    while (cycle := find_cycle(ids, list(remaining))) is not None:
        closing = (cycle[-2], cycle[-1])
        line, text = remaining.pop(closing)
        problems.append(
            (
                line,
                f"{format_cycle(cycle)}; data cannot flow in a loop, remove one of these inputs "
                f"(this one is node {closing[1]}'s input {text!r})",
            )
        )
