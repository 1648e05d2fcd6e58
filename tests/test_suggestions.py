"""Nearest names for misspelt ones (nixery/suggestions.py), without Nix."""

from __future__ import annotations

import asyncio
import random
import string

from nixery.suggestions import MOST, MOST_NAMES, NameIndex, Suggestions

NAMES = [
    "curl", "git", "jq", "python3", "python3.11", "python3_11", "bashInteractive", "gnugrep", "vim", "nano",
    "zip", "unzip", "Foo", "FOO", "hello", "openssh", "openssh-client", "ripgrep",
]


def test_nearest_names_in_lower_case_when_that_finds_them() -> None:
    index = NameIndex(NAMES)
    assert index.nearest("curll") == ["curl"]
    assert index.nearest("gti") == ["git"]  # a transposition
    assert index.nearest("CURL2") == ["curl"]
    assert index.nearest("pyhton3") == ["python3"]
    assert index.nearest("python3.12")[0] == "python3.11"
    assert index.nearest("bashinteractiv") == ["bashinteractive"]  # pullable: clients refuse capitals
    assert index.nearest("foo") == ["FOO", "Foo"]  # `foo` would find neither: each spelling
    assert index.nearest("xqzvwk") == []
    assert index.nearest("hello") == []  # a name the set has is no misspelling of itself


def test_only_the_closest_few() -> None:
    index = NameIndex([*NAMES, "cll0", "curlie", "curl-impersonate"])
    assert index.nearest("curll") == ["curl"]  # `cll0` and `curlie` are further
    many = NameIndex([f"pkg{i}" for i in range(100)])
    assert len(many.nearest("pkg")) == MOST
    missing = [f"nope{i}" for i in range(MOST_NAMES + 5)]
    assert len(NameIndex(missing).suggest([m + "x" for m in missing])) == MOST_NAMES


def test_suggestions_leave_the_event_loop_free() -> None:
    """With nixpkgs-sized lists the work happens in a worker thread: the event loop keeps
    running other tasks meanwhile (it would not run any if the comparisons ran on it)."""
    rng = random.Random(7)
    names = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 20))) for _ in range(200_000)]

    async def run() -> tuple[dict[str, list[str]], int]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        ticker = asyncio.ensure_future(tick())
        await asyncio.sleep(0)
        found = await Suggestions().suggest("k", lambda: [*names, "curl"], ["curll", "gitt"])
        during = ticks
        ticker.cancel()
        return found, during

    found, ticks = asyncio.run(run())
    assert found["curll"][0] == "curl"
    assert ticks >= 3, "the event loop was held while suggestions were computed"
