"""Split a prompt into content and style (ReDi section 4.3: retrieve with the content,
finish with content + style).

Understood forms: an explicit separator, `BREAK`, ", in the style of X", "style: X",
"X style", "in X style", "by Artist Name", "as a watercolor painting",
weighted groups such as "(oil painting:1.2)", known media ("watercolor", "pixel art"),
and user regexes. Every word of the prompt ends up in the content or the style; the
worst case for odd input is "no style found", never an exception.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import regex

MEDIA = (
    "watercolor", "watercolour", "oil painting", "acrylic painting", "pencil sketch", "pencil drawing", "charcoal drawing",
    "ink drawing", "sketch", "digital art", "digital painting", "concept art", "pixel art", "pixelated", "anime", "manga",
    "cartoon", "comic", "3d render", "octane render", "unreal engine", "photorealistic", "cinematic", "impressionism",
    "impressionist", "cubism", "surrealism", "art nouveau", "art deco", "ukiyo-e", "low poly", "vaporwave", "cyberpunk",
    "steampunk", "studio ghibli", "line art", "lineart", "pastel", "gouache", "mosaic", "stained glass", "woodcut", "engraving",
    "striped", "dotted", "outlined", "monochrome", "black and white", "sepia", "vintage photo", "polaroid",
)
ART_NOUNS = r"painting|drawing|sketch|illustration|render|rendering|photo|photograph|print|engraving|watercolou?r|mosaic|cartoon|artwork|poster|etching|fresco|tapestry|lithograph"

_STYLE_SEGMENT = [
    ("in the style of", re.compile(r"^(?:in\s+the\s+)?style\s+of\s+\S.*$", re.I)),
    ("style:", re.compile(r"^style\s*[:=]\s*\S.*$", re.I)),
    ("X style", re.compile(r"^(?:in\s+(?:an?\s+)?)?(?:[\w'-]+\s+){0,3}[\w'-]+\s+style$", re.I)),
    ("by Artist", re.compile(r"^by\s+[A-Z\u00C0-\u024F][\w.'\-]*.*$")),
    ("as a medium", re.compile(rf"^(?:as|like)\s+(?:an?\s+)?.*\b(?:{ART_NOUNS})s?$", re.I)),
    ("medium", re.compile(r"^(?:" + "|".join(re.escape(m) for m in MEDIA) + r")(?:\s+(?:art|style|painting))?$", re.I)),
]
# style written at the end of a segment, after its content: "a castle in the style of Monet"
_STYLE_SUFFIX = [
    ("in the style of", re.compile(r"^(?P<c>.*?\S)\s+(?P<s>in\s+the\s+style\s+of\s+\S.*)$", re.I)),
    ("in X style", re.compile(r"^(?P<c>.*?\S)\s+(?P<s>in\s+(?:an?\s+)?\S[^,]*?\s+style)$", re.I)),
    ("by Artist", re.compile(r"^(?P<c>.*?\S)\s+(?P<s>by\s+[A-Z\u00C0-\u024F][\w.'\-]*(?:\s+[A-Z\u00C0-\u024F][\w.'\-]*)*)$")),
    ("as a medium", re.compile(rf"^(?P<c>.*?\S)\s+(?P<s>(?:as|like)\s+(?:an?\s+)?[^,]*\b(?:{ART_NOUNS})s?)$", re.I)),
]
_WEIGHTED = re.compile(r"^\(+\s*(?P<inner>[^():]*?)\s*(?::\s*[-+]?\d*\.?\d+)?\s*\)+$")
WORD = re.compile(r"\w+", re.UNICODE)


@dataclass
class StyleSplit:
    content: str
    style: str
    matched: list[str] = field(default_factory=list)

    @property
    def full(self) -> str:
        """Content and style joined back into one prompt (without separator syntax)."""
        return ", ".join(p for p in (self.content, self.style) if p)


def _segments(text: str) -> list[str]:
    """Split on commas outside parentheses; unbalanced parentheses are tolerated."""
    out, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return [s.strip() for s in out if s.strip()]


def _segment_style(seg: str, patterns: list[tuple[str, UserPattern]], budget: Budget | None = None) -> str | None:
    """The name of the rule that makes a whole segment a style, or None."""
    m = _WEIGHTED.match(seg)
    inner = m.group("inner").strip() if m else seg
    for name, pat in patterns:
        if inner and pat.search(inner, budget):
            return f"({name})" if m else name
    for name, builtin in _STYLE_SEGMENT:
        if inner and builtin.search(inner):
            return f"({name})" if m else name
    return None


# a user regex may backtrack catastrophically ("(a+)+$"): each search gets at most this many
# seconds, and all user-pattern searches of one split together at most NODE_BUDGET_S
USER_PATTERN_TIMEOUT = 0.25
NODE_BUDGET_S = 2.0


class Budget:
    """The time all user-pattern searches of one split may take together, and a `should_stop`
    callable (ComfyUI's interrupt) asked before every search: it may raise to stop, or return
    True, which stops the split with a ValueError."""

    def __init__(self, seconds: float = NODE_BUDGET_S, should_stop: Callable[[], bool] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds, self.should_stop, self.clock = seconds, should_stop, clock
        self.deadline = clock() + seconds

    def remaining(self, source: str) -> float:
        """Seconds left for the next search of pattern `source`; ValueError when none are."""
        if self.should_stop is not None and self.should_stop():
            raise ValueError("style split stopped: the run was interrupted")
        left = self.deadline - self.clock()
        if left <= 0:
            raise ValueError(
                f"style patterns took more than {self.seconds:g} s in total on this prompt (the last one tried: {source!r}); "
                "the split was refused. Simplify the patterns (e.g. 'a+' instead of '(a+)+'), use fewer, or shorten the prompt"
            )
        return left


class UserPattern:
    """A user regex whose every search is bounded in time (the `regex` package's timeout), so a
    pathological pattern is refused with a message instead of freezing the server."""

    def __init__(self, source: str) -> None:
        self.source = source
        try:
            self.pattern = regex.compile(source, regex.I | regex.V0)
        except (regex.error, ValueError, OverflowError) as e:
            raise ValueError(f"style pattern {source!r} is not a valid regular expression ({e}); fix or remove it") from e

    def search(self, text: str, budget: Budget | None = None):
        timeout = USER_PATTERN_TIMEOUT if budget is None else min(USER_PATTERN_TIMEOUT, budget.remaining(self.source))
        try:
            return self.pattern.search(text, timeout=timeout)
        except TimeoutError as e:
            if budget is not None and timeout < USER_PATTERN_TIMEOUT:
                budget.remaining(self.source)  # the total budget ran out during this search: say so
            raise ValueError(
                f"style pattern {self.source!r} took more than {USER_PATTERN_TIMEOUT} s on {text[:60]!r} (nested repetition such as "
                "'(a+)+' backtracks exponentially); simplify it, e.g. 'a+' instead of '(a+)+'"
            ) from e


def compile_patterns(text: str) -> list[tuple[str, UserPattern]]:
    """User patterns, one regex per line; a line that is not a valid regex raises ValueError."""
    return [(f"user: {line.strip()}", UserPattern(line.strip())) for line in (text or "").splitlines() if line.strip()]


def split_prompt(prompt: str, separator: str = "", patterns: list[tuple[str, UserPattern]] | None = None,
                 budget_s: float = NODE_BUDGET_S, should_stop: Callable[[], bool] | None = None) -> StyleSplit:
    """Split `prompt` into content and style. `separator` (e.g. "|") splits explicitly.
    User patterns' searches together get `budget_s` seconds, and `should_stop` (ComfyUI's
    interrupt) is asked before each; past either, ValueError with the reason."""
    text = (prompt or "").replace("\n", " ").strip()
    patterns = patterns or []
    budget = Budget(budget_s, should_stop)
    if separator and separator in text:
        content, style = text.split(separator, 1)
        return StyleSplit(_tidy(content), _tidy(style.replace(separator, ", ")), ["separator"])
    if re.search(r"\bBREAK\b", text):
        first, rest = re.split(r"\bBREAK\b", text, maxsplit=1)
        return StyleSplit(_tidy(first), _tidy(re.sub(r"\bBREAK\b", ",", rest)), ["BREAK"])
    content_parts, style_parts, matched = [], [], []
    for seg in _segments(text):
        rule = _segment_style(seg, patterns, budget)
        if rule:
            style_parts.append(seg)
            matched.append(rule)
            continue
        for name, pat in _STYLE_SUFFIX:
            m = pat.match(seg)
            if m and not _segment_style(m.group("c"), []):
                content_parts.append(m.group("c"))
                style_parts.append(m.group("s"))
                matched.append(name)
                break
        else:
            content_parts.append(seg)
    return StyleSplit(_tidy(", ".join(content_parts)), _tidy(", ".join(style_parts)), matched)


def _tidy(s: str) -> str:
    s = re.sub(r"\s+", " ", s).strip()
    s = re.sub(r"\s+,", ",", s)
    s = re.sub(r"^[\s,;]+|[\s,;]+$", "", s)
    return re.sub(r"(,\s*)+", ", ", s)


def words(text: str) -> list[str]:
    return sorted(WORD.findall(text or ""))
