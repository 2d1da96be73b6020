"""Paths to fields inside a JSON body, and walking them in reading order.

A path is dotted names with `[]` for "every element of this array" and a final `**` for "every
string below, object keys included" (a JSON schema, whose property names the model reads too):

    messages[].content            the string content of every message
    messages[].content[].text     the text of every content part
    tools[].function.parameters.** every name and string inside a tool's schema

The paths of one set compile into one tree, ordered as the paths were first listed. Walking it
visits each array element completely before the next, so texts come out in the order the model
reads them (message 1's name, content and tool-call arguments, then message 2's, …), which lets a
guard find a word split across two messages or two parts. A walk never parses anything: it reads
the already-decoded body.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

EACH = "[]"
EVERYTHING = "**"


@dataclass
class _Node:
    children: dict[str, "_Node"] = field(default_factory=dict)
    terminal: bool = False  # a string here is one of the set's fields
    everything: bool = False  # every string below (keys included) is
    path: str = ""  # the text form of the path to here (Location.path), made once when compiled


@dataclass(frozen=True)
class Location:
    """One string a walk found: where it lives (to replace it) and which elements led there."""

    parent: Any  # the dict or list holding the string
    key: Any  # its key or index in `parent`
    text: str
    path: str  # the compiled path's text form, with `[]` for arrays
    indexes: tuple  # per array on the way: the element's own "index" field when it has one, else its position


def _parse(path: str) -> list[str]:
    segments: list[str] = []
    for part in path.split("."):
        while part.endswith(EACH):
            part = part[: -len(EACH)]
            if part:
                segments.append(part)
            part = ""
            segments.append(EACH)
        if part:
            segments.append(part)
    return segments


class FieldSet:
    """A compiled set of paths, walked in the order they were listed."""

    def __init__(self, *paths: str) -> None:
        self.paths = tuple(paths)
        self._root = _Node()
        for path in paths:
            node = self._root
            segments = _parse(path)
            for position, segment in enumerate(segments):
                if segment == EVERYTHING:
                    if position != len(segments) - 1:
                        raise ValueError(f"'**' must end a path: {path}")
                    node.everything = True
                    break
                if segment not in node.children:
                    below = node.path + EACH if segment == EACH else (f"{node.path}.{segment}" if node.path else segment)
                    node.children[segment] = _Node(path=below)
                node = node.children[segment]
            else:
                node.terminal = True

    def __bool__(self) -> bool:
        return bool(self.paths)

    def __iter__(self):
        return iter(self.paths)

    def locations(self, value: Any) -> list[Location]:
        """Every string of the set in `value`, in reading order."""
        found: list[Location] = []
        _walk(value, self._root, None, None, (), found)
        return found

    def texts(self, value: Any) -> list[str]:
        """Every string of the set in `value`, in reading order: what `locations` finds, without
        keeping where (the guards and the quota estimate read every request's texts)."""
        found: list[str] = []
        _collect(value, self._root, found)
        return found


def _collect(value: Any, node: _Node, found: list[str]) -> None:
    # The same order as _walk, appending instead of yielding: no generator per level.
    if node.terminal and isinstance(value, str):
        found.append(value)
    if node.everything:
        found.extend(location.text for location in _everything(value, None, None, "", ()))
        return
    children = node.children
    if not children:
        return
    if isinstance(value, list):
        each = children.get(EACH)
        if each is not None:
            for item in value:
                _collect(item, each, found)
    elif isinstance(value, dict):
        for name, child in children.items():
            if name != EACH and name in value:
                _collect(value[name], child, found)


def _walk(value: Any, node: _Node, parent: Any, key: Any, indexes: tuple, found: list[Location]) -> None:
    if node.terminal and isinstance(value, str):
        found.append(Location(parent, key, value, node.path, indexes))
    if node.everything:
        found.extend(_everything(value, parent, key, node.path, indexes))
        return
    children = node.children
    if not children:
        return
    if isinstance(value, list):
        each = children.get(EACH)
        if each is not None:
            for position, item in enumerate(value):
                own = item.get("index") if isinstance(item, dict) else None
                identity = own if isinstance(own, int) and not isinstance(own, bool) else position
                _walk(item, each, value, position, indexes + (identity,), found)
    elif isinstance(value, dict):
        for name, child in children.items():
            if name != EACH and name in value:
                _walk(value[name], child, value, name, indexes, found)


def _everything(value: Any, parent: Any, key: Any, path: str, indexes: tuple) -> Iterator[Location]:
    stack = [(value, parent, key)]
    while stack:
        item, holder, name = stack.pop()
        if isinstance(item, str):
            yield Location(holder, name, item, path, indexes)
        elif isinstance(item, dict):
            children = []
            for child_key, child in item.items():
                children.append((child_key, None, None))  # a property name is read too (not replaceable)
                children.append((child, item, child_key))
            stack.extend(reversed(children))
        elif isinstance(item, list):
            stack.extend(reversed([(child, item, position) for position, child in enumerate(item)]))


def replace(location: Location, text: str) -> None:
    """Put `text` where `location` was found (not for object keys found by `**`)."""
    if location.parent is not None:
        location.parent[location.key] = text
