"""JSON-lines logs read one line at a time (``rundir.iter_jsonl``) and indexed without holding
their rows (``JsonlIndex``, what ``RunView.rollouts`` is)."""

import json
import logging
import tracemalloc

import pytest

from sae_shards.core.checkpoint import CheckpointError
from sae_shards.run import rundir
from sae_shards.run.jsonl_index import JsonlIndex


def _rollouts(path, steps, completion_chars=40):
    rows = [{"step": s, "prompts": [f"<A> p{s}"] * 4,
             "completions": [f"é{s}" + "x" * completion_chars] * 4,
             "rewards": [0.5, None, 1.0, float(s)], "tasks": ["b", "a", "b", "b"]}
            for s in steps]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_iter_jsonl_gives_each_rows_offset_and_line(tmp_path):
    path = tmp_path / "rollouts.jsonl"
    rows = _rollouts(path, range(1, 6))
    data = path.read_bytes()
    got = list(rundir.iter_jsonl(path))
    assert [row for _, _, row in got] == rows == rundir.read_jsonl(path)
    for offset, line, row in got:
        assert data[offset:offset + len(line)] == line and json.loads(line) == row


@pytest.mark.parametrize("torn", [b'{"step": 6, "prompts": ["<A> ab', '{"step": 6, "c": "é'.encode()[:-1]],
                         ids=["mid-json", "mid-utf8-character"])
def test_a_torn_last_line_is_dropped_and_a_bad_middle_line_named(tmp_path, caplog, torn):
    path = tmp_path / "rollouts.jsonl"
    rows = _rollouts(path, range(1, 6))
    with path.open("ab") as f:
        f.write(torn)  # killed mid-write
    with caplog.at_level(logging.WARNING):
        assert rundir.read_jsonl(path) == rows
    assert "dropping a torn last line" in caplog.text
    assert sorted(JsonlIndex(path, "step")) == [1, 2, 3, 4, 5]
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:2] + [torn + b"\n"] + lines[2:]))
    what = "not valid JSON" if torn.startswith(b'{"step": 6, "p') else "not UTF-8 text"
    with pytest.raises(CheckpointError, match=rf"rollouts.jsonl:3: {what}"):
        rundir.read_jsonl(path)
    path.write_bytes(b"".join(lines[:2] + [b"[1, 2]\n"] + lines[2:]))
    with pytest.raises(CheckpointError, match=r"rollouts.jsonl:3: expected a JSON object, got list"):
        JsonlIndex(path, "step")


def test_truncate_keeps_the_accepted_lines_as_written(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"rl_step": 1, "x": 1.50}\n{"rl_step": 2}\n{"rl_step": 3,  "y": "\\u00e9"}\n'
                     b'{"rl_step": 4, "x"')
    rundir.truncate_jsonl(path, lambda row: row["rl_step"] != 2)
    assert path.read_bytes() == b'{"rl_step": 1, "x": 1.50}\n{"rl_step": 3,  "y": "\\u00e9"}\n'
    path.write_bytes(b'{"rl_step": 1}')  # a complete row without its newline: kept, ended
    rundir.truncate_jsonl(path, lambda row: True)
    assert path.read_bytes() == b'{"rl_step": 1}\n'
    absent = tmp_path / "events.jsonl"
    rundir.truncate_jsonl(absent, lambda row: True)
    assert absent.read_bytes() == b""


def test_the_index_reads_rows_back_and_keeps_only_what_derive_computes(tmp_path):
    path = tmp_path / "rollouts.jsonl"
    rows = _rollouts(path, [3, 1, 2])
    with path.open("a") as f:  # a later row of a step replaces the earlier, as dict() would
        f.write(json.dumps({"step": 1, "rewards": [2.0], "tasks": ["c"]}) + "\n")
    index = JsonlIndex(path, "step", derive={"n": lambda row: len(row["rewards"])})
    assert list(index) == [3, 1, 2] and len(index) == 3 and 2 in index and 7 not in index
    assert index[3] == rows[0] and index[2] == rows[2] and index[1]["tasks"] == ["c"]
    assert index.get(7) is None and dict(index.items())[3] == rows[0]
    assert index.derived(1) == {"n": 1} and index.derived(2) == {"n": 4}
    # a missing key says what the log holds (view.rollouts[9999] was a bare KeyError: 9999)
    for get in (index.__getitem__, index.derived):
        with pytest.raises(KeyError, match=r"7: no row in .*rollouts.jsonl as read here \(3 "
                                           r"rows, 3 to 2; a view at an earlier checkpoint"):
            get(7)
    by_pair = JsonlIndex(path, lambda row: (row["step"], len(row["tasks"])))
    assert by_pair[(2, 4)] == rows[2]
    with pytest.raises(CheckpointError, match=r"a row without 'event'"):
        JsonlIndex(path, "event")


