import re
import time

import pytest

from redi_core.style_split import USER_PATTERN_TIMEOUT, compile_patterns, split_prompt, words

# (prompt, separator, user patterns, expected content, expected style)
CASES = [
    ("a red circle, in the style of Van Gogh", "", "", "a red circle", "in the style of Van Gogh"),
    ("a castle in the style of Monet", "", "", "a castle", "in the style of Monet"),
    ("a cat, style of ukiyo-e", "", "", "a cat", "style of ukiyo-e"),
    ("a dog on a beach, style: watercolor", "", "", "a dog on a beach", "style: watercolor"),
    ("portrait of a woman, style = oil", "", "", "portrait of a woman", "style = oil"),
    ("a small red circle at the top left on a blue background, in striped style", "", "", "a small red circle at the top left on a blue background", "in striped style"),
    ("a small red circle at the top left on a blue background, striped style", "", "", "a small red circle at the top left on a blue background", "striped style"),
    ("a small red circle at the top left on a blue background in striped style", "", "", "a small red circle at the top left on a blue background", "in striped style"),
    ("a city at night, anime style", "", "", "a city at night", "anime style"),
    ("a city at night in an anime style", "", "", "a city at night", "in an anime style"),
    ("a lighthouse, by Greg Rutkowski", "", "", "a lighthouse", "by Greg Rutkowski"),
    ("a lighthouse by Greg Rutkowski", "", "", "a lighthouse", "by Greg Rutkowski"),
    ("a house by the lake", "", "", "a house by the lake", ""),
    ("a house by the lake, by Claude Monet", "", "", "a house by the lake", "by Claude Monet"),
    ("a fox, as a watercolor painting", "", "", "a fox", "as a watercolor painting"),
    ("a fox as a watercolor painting", "", "", "a fox", "as a watercolor painting"),
    ("a fox drawn like a pencil sketch", "", "", "a fox drawn", "like a pencil sketch"),
    ("a ship, (oil painting:1.2)", "", "", "a ship", "(oil painting:1.2)"),
    ("a ship, (watercolor)", "", "", "a ship", "(watercolor)"),
    ("a ship, ((anime style:1.4))", "", "", "a ship", "((anime style:1.4))"),
    ("(red hat:1.3), a man", "", "", "(red hat:1.3), a man", ""),
    ("a tree, watercolor", "", "", "a tree", "watercolor"),
    ("a tree, pixel art", "", "", "a tree", "pixel art"),
    ("a tree, 3d render, cinematic", "", "", "a tree", "3d render, cinematic"),
    ("a robot BREAK cyberpunk neon style", "", "", "a robot", "cyberpunk neon style"),
    ("a robot BREAK neon BREAK gritty", "", "", "a robot", "neon, gritty"),
    ("a robot | cyberpunk", "|", "", "a robot", "cyberpunk"),
    ("a robot ### noir, grainy", "###", "", "a robot", "noir, grainy"),
    ("a robot | noir | grainy", "|", "", "a robot", "noir, grainy"),
    ("a robot, glowing", "", r"^glowing$", "a robot", "glowing"),
    ("a robot, shiny chrome", "", "chrome", "a robot", "shiny chrome"),
    ("a blue square at the center", "", "", "a blue square at the center", ""),
    ("", "", "", "", ""),
    ("   ", "", "", "", ""),
    ("in the style of Picasso", "", "", "", "in the style of Picasso"),
    ("watercolor, oil painting", "", "", "", "watercolor, oil painting"),
    ("un chat dans le jardin, in the style of Cézanne", "", "", "un chat dans le jardin", "in the style of Cézanne"),
    ("一只猫, anime style", "", "", "一只猫", "anime style"),
    ("a cat,, , in the style of Klimt,,", "", "", "a cat", "in the style of Klimt"),
    ("a cat (sitting, in the style of Klimt", "", "", "a cat (sitting", "in the style of Klimt"),
    ("a cat) sitting, watercolor", "", "", "a cat) sitting", "watercolor"),
    ("((a cat:1.2), sketch", "", "", "((a cat:1.2), sketch", ""),
    ("a cat :1.2), sketch", "", "", "a cat :1.2)", "sketch"),
    ("a cat; watercolor", "", "", "a cat; watercolor", ""),
    ("by", "", "", "by", ""),
    ("style", "", "", "style", ""),
    ("a dog, style:", "", "", "a dog, style:", ""),
    ("a dog, (:1.2)", "", "", "a dog, (:1.2)", ""),
]


