"""The journal of a comparison's finished runs (``softprompt compare --resume``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from softprompt.config import UserError
from softprompt.provenance import atomic_write


def _settings(line: str) -> dict | None:
    try:
        return json.loads(line)["settings"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


def comparable(settings: dict | None, defaults: dict | None = None) -> dict | None:
    """Settings as journals compare them: JSON-normalised; the lr sweeps of the methods run only;
    in each section, fields at ``defaults``' value dropped, so a field added later with a default
    that keeps the old behaviour does not orphan a journal (a changed value still does)."""
    if settings is None:
        return None
    s = json.loads(json.dumps(settings, sort_keys=True, default=str))
    c = s.get("compare") or {}
    if "lr_sweep" in c:
        c["lr_sweep"] = {k: v for k, v in c["lr_sweep"].items() if k in c.get("methods", ())}
    base = json.loads(json.dumps(defaults or {}, sort_keys=True, default=str))
    for name, section in s.items():
        if isinstance(section, dict) and isinstance(base.get(name), dict):
            s[name] = {k: v for k, v in section.items() if k not in base[name] or base[name][k] != v}
    return s


class Journal:
    """Finished runs of one comparison, one JSON line each, so an interrupted comparison (hours
    on a CPU) continues where it stopped (``--resume``) instead of starting again.

    The first line is the comparison's settings; a journal written for other settings is never
    mixed in. Each line is appended and flushed whole, so a kill loses at most the run under way.
    """

    def __init__(self, path: Path, settings: dict, resume: bool, defaults: dict | None = None):
        self.path, self.done = path, {}
        head = json.dumps({"settings": settings}, sort_keys=True, default=str)
        if path.exists():
            lines = path.read_text().splitlines()
            if not resume:
                raise UserError(
                    f"{path} holds {max(0, len(lines) - 1)} finished runs of an interrupted comparison: "
                    "add --resume to continue it, or delete the file to start again"
                )
            if not lines or comparable(_settings(lines[0]), defaults) != comparable(settings, defaults):
                raise UserError(
                    f"--resume: {path} was written for other settings (model, data or options); "
                    "rerun with the same options, or delete the file to start again"
                )
            for line in lines[1:]:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line cut by a kill: that run is done again
                self.done[self.key(r["train_size"], r["seed"], r["method"])] = r
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, head + "\n")

    @staticmethod
    def key(n: int | None, seed: int | None, method: str) -> str:
        return f"{method}/{n}/{None if method == 'zero-shot' else seed}"

    def in_plan(self, jobs: list[tuple[int | None, int, str]]) -> list[dict]:
        """The finished runs among ``jobs`` ((size, seed, method)), in their order."""
        return [self.done[k] for k in (self.key(*job) for job in jobs) if k in self.done]

    def add(self, r: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(r, sort_keys=True, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())


def partial_path(journal: Path) -> Path:
    """Where a comparison in progress keeps the document of its finished runs."""
    return journal.parent / (journal.name.removesuffix(".runs.jsonl") + ".partial.json")
