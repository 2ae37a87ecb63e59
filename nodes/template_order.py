"""The pack's templates in the order of their numbers in the template browser.

ComfyUI (0.3.75) lists a pack's example_workflows/*.json in the order the file system returns them,
and the frontend (1.32.9) shows them in that order under its default sort. This middleware sorts
this pack's list (and no other pack's) in the /workflow_templates answer, so the templates read
1 to 12."""

from __future__ import annotations

import json
import os

from aiohttp import web

from . import kb_types

EXAMPLES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "example_workflows")
_registered = False


def own_templates() -> set[str]:
    return {f[:-5] for f in os.listdir(EXAMPLES_DIR) if f.endswith(".json")} if os.path.isdir(EXAMPLES_DIR) else set()


def _number_first(name: str) -> tuple[int, str]:
    head = name.split(" ", 1)[0]
    return (int(head) if head.isdigit() else 1 << 30, name)


def sort_own(listing: dict[str, list[str]], own: set[str]) -> dict[str, list[str]]:
    """The /workflow_templates answer with the list that holds exactly this pack's templates sorted
    by their numbers (10 after 9)."""
    return {pack: sorted(names, key=_number_first) if own and set(names) == own else names for pack, names in listing.items()}


@web.middleware
async def sort_templates(request: web.Request, handler):
    response = await handler(request)
    if request.path.rstrip("/") not in ("/workflow_templates", "/api/workflow_templates") or not isinstance(response, web.Response):
        return response
    try:
        listing = json.loads(response.body)
    except (TypeError, ValueError):
        return response
    return web.json_response(sort_own(listing, own_templates()) if isinstance(listing, dict) else listing)


def register() -> None:
    """Add the middleware once, while the server's app can still take one (before it starts)."""
    global _registered
    if _registered:
        return
    app = getattr(kb_types.prompt_server(), "app", None)
    if app is None or app.frozen:
        return
    app.middlewares.append(sort_templates)
    _registered = True
