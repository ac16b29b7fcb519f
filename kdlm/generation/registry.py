"""Name -> object registries for what generation recipes name (pipelines, verifiers, filters).

Configs name things and never import code: registering a name twice is a ValueError (a programming
error), and an unknown name is a ConfigError naming the recipe field and the nearest valid name. Each
module keeps its own plain dict and passes it in.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable

from kdlm.errors import ConfigError


def register_into(items: dict[str, Any], kind: str, name: str) -> Callable[[Any], Any]:
    """A decorator that adds its object to `items` under `name`, refusing a name already taken."""
    def decorator(obj: Any) -> Any:
        if name in items:
            raise ValueError(f"{kind} {name!r} is already registered")
        items[name] = obj
        return obj
    return decorator


def look_up(items: dict[str, Any], kind: str, field: str, name: str) -> Any:
    """items[name], or a ConfigError like `generate.filters: unknown filter 'x'; did you mean 'y'? (valid: ...)`."""
    if name not in items:
        valid = sorted(items)
        close = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.0)  # cutoff 0: always a suggestion
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{field}: unknown {kind} {name!r}{hint} (valid: {', '.join(valid)})")
    return items[name]
