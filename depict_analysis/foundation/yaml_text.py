"""Reading YAML that a user or a file supplies, with alias expansion bounded.

YAML anchors and aliases let a 400-byte document stand for billions of nodes (``a: &a [x, x, x]``,
``b: &b [*a, *a, *a]``, ...): parsed, it is small, but anything that walks it (a check, a message
quoting it, a copy) never ends. ``load_yaml`` counts the nodes the document stands for, every alias
expanded, before building any object, and refuses a document over ``MAX_NODES`` nodes, one that
refers to itself, or one nested too deeply to parse.
"""

from __future__ import annotations

from typing import Any

import yaml

from depict_analysis.foundation.errors import InputError

MAX_NODES = 100_000  # far above any config, class list or release file; far below what hangs a walk


def _expanded_size(node: yaml.Node, limit: int, source: str) -> int:
    """Nodes under ``node`` with every alias expanded (each shared node counted once per use)."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(n: yaml.Node) -> int:
        key = id(n)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise InputError(f"{source}: an alias refers to a node that contains it (a recursive YAML document); refused")
        open_nodes.add(key)
        total = 1
        if isinstance(n, yaml.SequenceNode):
            children = n.value
        elif isinstance(n, yaml.MappingNode):
            children = [item for pair in n.value for item in pair]
        else:
            children = []
        for child in children:
            total += size(child)
            if total > limit:
                raise InputError(f"{source}: its aliases expand to more than {limit:,} nodes; refused (a YAML alias bomb?)")
        open_nodes.discard(key)
        sizes[key] = total
        return total

    return size(node)


def load_yaml(text: str, source: str, loader: type[yaml.SafeLoader] = yaml.SafeLoader, max_nodes: int = MAX_NODES) -> Any:
    """``yaml.load(text, loader)`` once the document is known to stand for at most ``max_nodes`` nodes;
    ``source`` names the text in errors. Syntax errors stay ``yaml.YAMLError`` (the caller knows what
    was expected); an oversized, recursive or too deeply nested document is an ``InputError``."""
    parser = loader(text)
    try:
        node = parser.get_single_node()
        if node is None:
            return None
        _expanded_size(node, max_nodes, source)
        return parser.construct_document(node)
    except RecursionError:
        raise InputError(f"{source}: nested too deeply to read; refused") from None
    finally:
        parser.dispose()
