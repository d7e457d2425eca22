"""Text templates with `{name}` / `{name.sub}` placeholders, shared by the agent's edge transforms
(derived fields) and HQ's route mappings, so one template means the same thing on both sides.

Nothing in a template is ever evaluated: `parse_template` splits the text into literal strings and
placeholder paths once, when the config loads; each side renders the parts against its own values.
`{{` and `}}` are literal braces. A placeholder path is names (letters, digits, _; not starting
with a digit) joined by dots; a segment after the first may be a list position (`members.0.name`).
"""

from __future__ import annotations

import re

__all__ = ["PLACEHOLDER", "TemplatePart", "parse_template"]

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
#: What may stand between the braces of a placeholder.
PLACEHOLDER = re.compile(rf"{_NAME}(?:\.(?:{_NAME}|[0-9]+))*")

#: A literal piece of text, or a placeholder's path split at its dots.
TemplatePart = str | tuple[str, ...]


def parse_template(text: str) -> tuple[TemplatePart, ...]:
    """Split template text into literals and placeholder paths; ValueError names the problem."""
    parts: list[TemplatePart] = []
    literal: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char in "{}" and text.startswith(char * 2, i):
            literal.append(char)
            i += 2
        elif char == "{":
            end = text.find("}", i + 1)
            if end < 0:
                raise ValueError(f"'{{' at position {i} is never closed (write '{{{{' for a brace)")
            inner = text[i + 1 : end]
            if not PLACEHOLDER.fullmatch(inner):
                raise ValueError(
                    f"bad placeholder {{{inner}}} at position {i}: write {{name}} or {{name.sub}} "
                    "(letters, digits and _)"
                )
            if literal:
                parts.append("".join(literal))
                literal = []
            parts.append(tuple(inner.split(".")))
            i = end + 1
        elif char == "}":
            raise ValueError(f"'}}' at position {i} closes nothing (write '}}}}' for a brace)")
        else:
            literal.append(char)
            i += 1
    if literal:
        parts.append("".join(literal))
    return tuple(parts)
