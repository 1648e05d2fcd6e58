"""Writing HTML safely: the one escaping helper of the pages."""

from __future__ import annotations

import html
from typing import Any


def h(value: Any) -> str:
    """HTML-escaped text (quotes too, so it is safe inside attributes)."""
    return html.escape(str(value), quote=True)
