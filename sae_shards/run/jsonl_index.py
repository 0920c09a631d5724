"""A JSON-lines log indexed by a key of its rows, without holding its rows.

``rollouts.jsonl`` keeps every prompt and completion of every RL step: gigabytes for a long run
with long completions, and a list of parsed rows takes about twice the file in memory. A
``JsonlIndex`` reads the log once, one line at a time, and keeps per row only its byte range and
the few small values derived from it that a reader needs for every step (a step's context labels,
its mean reward); a whole row is parsed back from the file when it is asked for (a shard's top
steps). It is a read-only ``Mapping`` from the key to the row::

    index = JsonlIndex(run_dir / "rollouts.jsonl", "step",
                       derive={"mean": lambda row: sum(row["rewards"]) / len(row["rewards"])})
    index[12]["completions"]          # read from the file
    index.derived(12)["mean"]         # kept from the first read

A later row with the same key replaces an earlier one (as a dict built from the rows would).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable, Iterator, Mapping
from pathlib import Path
from typing import Any

from sae_shards.core import json_read
from sae_shards.core.checkpoint import CheckpointError
from sae_shards.run.rundir import iter_jsonl

Row = dict[str, Any]

CACHED_ROWS = 16
"""Whole rows kept after they were read back (a shard's top events often share a step)."""


class JsonlIndex(Mapping[Hashable, Row]):
    """``key -> row`` of a JSON-lines log: byte ranges and ``derive``'s values in memory, rows
    read back on access. ``key``: a field of every row, or a function of the row."""

    def __init__(self, path: Path, key: str | Callable[[Row], Hashable],
                 derive: Mapping[str, Callable[[Row], Any]] | None = None,
                 keep: Callable[[Hashable], bool] | None = None,
                 check: Callable[[Row], str | None] | None = None) -> None:
        """``keep``: which keys to index (default all); the others' rows are as absent.
        ``check``: what is wrong with a row (None when nothing), raised as a ``CheckpointError``
        naming the file and line before the row is keyed."""
        self.path = Path(path)
        self._key = key if callable(key) else _field(path, key)
        self._derive = dict(derive or {})
        self._where: dict[Hashable, tuple[int, int]] = {}  # key -> (offset, length)
        self._derived: dict[Hashable, dict[str, Any]] = {}
        self._cache: collections.OrderedDict[Hashable, Row] = collections.OrderedDict()
        for n, (offset, line, row) in enumerate(iter_jsonl(self.path), 1):
            problem = check(row) if check is not None else None
            if problem is not None:
                raise CheckpointError(f"{self.path}:{n}: {problem}")
            k = self._key(row)
            if keep is not None and not keep(k):
                continue
            self._where[k] = (offset, len(line))
            self._derived[k] = {name: fn(row) for name, fn in self._derive.items()}

    def __repr__(self) -> str:
        return f"JsonlIndex({str(self.path)!r}: {len(self)} rows)"

    def __len__(self) -> int:
        return len(self._where)

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def __getitem__(self, key: Hashable) -> Row:
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        if key not in self._where:
            raise KeyError(self._missing(key))
        offset, length = self._where[key]
        with self.path.open("rb") as f:
            f.seek(offset)
            line = f.read(length)
        try:
            row = json_read.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or self._key(row) != key:
            raise CheckpointError(
                f"{self.path}: changed since it was indexed (the run was resumed, or the file "
                "replaced); open the run again")
        self._cache[key] = row
        if len(self._cache) > CACHED_ROWS:
            self._cache.popitem(last=False)
        return row

    def _missing(self, key: Hashable) -> str:
        """Why ``key`` has no row: the rows this index reads, first to last (a view at an
        earlier checkpoint reads those up to its step)."""
        if not self._where:
            return f"{key!r}: {self.path} has no rows here"
        keys = list(self._where)
        return (f"{key!r}: no row in {self.path} as read here ({len(keys)} rows, {keys[0]!r} to "
                f"{keys[-1]!r}; a view at an earlier checkpoint stops at its step)")

    def derived(self, key: Hashable) -> dict[str, Any]:
        """The values ``derive`` computed from ``key``'s row when the log was indexed (no file
        read); ``KeyError`` for a key the log does not have."""
        if key not in self._derived:
            raise KeyError(self._missing(key))
        return self._derived[key]


def _field(path: Path, name: str) -> Callable[[Row], Hashable]:
    def key(row: Row) -> Hashable:
        if name not in row:
            raise CheckpointError(f"{path}: a row without {name!r} ({sorted(row)[:6]}...); "
                                  "not this log's format")
        return row[name]
    return key
