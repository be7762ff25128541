"""Checks on a JSON request body before any route parses it: text must be valid Unicode (no lone surrogates, which
no tokenizer or UTF-8 encoder accepts) and nesting is bounded (no route needs more than a few levels; a 50,000-deep
array would exhaust the parser's recursion). A body that is not JSON at all is left to the route (its own 400/422).
"""

from __future__ import annotations

import json

MAX_JSON_DEPTH = 32


def text_problem(text: str) -> str | None:
    """Why `text` cannot be encoded as UTF-8 (a lone surrogate), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"a lone surrogate (\\u{ord(text[e.start]):04x}) at character {e.start}: text must be valid Unicode"
    return None


def json_body_problem(raw: bytes) -> str | None:
    """What makes this JSON body unservable (lone surrogates anywhere, nesting deeper than MAX_JSON_DEPTH), or None."""
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except RecursionError:
        return f"the JSON body is nested deeper than {MAX_JSON_DEPTH} levels"
    except ValueError:
        return None  # not JSON: the route answers with its own parse error
    stack: list[tuple[object, str, int]] = [(data, "body", 1)]
    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return f"the JSON body is nested deeper than {MAX_JSON_DEPTH} levels"
        if isinstance(value, str):
            problem = text_problem(value)
            if problem:
                return f"{where}: {problem}"
        elif isinstance(value, dict):
            for key, item in value.items():
                problem = text_problem(key)
                if problem:
                    return f"{where}: a key holds {problem}"
                stack.append((item, f"{where}.{key}", depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value))
    return None
