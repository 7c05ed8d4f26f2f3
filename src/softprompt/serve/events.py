"""What the worker thread hands a request's handler: typed events on the job's queue.

A generation job gets ``Admitted`` (its rows are in the batch), then ``Tokens`` (the new text of
some of its rows, once per decode step); a scoring job gets ``Scores``; either may get
``Failed`` instead, at any point. Frozen dataclasses: the event loop reads them, never changes
them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from softprompt.serve.protocol import ApiError


@dataclass(frozen=True)
class Admitted:
    """The job's rows joined the batch; ``info`` is what its ``prepare`` returned beside the rows."""

    info: object


@dataclass(frozen=True)
class RowUpdate:
    """One row's state after a decode step."""

    row: int  # the row's index in its job
    text: str  # its whole text so far (cut at a stop string)
    n_tokens: int  # tokens generated so far
    finish: str | None  # "stop" or "length" once it ended, else None
    pieces: list = field(default_factory=list)  # logprob_json.Piece of the tokens new since the last update


@dataclass(frozen=True)
class Tokens:
    rows: list[RowUpdate]


@dataclass(frozen=True)
class Scores:
    results: list  # engine.ScoreResult per row, in the job's order
    info: object


@dataclass(frozen=True)
class Failed:
    error: ApiError


Event = Admitted | Tokens | Scores | Failed
