"""The library through the real server: a stock KSampler with ReDi Record fills it, ReDi KSampler
with `library` set uses it (no KB to build) and says which KB it used."""

import time

import pytest

from redi_demo import workflows

pytestmark = pytest.mark.integration


def _report(entry: dict) -> list[str]:
    return [ln for out in entry["outputs"].values() for ln in out.get("redi_report", [])]


def _count(server, library: str) -> int:
    from kb_tools.library import Library

    kbs = Library(server.kb_dir / library).list()
    return sum(k.count for k in kbs)


def _wait_count(server, library: str, n: int, timeout: float = 60.0) -> int:
    end = time.time() + timeout
    while time.time() < end and _count(server, library) < n:
        time.sleep(0.2)  # the recorder writes in the background, after the output
    return _count(server, library)


def test_redi_record_and_library_through_the_server(server):
    lib = "server_library"
    for seed in (11, 12):
        entry = server.run(workflows.redi_record(seed=seed, library=lib))
        assert entry["status"]["status_str"] == "success", server.error_of(entry)
    assert _wait_count(server, lib, 2) == 2
    entry = server.run(workflows.redi_record(seed=11, library=lib))  # a duplicate (same prompt and seed)
    assert entry["status"]["status_str"] == "success", server.error_of(entry)
    time.sleep(1.0)
    assert _count(server, lib) == 2
    entry = server.run(workflows.redi_library(seed=11, library=lib))
    assert entry["status"]["status_str"] == "success", server.error_of(entry)
    lines = _report(entry)
    assert lines[0].startswith(f"library {lib}: KB redidemoshap-euler-normal-20s-cfg6-8x8-") and ", 2 trajectories;" in lines[0], lines
    assert str(server.kb_dir) not in "\n".join(lines)  # the KB's name, never a server path
    assert any("jumped from step 3 to step" in ln for ln in lines), lines

    # the library's KB is listed for the ReDi KB Loader (LIBRARY/NAME) and serves ReDi Sampler through it
    from kb_tools.library import Library

    (kb,) = [k.name for k in Library(server.kb_dir / lib).list()]
    assert f"{lib}/{kb}" in server.get("/redi/kbs")["kbs"]
    spec = server.get("/object_info/ReDiKBLoader")["ReDiKBLoader"]["input"]["required"]["kb_name"]
    assert f"{lib}/{kb}" in (spec[0] if isinstance(spec[0], list) else spec[1]["options"]), spec
    g = workflows.redi_sampler_custom(seed=11)
    g["6"]["inputs"]["kb_name"] = f"{lib}/{kb}"
    entry = server.run(g)
    assert entry["status"]["status_str"] == "success", server.error_of(entry)
    assert f"KB {kb}: 2 trajectories" in "\n".join(_report(entry)), _report(entry)


def test_a_linked_library_folder_is_neither_listed_nor_read(server, tmp_path):
    outside = tmp_path / "elsewhere"
    (outside / "kb").mkdir(parents=True)
    (outside / "kb" / "manifest.json").write_text("{}")
    link = server.kb_dir / "linked_library"
    link.symlink_to(outside, target_is_directory=True)
    try:
        assert not [n for n in server.get("/redi/kbs")["kbs"] if n.startswith("linked_library")]
        g = workflows.redi_sampler_custom()
        g["6"]["inputs"]["kb_name"] = "linked_library/kb"
        status, body = server.queue(g)  # not in the Loader's list: refused at queue time (0.30.0)
        if status == 200:  # ComfyUI 0.3.75 does not check a V3 combo's value at queue time: the Loader refuses the link
            err = server.error_of(server.run(g))
            assert err and "symbolic link" in err["exception_message"], err
        else:
            assert status == 400 and "kb_name" in str(body), (status, body)
    finally:
        link.unlink()


def test_library_without_kb_or_library_fails_with_the_fix(server):
    graph = workflows.redi_library(library="")
    entry = server.run(graph)
    err = server.error_of(entry)
    assert err and "connect ReDi KB Loader to `kb`, or name a library" in err["exception_message"], err


def test_prompt_text_is_stored_only_when_asked(server):
    from kb_tools.library import Library
    from kb_tools.storage.knowledge_base import KnowledgeBase

    for lib, store in (("text_off", False), ("text_on", True)):
        graph = workflows.redi_library(seed=3, library=lib)
        graph["7"]["inputs"]["store_prompt_text"] = store
        entry = server.run(graph)
        assert entry["status"]["status_str"] == "success", server.error_of(entry)
        assert _wait_count(server, lib, 1) == 1
        prompt = KnowledgeBase.open(Library(server.kb_dir / lib).list()[0].path).entries[0].prompt
        assert (prompt == workflows.DEMO_PROMPT) if store else prompt.startswith("cond:"), prompt


def test_record_and_library_examples_run_and_share_the_library(server):
    """Templates 8 and 9 as the frontend queues them (their API twins): ReDi Record on the stock
    KSampler feeds the library, and ReDi KSampler with `library` set retrieves from what it recorded."""
    import json
    from pathlib import Path

    wf = Path(__file__).resolve().parents[2] / "example_workflows" / "api"
    record, library = (json.loads((wf / f"{n}.json").read_text()) for n in ("redi_record", "redi_library"))
    lib = record["10"]["inputs"]["library"]
    assert lib == library["7"]["inputs"]["library"] == workflows.LIBRARY
    record["5"]["inputs"]["seed"] = library["7"]["inputs"]["seed"] = 4242  # a seed no other test records
    before = _count(server, lib)
    entry = server.run(record)
    assert entry["status"]["status_str"] == "success", server.error_of(entry)
    assert server.images(entry)
    assert _wait_count(server, lib, before + 1) == before + 1
    entry = server.run(library)
    assert entry["status"]["status_str"] == "success", server.error_of(entry)
    assert server.images(entry)
    lines = _report(entry)
    assert lines[0].startswith(f"library {lib}: KB ") and f", {before + 1} trajectories;" in lines[0], lines
    assert any("jumped from step 3 to step 12" in ln for ln in lines), lines  # the trajectory template 8 recorded


def test_redi_sampler_with_a_library_through_the_server(server):
    """ReDi Sampler in SamplerCustomAdvanced with `library` set and no KB connected: the server accepts
    the graph, the first run samples in full and records, the same seed again jumps (records nothing)."""
    from kb_tools.library import Library

    lib = "sampler_server_library"
    for i in range(2):
        graph = workflows.redi_sampler_custom(seed=77, library=lib)
        graph["7"]["inputs"]["max_key_distance"] += 0.01 * i  # unused with a library; makes the server sample again
        entry = server.run(graph)
        assert entry["status"]["status_str"] == "success", server.error_of(entry)
        assert server.images(entry)
        assert _wait_count(server, lib, 1) == 1
    time.sleep(1.0)
    assert _count(server, lib) == 1
    kbs = Library(server.kb_dir / lib).list()
    assert len(kbs) == 1 and kbs[0].name.startswith("redidemoshap-euler-normal-20s-cfg6-8x8-"), kbs
