"""The analysis's index page (``llp-fast-analyze``, :mod:`llp_fast.analyze`): the runs' items, the
figures with their captions, and the mark that tells an earlier analysis's folder from a user's."""

from __future__ import annotations

import html
from pathlib import Path

from ._files import write_text

GENERATOR = "<meta name='generator' content='llp-fast-analyze'>"  # what marks a page as ours


def is_analysis(folder: Path) -> bool:
    """Whether ``folder`` holds an earlier analysis (by its page's :data:`GENERATOR`, or title)."""
    try:  # (its head only: the whole page was read, and an unreadable one was a traceback)
        with open(folder / "index.html", encoding="utf-8", errors="replace") as f:
            head = f.read(4096)
    except OSError:
        return False
    return GENERATOR in head or "<title>llp_fast run analysis</title>" in head


def run_line(r: dict) -> str:
    """A run's item on the page: its last epoch's accuracy, and what its pictures lack."""
    last, notes = r["metrics"][-1], []
    if r.get("bank") is None:
        notes.append("no bank in a checkpoint: its curves only, no densities or map")
    elif r.get("saved") is not None and r.get("steps", 0) > 0:  # a checkpoint written on a signal
        epoch, steps = r["saved"], r["steps"]
        notes.append(
            f"its bank is the checkpoint's, after {steps} step{'s' if steps != 1 else ''} of epoch {epoch + 1}: "
            f"the run stopped inside that epoch, after the last metrics row (epoch {last.get('epoch')})"
        )
    elif r.get("saved") is not None and r["saved"] < last.get("epoch", 0):
        notes.append(
            f"its bank is the checkpoint's, after epoch {r['saved']}: the run stopped before epoch "
            f"{last.get('epoch')}'s checkpoint, and a resume trains that epoch again"
        )
    text = f"{r['name']}: epoch {last.get('epoch')}, held-out top-1 {last.get('test_top1')}"
    return f"<li>{html.escape(text + ''.join(f' ({n})' for n in notes), quote=False)}</li>"


def write_index(out: Path, figures: list[tuple[str, str]], runs) -> Path:
    """``out/index.html``: an item per run (:func:`run_line`), a note where two runs trained on
    different data, and each figure (file, caption) with its caption."""
    items = "\n".join(
        f'<figure><img src="{html.escape(f)}" alt="{html.escape(c)}"><figcaption>{html.escape(c)}</figcaption></figure>'
        for f, c in figures
    )
    last = "".join(run_line(r) for r in runs)
    data = [str(r.get("config", {}).get("data") or "") for r in runs]
    if len(runs) == 2 and all(data) and data[0] != data[1]:  # (overlaid without a word)
        last += f"<li>{html.escape(f'note: the two runs trained on different data ({data[0]} and {data[1]})')}</li>"
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'>{GENERATOR}<title>llp_fast run analysis</title>"
        "<style>body{font-family:sans-serif;max-width:1400px;margin:auto}figure{display:inline-block;"
        "margin:8px}img{max-width:660px}</style></head><body>"
        f"<h1>llp_fast run analysis</h1><ul>{last}</ul>{items}</body></html>"
    )
    path = out / "index.html"
    write_text(str(path), page)
    return path
