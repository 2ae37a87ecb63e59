"""The pack's HTTP routes on a ComfyUI server, used by `python -m kb_tools build --workers`:

    GET  /redi/info                pack and KB format version
    GET  /redi/kbs                 the KB names the ReDi KB Loader lists (web/redi.js keeps its lists current)
    GET  /redi/kb/NAME/FILE        read-only: a file a KB's manifest lists (kb_tools.distributed.serve decides)
    POST /redi/kb/units/release    delete unit KBs of distributed builds once the coordinator has them
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from ..kb_tools.distributed import serve as kb_serve
from ..kb_tools.storage.disk_format import FORMAT_VERSION
from ..kb_tools.version import PACK_VERSION
from . import kb_types

_registered = False


def register() -> None:
    """Add the routes once (ComfyUI adds its route table to the app after loading the packs)."""
    global _registered
    if _registered:
        return
    server = kb_types.prompt_server()
    if server is None:
        return
    routes = server.routes
    _registered = True

    @routes.get("/redi/info")
    async def redi_info(request: web.Request) -> web.Response:
        return web.json_response({"pack": "ComfyUI-ReDi-Accelerate", "pack_version": PACK_VERSION, "kb_format_version": FORMAT_VERSION})

    @routes.get("/redi/kbs")
    async def redi_kbs(request: web.Request) -> web.Response:
        names = await asyncio.get_running_loop().run_in_executor(None, kb_types.list_kbs)
        return web.json_response({"kbs": names}, headers={"Cache-Control": "no-store"})

    @routes.get("/redi/kb/{kb}/{file}")
    async def redi_kb_file(request: web.Request) -> web.StreamResponse:
        try:
            path = kb_serve.resolve_kb_file(kb_types.kb_roots(), request.match_info["kb"], request.match_info["file"])
        except kb_serve.Refused as e:
            return web.json_response({"error": str(e)}, status=e.status)
        return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})

    @routes.post("/redi/kb/units/release")
    async def redi_release_units(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return web.json_response({"error": "expected a JSON object"}, status=400)
        try:
            gone = await asyncio.get_running_loop().run_in_executor(
                None, kb_serve.release_units, kb_types.kb_roots(), body.get("names", []), body.get("build", ""))
        except kb_serve.Refused as e:
            return web.json_response({"error": str(e)}, status=e.status)
        if gone:
            logging.info("[ReDi] released unit KBs: %s", ", ".join(gone))
        return web.json_response({"released": gone})