@pytest.mark.parametrize(("prompt", "sep", "pats", "content", "style"), CASES)
def test_split_table(prompt, sep, pats, content, style):
    res = split_prompt(prompt, sep, compile_patterns(pats))
    assert (res.content, res.style) == (content, style), res.matched


@pytest.mark.parametrize(("prompt", "sep", "pats", "content", "style"), CASES)
def test_no_word_is_dropped(prompt, sep, pats, content, style):
    res = split_prompt(prompt, sep, compile_patterns(pats))
    expected = words(re.sub(r"\bBREAK\b", " ", prompt.replace(sep, " ") if sep else prompt))
    assert sorted(words(res.content) + words(res.style)) == expected


def test_several_styles_and_full_prompt():
    res = split_prompt("a horse in a field, by Albert Bierstadt, oil painting, (dramatic lighting style:1.1)")
    assert res.content == "a horse in a field"
    assert res.style == "by Albert Bierstadt, oil painting, (dramatic lighting style:1.1)"
    assert res.full == "a horse in a field, by Albert Bierstadt, oil painting, (dramatic lighting style:1.1)"
    assert len(res.matched) == 3


def test_very_long_prompt():
    prompt = ", ".join(f"thing {i}" for i in range(3000)) + ", in the style of Turner"
    res = split_prompt(prompt)
    assert res.style == "in the style of Turner" and res.content.endswith("thing 2999")


def test_bad_user_pattern_is_a_clear_error():
    with pytest.raises(ValueError, match="not a valid regular expression"):
        compile_patterns("(unclosed")


def test_stray_punctuation_never_raises():
    for junk in ["(((", ")))", ",,,", ":::", "(:)", "((a:b:c))", "\\", "[style]", "{by}", "BREAK", "BREAK BREAK", "|"]:
        res = split_prompt(junk, "|")
        assert isinstance(res.content, str) and isinstance(res.style, str)


@pytest.mark.parametrize("pattern", ["(a|aa)+$", "(a+)+$"])
def test_catastrophic_user_pattern_is_bounded(pattern):
    """A backtracking user regex ends within the timeout (issue 15: the server froze for 50 s)."""
    t0 = time.perf_counter()
    try:
        res = split_prompt("a" * 40 + "!", "", compile_patterns(pattern))
        assert res.content  # finished normally: the regex engine handled it
    except ValueError as e:
        assert "took more than" in str(e) and pattern in str(e)
    assert time.perf_counter() - t0 < 15


def test_user_patterns_share_one_time_budget_per_split():
    """Issue 23: 200 segments each under the per-search timeout held the queue for 79 s; all
    searches of one split now share NODE_BUDGET_S (here 0.3 s) and the split is refused."""
    prompt = ", ".join("a" * 22 + "!" for _ in range(200))
    pats = compile_patterns("(a|aa)+$")
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="in total on this prompt"):
        split_prompt(prompt, "", pats, budget_s=0.3)
    assert time.perf_counter() - t0 < 0.3 + 2 * USER_PATTERN_TIMEOUT + 0.5


def test_interrupt_stops_a_split_between_searches():
    asked = []

    def stop() -> bool:
        asked.append(1)
        if len(asked) >= 3:
            raise KeyboardInterrupt("interrupted")  # stands for ComfyUI's InterruptProcessingException
        return False

    with pytest.raises(KeyboardInterrupt):
        split_prompt(", ".join(f"thing {i}" for i in range(50)), "", compile_patterns("zzz"), should_stop=stop)
    assert len(asked) == 3
    with pytest.raises(ValueError, match="interrupted"):
        split_prompt("a, b, c", "", compile_patterns("zzz"), should_stop=lambda: True)
