"""`key=literal,...` command-line settings, read as Python literals only (no code runs)."""

from __future__ import annotations

import ast


def keyword_literals(text: str, what: str) -> dict:
    """`"a=1,b=(2, 3)"` -> `{"a": 1, "b": (2, 3)}`; anything but keyword literals is refused, naming `what`."""
    try:
        call = ast.parse(f"f({text})", mode="eval").body
        settings = {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords}
        if call.args or None in settings:
            raise ValueError("positional arguments")
    except (SyntaxError, ValueError) as error:
        raise SystemExit(f"{what} is key=literal,... Received: {text!r} ({error})") from None
    return settings
