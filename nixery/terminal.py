"""How `nixery build` shows a build's progress: one plain line per event, or on a
terminal a bar per stage (and a line per platform for an image of several)."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from nixery.amounts import rate_text, size_text
from nixery.views import STAGE_LABELS, STAGE_ORDER, nix_work_text

#: The stages shown with a bar each, by their names in the event stream (a failure is shown on the stage it ends).
LABELS = {stage.value: STAGE_LABELS[stage] for stage in STAGE_ORDER}


class OutputConsole(Console):
    """The console a command prints its results on. When its reader goes away (`| head`), the
    command ends as one ended by SIGPIPE (nixery.cli.main), as other tools in a pipeline do:
    rich's own default ends it with status 1, as if it had failed."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError


def size(n: float | None) -> str:
    return size_text(n, unknown="-")


class PlainProgress:
    """One line per event, for logs and pipes."""

    def __init__(self, out: Any):
        self.out = out
        self.started: float | None = None

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, event: dict[str, Any]) -> None:
        if self.started is None:
            self.started = event.get("time", time.time())
        offset = event.get("time", self.started) - self.started
        platform = f"{event['platform']} {event.get('platform_stage', '')}: " if event.get("platform") else ""
        line = f"[{offset:6.1f}s] {event.get('stage', '?'):<11} {platform}{event.get('message', '')}"
        print(line, file=self.out, flush=True)


class BarProgress:
    """A rich progress display: one line per stage, a bar where there is something to count."""

    def __init__(self, console: Console):
        self.progress = Progress(
            SpinnerColumn(finished_text="[green]✓[/]"),
            TextColumn("{task.description:<22}"),
            BarColumn(bar_width=30),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.tasks: dict[str, TaskID] = {}
        self.current: str | None = None
        self.compress_started: float | None = None
        self.summaries: dict[str, str] = {}  # a stage's detail once it is over

    def __enter__(self) -> BarProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def _finish(self, stage: str) -> None:
        task = self.tasks[stage]
        total = self.progress.tasks[task].total or 1
        self.progress.update(task, total=total, completed=total)
        if stage in self.summaries:
            self.progress.update(task, detail=self.summaries[stage])

    def _update_platform(self, event: dict[str, Any]) -> None:
        """One platform's progress (an image of several): a line of its own, a bar over its layers."""
        platform, stage = event["platform"], event.get("platform_stage", "")
        if platform not in self.tasks:
            self.tasks[platform] = self.progress.add_task(f"  {platform}", total=None, detail="")
        task = self.tasks[platform]
        label = LABELS.get(stage, stage)
        if stage == "compressing" and "layers_total" in event:
            done, total = event.get("layers_done", 0), event["layers_total"]
            self.progress.update(task, total=total, completed=done, detail=f"{label}: {done}/{total} layers")
        elif stage == "done":
            summary = f"{size(event.get('size'))} in {event.get('layers')} layers"
            self.progress.update(task, total=1, completed=1, detail=summary)
        else:
            self.progress.update(task, detail=f"{label}: {event.get('message', '')}"[:60])

    def update(self, event: dict[str, Any]) -> None:
        if event.get("platform"):
            self._update_platform(event)
            return
        stage = event.get("stage", "")
        if stage == "failed":
            if self.current is not None:
                self.progress.update(self.tasks[self.current], detail="[red]failed[/]")
                self.progress.stop_task(self.tasks[self.current])
            return
        if stage not in LABELS:
            return
        if stage != self.current:
            if self.current is not None:
                self._finish(self.current)
            if stage not in self.tasks:
                self.tasks[stage] = self.progress.add_task(LABELS[stage], total=None, detail="")
            self.current = stage
        task = self.tasks[stage]
        detail = event.get("message", "")
        if stage == "building":
            built, to_build = event.get("built", 0), event.get("to_build", 0)
            fetched, to_fetch = event.get("fetched", 0), event.get("to_fetch", 0)
            total = max(built, to_build) + max(fetched, to_fetch)
            if not total:
                self.progress.update(task, detail=detail[:60])
                return
            # Nix reports a derivation (or a path to fetch) when it starts: the latest is still under way.
            detail = nix_work_text(event, over=False)
            self.progress.update(task, total=total, completed=max(0, built + fetched - 1), detail=detail)
            self.summaries[stage] = nix_work_text(event, over=True)
            return
        if stage == "compressing" and "layers_total" in event:
            if self.compress_started is None:
                self.compress_started = event.get("time")
            done, total, written = event.get("layers_done", 0), event["layers_total"], event.get("compressed_bytes", 0)
            detail = f"{done}/{total} layers, {size(written)}"
            rate = rate_text(written, (event.get("time") or 0) - (self.compress_started or 0))
            if rate:
                detail += f", {rate}"
            self.progress.update(task, total=total, completed=done, detail=detail)
            return
        if stage == "done":
            detail = f"{size(event.get('size'))} in {event.get('layers')} layers" if "size" in event else detail
            self.progress.update(task, total=1, completed=1, detail=detail)
            return
        self.progress.update(task, detail=detail[:60])


# ---- results -----------------------------------------------------------------------
