"""Embedded default calibration and held-out English text.

Nothing is downloaded and nothing is shipped: the sentences are built at run
time from the docstrings of a fixed list of Python standard-library modules,
plus a small template generator for plainer, conversational sentences.

The docstring sentences are ordered by the SHA-1 of their text, which gives a
deterministic, content-based order that does not depend on import order or
hash randomisation.  A sentence whose SHA-1 hex digest starts with ``0``-``b``
belongs to the calibration split (about 75 %), the rest (``c``-``f``) to the
held-out split, so the two are disjoint by construction.
"""

from __future__ import annotations

import functools
import hashlib
import ast
import importlib
import importlib.util
import inspect
import random
import re
import types
import warnings
from collections.abc import Iterable, Iterator

__all__ = [
    "STDLIB_MODULES",
    "calibration_texts",
    "heldout_texts",
    "docstring_sentences",
    "template_sentences",
]

#: Standard-library modules whose docstrings feed the default text.  Modules
#: that fail to import (e.g. ``turtle`` without tkinter) are skipped.
STDLIB_MODULES: tuple[str, ...] = tuple(
    sorted(
        [
            "abc", "argparse", "ast", "asyncio", "base64", "binascii", "bisect",
            "calendar", "cmath", "codecs", "collections", "colorsys", "configparser",
            "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib",
            "dis", "doctest", "email", "enum", "fnmatch", "fractions", "ftplib",
            "functools", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac",
            "http.client", "imaplib", "inspect", "io", "ipaddress", "itertools", "json",
            "locale", "logging", "mailbox", "math", "mimetypes", "numbers", "operator",
            "os", "pathlib", "pdb", "pickle", "poplib", "pprint", "queue", "random", "re",
            "reprlib", "secrets", "selectors", "shutil", "signal", "smtplib", "socket",
            "sqlite3", "ssl", "statistics", "string", "subprocess", "tarfile", "tempfile",
            "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "turtle",
            "typing", "unittest", "urllib.request", "uuid", "warnings", "wave",
            "weakref", "webbrowser", "xml.dom.minidom", "zipfile",
        ]
    )
)

_MIN_WORDS = 6
_MAX_WORDS = 40
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_WORD = re.compile(r"^[\"'(]?[A-Za-z][A-Za-z'\-]*[.,;:!?\"')]*$")
_CODE_MARKERS = (">>>", "{", "}", "=", "_", "[", "]", "\\", "|", "<", ">", "`", "*", "#", "$")


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def _module_docstrings(name: str) -> Iterator[str]:
    """Yield the docstrings of a stdlib module's source: module, classes, functions, methods.

    The source file is parsed with :mod:`ast` rather than imported and inspected, so
    the text does not depend on what other libraries imported or patched before.
    """
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return
    origin = getattr(spec, "origin", None) if spec is not None else None
    if not origin or not origin.endswith(".py"):
        return
    try:
        with open(origin, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, UnicodeDecodeError):
        return
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for node in ast.walk(tree):
        if isinstance(node, nodes):
            doc = ast.get_docstring(node)
            if doc:
                yield doc

def _paragraphs(doc: str) -> Iterator[str]:
    """Split a docstring into prose paragraphs, dropping code-like blocks."""
    for block in re.split(r"\n\s*\n", doc):
        lines = block.splitlines()
        if not lines or any(line.startswith((" ", "\t")) for line in lines):
            continue  # indented blocks are examples, signatures or tables
        yield " ".join(line.strip() for line in lines)


def _keep(sentence: str) -> bool:
    """Whether a candidate sentence looks like plain English prose."""
    if not sentence or not sentence[0].isupper() or not sentence.endswith("."):
        return False
    if sentence.endswith(("..", "e.g.", "i.e.", "etc.")):
        return False
    if any(marker in sentence for marker in _CODE_MARKERS) or sentence.count("(") > 2:
        return False
    words = sentence.split()
    if not _MIN_WORDS <= len(words) <= _MAX_WORDS:
        return False
    alphabetic = sum(1 for word in words if _WORD.match(word))
    return alphabetic >= 0.9 * len(words)


