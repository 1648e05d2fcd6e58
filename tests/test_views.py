"""nixery.views: the words the web pages and the command line share."""

from __future__ import annotations

import pytest

from nixery.progress import Stage
from nixery.views import STAGE_LABELS, STAGE_ORDER, image_reference, other_order, size_text


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
