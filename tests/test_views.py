"""nixery.views: the words the web pages and the command line share."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from nixery.amounts import rate_text, size_text
from nixery.http.web.builds import Progress
from nixery.progress import Event, Stage
from nixery.terminal import BarProgress
from nixery.views import STAGE_LABELS, STAGE_ORDER, image_reference, nix_work_text, other_order


@pytest.mark.parametrize(
    ("n", "text"), [(None, "–"), (0, "0 B"), (999, "999 B"), (1000, "1.0 kB"), (2_500_000, "2.5 MB"), (3e9, "3.0 GB")]
)
def test_sizes_in_words(n: float | None, text: str) -> None:
    assert size_text(n) == text


def test_the_command_line_shows_an_unknown_size_as_a_hyphen() -> None:
    assert size_text(None, unknown="-") == "-"


def test_references_leave_out_latest() -> None:
    assert image_reference("shell/curl", "latest") == "shell/curl"
    assert image_reference("shell/curl", "24.05") == "shell/curl:24.05"


@pytest.mark.parametrize(
    ("name", "other"),
    [("curl", None), ("shell/curl", "curl/shell"), ("arm64/shell/curl", "arm64/curl/shell"), ("arm64/curl", None)],
)
def test_the_other_order_of_an_images_names(name: str, other: str | None) -> None:
    assert other_order(name) == other


def test_every_stage_has_a_label_and_failed_ends_no_order() -> None:
    assert set(STAGE_LABELS) == set(Stage)
    assert STAGE_ORDER[-1] is Stage.DONE and Stage.FAILED not in STAGE_ORDER


@pytest.mark.parametrize(
    ("n", "seconds", "text"),
    [(36e6, 1.0, "36.0 MB/s"), (5_600, 0.5, "11.2 kB/s"), (40, 0.2, "200 B/s"), (5_600, 0.002, None), (0, 1.0, None)],
)
def test_rates_in_words(n: float, seconds: float, text: str | None) -> None:
    assert rate_text(n, seconds) == text


@pytest.mark.parametrize(
    ("counts", "over", "ended", "text"),
    [
        ({"built": 1, "to_build": 3}, False, False, "building 1 of 3 derivations"),
        ({"built": 2, "to_build": 2, "fetched": 0, "to_fetch": 4}, False, False,
         "building 2 of 2 derivations, fetching 0 of 4 paths"),
        ({"built": 1, "to_build": 1}, False, True, "ended building 1 of 1 derivation"),
        ({"built": 3, "to_build": 3, "fetched": 1, "to_fetch": 1}, True, False, "3 derivations built, 1 path fetched"),
        ({"built": 0, "to_build": 0, "fetched": 2, "to_fetch": 2}, True, False, "0 derivations built, 2 paths fetched"),
    ],
)
def test_what_nix_did_in_words(counts: dict[str, int], over: bool, ended: bool, text: str) -> None:
    assert nix_work_text(counts, over=over, ended=ended) == text


def test_the_progress_page_and_nixery_build_say_what_nix_did_and_how_fast_in_the_same_words() -> None:
    """Twins: the page's stages (`Progress.detail`) and `nixery build`'s bars (`BarProgress`)
    wrote the "building N of M derivations" words each in its own code; they share
    `nix_work_text` now. A slow small compression showed no rate on the page and the terminal."""
    layers = {"layers_total": 2}
    events = [
        Event(Stage.BUILDING, "building /nix/store/a", 100.0, {"built": 1, "to_build": 2, "fetched": 1, "to_fetch": 3}),
        Event(Stage.COMPRESSING, "compressed", 101.0, {**layers, "layers_done": 1, "compressed_bytes": 0}),
        Event(Stage.COMPRESSING, "compressed", 103.0, {**layers, "layers_done": 2, "compressed_bytes": 50_000}),
    ]
    console = Console(file=io.StringIO(), force_terminal=False)
    bars = BarProgress(console)
    shown = []
    for event in events:
        bars.update({"stage": event.stage.value, "message": event.message, "time": event.time, **event.data})
        shown.append(bars.progress.tasks[bars.tasks[event.stage.value]].fields["detail"])
    page = Progress(99.0, events[:1])
    assert shown[0] == page.detail(Stage.BUILDING) == "building 1 of 2 derivations, fetching 1 of 3 paths"
    assert bars.summaries["building"] == Progress(99.0, events).detail(Stage.BUILDING) == (
        "2 derivations built, 3 paths fetched")
    assert shown[-1] == "2/2 layers, 50.0 kB, 25.0 kB/s"
    assert Progress(99.0, events).detail(Stage.COMPRESSING) == "2/2 layers · 0 new, 50.0 kB compressed · 25.0 kB/s"