def _sentences(docs: Iterable[str]) -> set[str]:
    found: set[str] = set()
    for doc in docs:
        for paragraph in _paragraphs(doc):
            for candidate in _SENTENCE_SPLIT.split(paragraph):
                sentence = " ".join(candidate.split())
                if _keep(sentence):
                    found.add(sentence)
    return found


@functools.lru_cache(maxsize=1)
def docstring_sentences() -> tuple[str, ...]:
    """All default docstring sentences, deduplicated and ordered by SHA-1.

    Returns:
        The sentences, sorted by the SHA-1 hex digest of their UTF-8 text.
    """
    found: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. typing.io deprecation when its docs are read
        for name in STDLIB_MODULES:
            found |= _sentences(_module_docstrings(name))
    return tuple(sorted(found, key=lambda s: (_sha1(s), s)))


@functools.lru_cache(maxsize=1)
def _split() -> tuple[tuple[str, ...], tuple[str, ...]]:
    calib: list[str] = []
    heldout: list[str] = []
    for sentence in docstring_sentences():
        (calib if _sha1(sentence)[0] in "0123456789ab" else heldout).append(sentence)
    return tuple(calib), tuple(heldout)


def _limit(texts: tuple[str, ...], n: int | None) -> list[str]:
    if n is None:
        return list(texts)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return list(texts[:n])


def calibration_texts(n: int | None = None) -> list[str]:
    """Default calibration sentences (docstring sentences with SHA-1 in ``0``-``b``).

    Args:
        n: Return at most this many (the first ``n`` in SHA-1 order, which is a
            deterministic, content-based subset); ``None`` returns all.

    Returns:
        A new list of sentences.
    """
    return _limit(_split()[0], n)


