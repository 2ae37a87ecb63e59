"""The pack loads in a real ComfyUI with no error and presents itself properly."""

import json
import urllib.request

import pytest

pytestmark = pytest.mark.integration


def test_pack_imports_without_error(server):
    log = server.log()
    assert "ComfyUI-ReDi-Accelerate" in log, log[-3000:]
    lines = [ln for ln in log.splitlines() if "ReDi" in ln or "redi" in ln.lower()]
    assert not any("IMPORT FAILED" in ln or "Traceback" in ln for ln in lines), "\n".join(lines)
    assert "(IMPORT FAILED)" not in log


def test_nodes_listed_with_tooltips_and_ids(server):
    info = server.get("/object_info")
    ours = {k: v for k, v in info.items() if k.startswith("ReDi")}
    assert ours, "no ReDi nodes in /object_info"
    for node_id, node in ours.items():
        assert node["category"].startswith("ReDi/"), node_id
        for section in ("required", "optional"):
            for name, spec in node["input"].get(section, {}).items():
                opts = spec[1] if len(spec) > 1 else {}
                assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_web_extension_served(server):
    exts = server.get("/extensions")
    ours = [e for e in exts if "ComfyUI-ReDi-Accelerate" in e]
    assert any(e.endswith("redi.js") for e in ours), exts
    with urllib.request.urlopen(server.base + ours[0], timeout=10) as r:
        assert b"registerExtension" in r.read()


def test_demo_checkpoint_listed(server):
    ckpts = server.get("/object_info/CheckpointLoaderSimple")["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert "redi_demo_shapes.safetensors" in ckpts, json.dumps(ckpts)
