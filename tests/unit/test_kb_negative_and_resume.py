"""Issue 29: the manifest's optional negative-prompt text (backward compatible, checked against the
fingerprint's hash, refused when hostile), and a resumed build's progress and report."""

import json

import pytest

from kb_tools import builder
from kb_tools.errors import KBError
from kb_tools.storage import disk_format as kb_format
from kb_tools.storage import writer as kb_writer
from kb_tools.storage.knowledge_base import KnowledgeBase
from kb_tools.storage.validate import validate_kb

from .kb_fixtures import fake_run_batch, fingerprint

NEG = "blurry, low quality"


def _build(d, negative=NEG, prompts=6, **kw):
    fp = fingerprint(negative_hash=kb_format.text_hash(negative))
    return builder.build(d, fp, [f"p{i}" for i in range(prompts)], 3, fake_run_batch(), negative_prompt=negative, **kw)


def _manifest(d):
    return json.loads((d / "manifest.json").read_text())


def test_the_negative_prompt_text_is_kept_and_read(tmp_path):
    d = tmp_path / "kb"
    _build(d)
    assert _manifest(d)["negative_prompt"] == NEG
    assert KnowledgeBase.open(d).header.negative_prompt == NEG
    assert validate_kb(d) == 6


def test_an_empty_negative_prompt_is_kept_as_empty_text(tmp_path):
    d = tmp_path / "kb"
    _build(d, negative="")
    assert _manifest(d)["negative_prompt"] == ""
    assert KnowledgeBase.open(d).header.negative_prompt == ""


def test_a_manifest_without_the_text_still_reads(tmp_path):
    """Format-2 KBs written before the field existed: same format version, no text."""
    d = tmp_path / "kb"
    _build(d)
    man = _manifest(d)
    del man["negative_prompt"]
    (d / "manifest.json").write_text(json.dumps(man))
    kb = KnowledgeBase.open(d)
    assert kb.header.negative_prompt is None and len(kb) == 6
    assert "negative_prompt" not in kb.header.to_json()


def test_text_that_does_not_hash_to_the_fingerprint_is_not_written(tmp_path):
    d = tmp_path / "kb"
    fp = fingerprint(negative_hash=kb_format.text_hash(NEG))
    kb_writer.create_kb(d, fp, negative_prompt="something else")
    assert "negative_prompt" not in _manifest(d)


@pytest.mark.parametrize(("value", "needle"), [
    ("a different negative", "does not match the fingerprint's negative_hash"),
    (["not", "text"], "negative_prompt must be a string"),
    (7, "negative_prompt must be a string"),
    ("x" * (kb_format.MAX_NEGATIVE_CHARS + 1), "negative_prompt must be a string of at most"),
])
def test_a_hostile_negative_prompt_is_refused(tmp_path, value, needle):
    d = tmp_path / "kb"
    _build(d)
    man = _manifest(d)
    man["negative_prompt"] = value
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(KBError, match=needle):
        KnowledgeBase.open(d)


def test_a_resumed_build_reports_what_was_stored_and_counts_it_in_its_progress(tmp_path):
    d = tmp_path / "kb"
    prompts = [f"p{i}" for i in range(7)]
    fp = fingerprint()

    class Stop(Exception):
        pass

    calls = []

    def stop_after_first_batch():
        if calls:
            raise Stop

    with pytest.raises(Stop):
        builder.build(d, fp, prompts, 3, fake_run_batch(calls), check_interrupt=stop_after_first_batch)
    assert len(KnowledgeBase.open(d)) == 3

    progress, resumed = [], []
    builder.build(d, fp, prompts, 3, fake_run_batch(), progress=lambda done, total: progress.append((done, total)),
                  resumed=lambda n, total: resumed.append((n, total)))
    assert resumed == [(3, 7)]
    assert progress == [(3, 7), (6, 7), (7, 7)]  # starts from the stored 3, not from 0

    progress.clear(), resumed.clear()
    builder.build(d, fp, prompts, 3, fake_run_batch(), progress=lambda done, total: progress.append((done, total)),
                  resumed=lambda n, total: resumed.append((n, total)))
    assert resumed == [(7, 7)] and progress == [(7, 7)]  # nothing left to sample


def test_a_fresh_build_does_not_say_resumed(tmp_path):
    resumed, progress = [], []
    _build(tmp_path / "kb", progress=lambda done, total: progress.append((done, total)),
           resumed=lambda n, total: resumed.append((n, total)))
    assert resumed == [] and progress == [(0, 6), (3, 6), (6, 6)]