@functools.lru_cache(maxsize=1)
def _heldout_all() -> tuple[str, ...]:
    docs = _split()[1]
    templates = template_sentences(len(docs) // 2, seed=20240611)
    mixed: list[str] = []
    for i, sentence in enumerate(docs):
        mixed.append(sentence)
        if i % 2 == 1 and i // 2 < len(templates):
            mixed.append(templates[i // 2])
    return tuple(mixed)


def heldout_texts(n: int | None = None) -> list[str]:
    """Default held-out sentences, disjoint from :func:`calibration_texts`.

    Docstring sentences with SHA-1 in ``c``-``f`` interleaved 2:1 with
    :func:`template_sentences`.

    Args:
        n: Return at most this many (a prefix of the fixed interleaving);
            ``None`` returns all.

    Returns:
        A new list of sentences.
    """
    return _limit(_heldout_all(), n)


# --- template sentences ------------------------------------------------------

_ADJECTIVES = (
    "old", "young", "quiet", "busy", "tired", "cheerful", "careful", "clever", "curious",
    "gentle", "patient", "nervous", "proud", "friendly", "lonely", "brave", "sleepy",
    "hungry", "polite", "serious", "famous", "local", "strict", "kind", "honest",
    "restless", "shy", "eager", "calm", "clumsy",
)
_PEOPLE = (
    "librarian", "baker", "farmer", "teacher", "doctor", "pilot", "gardener", "painter",
    "student", "fisherman", "nurse", "carpenter", "musician", "engineer", "driver",
    "writer", "grandmother", "neighbour", "shopkeeper", "tailor", "sailor", "chef",
    "mechanic", "poet", "scientist", "child", "mayor", "postman", "photographer", "boy",
    "girl", "traveller", "clerk", "judge", "soldier",
)
_THING_ADJECTIVES = (
    "broken", "red", "heavy", "small", "wooden", "shiny", "dusty", "new", "ancient",
    "torn", "blue", "empty", "tiny", "enormous", "fragile", "warm", "cold", "strange",
    "golden", "plain", "muddy", "bright", "rusty", "soft", "wet",
)
_THINGS = (
    "lamp", "bicycle", "letter", "basket", "clock", "window", "umbrella", "map", "kettle",
    "fence", "boat", "piano", "book", "ladder", "blanket", "bridge", "coat", "door",
    "radio", "cup", "bottle", "box", "chair", "table", "key", "painting", "garden",
    "roof", "wagon", "telescope", "jar", "rope", "candle", "mirror", "wallet", "hat",
)
_VERBS = (
    "repaired", "painted", "carried", "found", "cleaned", "opened", "closed", "sold",
    "bought", "borrowed", "moved", "dropped", "polished", "measured", "wrapped", "hid",
    "lifted", "checked", "replaced", "described", "noticed", "locked", "filled",
    "emptied", "carved", "built", "drew", "lost", "returned", "fixed", "washed", "packed",
)
_ADVERBS = (
    "quietly", "slowly", "quickly", "carefully", "happily", "nervously", "patiently",
    "suddenly", "proudly", "gently", "eagerly", "politely", "secretly", "calmly",
    "clumsily", "finally", "gladly", "barely",
)
_PLACES = (
    "near the river", "in the kitchen", "behind the station", "at the market",
    "under the old bridge", "beside the church", "in the garden", "on the hill",
    "outside the school", "inside the barn", "by the harbour", "in the library",
    "at the edge of the forest", "next to the bakery", "on the top floor",
    "in the town square", "along the beach", "across the street", "in the attic",
    "near the mountain village",
)
_TIMES = (
    "yesterday", "this morning", "last winter", "before dinner", "after the storm",
    "on Sunday", "early in the evening", "late at night", "during the festival",
    "last summer", "at dawn", "on a rainy afternoon",
)
_INTRANSITIVE = (
    "waited", "laughed", "sang", "slept", "walked", "argued", "smiled", "listened",
    "worked", "rested", "danced", "whispered", "wandered", "paused",
)
_REASONS = (
    "because the road was closed", "because it was getting dark",
    "while the rain kept falling", "although nobody was watching",
    "before the guests arrived", "while the children played outside",
    "so that everyone could see", "because the shop was about to close",
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _compose(rng: random.Random) -> str:
    def person() -> str:
        return f"{rng.choice(_ADJECTIVES)} {rng.choice(_PEOPLE)}"

    def thing() -> str:
        return f"{rng.choice(_THING_ADJECTIVES)} {rng.choice(_THINGS)}"

    pattern = rng.randrange(6)
    if pattern == 0:
        text = (
            f"The {person()} {rng.choice(_ADVERBS)} {rng.choice(_VERBS)} "
            f"the {thing()} {rng.choice(_PLACES)}."
        )
    elif pattern == 1:
        text = (
            f"{rng.choice(_TIMES)}, a {person()} {rng.choice(_VERBS)} "
            f"a {thing()} {rng.choice(_PLACES)}."
        )
    elif pattern == 2:
        text = (
            f"The {person()} {rng.choice(_INTRANSITIVE)} {rng.choice(_PLACES)} "
            f"{rng.choice(_REASONS)}."
        )
    elif pattern == 3:
        text = (
            f"My {rng.choice(_PEOPLE)} {rng.choice(_VERBS)} the {thing()} "
            f"{rng.choice(_TIMES)}, and the {rng.choice(_PEOPLE)} {rng.choice(_ADVERBS)} "
            f"{rng.choice(_VERBS)} it again."
        )
    elif pattern == 4:
        text = (
            f"Nobody knew why the {person()} {rng.choice(_VERBS)} the {thing()} "
            f"{rng.choice(_PLACES)} {rng.choice(_TIMES)}."
        )
    else:
        text = (
            f"Have you seen the {thing()} that the {person()} "
            f"{rng.choice(_VERBS)} {rng.choice(_PLACES)}?"
        )
    # Choose "a" or "an" for the word that follows each indefinite article.
    text = re.sub(r"\b(a|an) (\w+)", lambda m: f"{_article(m.group(2))} {m.group(2)}", text)
    return text[0].upper() + text[1:]


def template_sentences(n: int, seed: int = 0) -> list[str]:
    """Compose ``n`` distinct simple English sentences from fixed word lists.

    Args:
        n: Number of sentences.
        seed: Seed for the deterministic generator; the same ``(n, seed)``
            always gives the same list, on every platform and run.

    Returns:
        ``n`` distinct sentences such as "The old librarian quietly repaired
        the broken lamp near the river."
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[str] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:  # pragma: no cover - the space is far larger
            raise ValueError(f"cannot compose {n} distinct template sentences")
        sentence = _compose(rng)
        if sentence not in seen:
            seen.add(sentence)
            out.append(sentence)
    return out