def test_a_log_rewritten_after_indexing_is_named_not_misread(tmp_path):
    path = tmp_path / "rollouts.jsonl"
    _rollouts(path, range(1, 6))
    index = JsonlIndex(path, "step")
    rundir.truncate_jsonl(path, lambda row: row["step"] != 2)  # a resume cut the log
    with pytest.raises(CheckpointError, match=r"changed since it was indexed .* open the run again"):
        index[4]


def test_the_index_holds_none_of_the_completions(tmp_path):
    """An eagerly parsed log takes about twice its size; the index keeps byte ranges and the
    derived values: well under 1/20 of a log of long completions (a deterministic count of the
    bytes still allocated, not a timing)."""
    path = tmp_path / "rollouts.jsonl"
    _rollouts(path, range(400), completion_chars=4000)
    size = path.stat().st_size
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        index = JsonlIndex(path, "step", derive={"tasks": lambda row: tuple(row["tasks"])})
        held = tracemalloc.get_traced_memory()[0] - before
        eager = {r["step"]: r for r in rundir.read_jsonl(path)}  # the control: rows held
        held_eager = tracemalloc.get_traced_memory()[0] - before - held
    finally:
        tracemalloc.stop()
    assert len(index) == len(eager) == 400 and size > 6_000_000
    assert held_eager > size / 2  # the control does hold the rows
    assert held < size / 20, (held, size)


def test_a_logs_last_digest_is_its_last_rows_whoever_wrote_it(tmp_path):
    """A resume file records the digest of each step log's last row (``log_last``); a log this
    process has not appended to since it opened it (a resumed script's metrics.jsonl before its
    next logging step) is read from the file: its last row, not its first (audit 114 M17: a
    wrong digest refuses the run's own next resume as another run's)."""
    log = rundir.JsonLines(tmp_path / "log.jsonl")
    assert log.last_digest() is None
    rows = [{"step": s, "reward": 0.5 * s} for s in (1, 2, 3)]
    for row in rows:
        log.append(row)
    assert log.last_digest() == rundir.row_digest(rows[-1])
    reopened = rundir.JsonLines(tmp_path / "log.jsonl")
    assert reopened.last_digest() == rundir.row_digest(rows[-1]) != rundir.row_digest(rows[0])


def test_a_rows_digest_is_its_values_not_its_layout():
    """Rewritten in another layout (compact, keys sorted as `jq -S` does), a row keeps its
    digest; another value does not (audit 114 M18)."""
    row = {"step": 3, "reward": 0.25, "loss": float("nan")}
    again = json.loads(json.dumps({k: row[k] for k in sorted(row)}, separators=(",", ":")))
    assert rundir.row_digest(again) == rundir.row_digest(row)
    assert rundir.row_digest({**row, "reward": 0.5}) != rundir.row_digest(row)


def test_jsonl_index_keeps_only_the_keys_asked_for_and_reads_each_row_back(tmp_path):
    import json

    from sae_shards.run import jsonl_index
    from sae_shards.run.jsonl_index import JsonlIndex

    path = tmp_path / "rollouts.jsonl"
    rows = [{"step": s, "rewards": [float(s)]} for s in range(1, 41)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    even = JsonlIndex(path, "step", keep=lambda k: k % 2 == 0)
    assert list(even) == list(range(2, 41, 2)) and 3 not in even
    index = JsonlIndex(path, "step")
    for r in rows:  # more rows than the cache holds, each read back whole
        assert index[r["step"]] == r
    assert len(index._cache) == jsonl_index.CACHED_ROWS
    assert list(index._cache) == list(range(41 - jsonl_index.CACHED_ROWS, 41))  # the newest kept
    index[25]  # a hit moves to the end: the least recently used goes first
    index[1]
    assert 25 in index._cache and 26 not in index._cache
