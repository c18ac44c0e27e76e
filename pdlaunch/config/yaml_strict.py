"""YAML with duplicate keys refused: PyYAML keeps the last of two equal keys without a word, so a
deployment file that sets `port` twice would silently run on the second value.
"""

from __future__ import annotations

from typing import Any

import yaml

from pdlaunch.config.problems import Problem, problem

_MERGE_TAG = "tag:yaml.org,2002:merge"  # `<<: *defaults` may be overridden by explicit keys


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that, before constructing, reports every key that appears twice in one mapping."""

    def __init__(self, text: str, source: str) -> None:
        super().__init__(text)
        self.source = source

    def duplicate_keys(self, node: yaml.Node, path: str, seen: set[int]) -> list[Problem]:
        if id(node) in seen:  # an alias to a node already walked (or a recursive anchor)
            return []
        seen.add(id(node))
        problems: list[Problem] = []
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                problems += self.duplicate_keys(item, f"{path}[{i}]", seen)
        elif isinstance(node, yaml.MappingNode):
            first_line: dict[str, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = str(key_node.value)
                child = f"{path}.{key}" if path else key
                line = key_node.start_mark.line + 1
                if key in first_line:
                    problems.append(problem(child, f"duplicate key `{key}` in {self.source} at line {line} (first at line "
                                            f"{first_line[key]}); YAML would silently keep only the last one",
                                            "keep one of the two"))
                else:
                    first_line[key] = line
                problems += self.duplicate_keys(value_node, child, seen)
        return problems


def load_strict(text: str, source: str) -> tuple[Any, list[Problem]]:
    """The document, and a problem for every duplicate key (named by its dotted path and line).

    Raises yaml.YAMLError for a syntax error, as yaml.safe_load does.
    """
    loader = StrictLoader(text, source)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, []
        problems = loader.duplicate_keys(node, "", set())
        return loader.construct_document(node), problems
    finally:
        loader.dispose()
