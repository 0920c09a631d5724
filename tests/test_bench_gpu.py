"""The GPU check's CPU-safe parts: scripts/bench_gpu_overhead.py (--tiny smoke run, the 0.5B
shape, its tokenizer) and scripts/gpu_check.sh (--cpu-smoke end to end, the refusal without a
GPU). Not marked ``gpu``: gpu_check.sh runs ``pytest -m gpu`` and must not run itself."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scripts.bench_gpu_overhead import (
    QWEN2_5_0_5B, full_vocab_tokenizer, main)
from sae_shards.recipe.models import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _rows(text: str) -> dict[str, list[str]]:
    """Table rows of the report by mode: ``[mode, what, loop s, step s, SAE steps, samples per
    slot, peak mem, overhead (loop), overhead (step), note]``."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| mode")]
    return {r[0]: r for r in rows}


def _ratio(cell: str) -> float:
    assert cell.endswith("x"), cell
    return float(cell[:-1])


def test_tiny_benchmark_runs_every_mode_and_reports_the_sae_work(tmp_path):
    out = tmp_path / "runs" / "bench.md"  # a folder not made yet: made, not a crash after the run
    text = main(["--tiny", "--out", str(out)])
    assert out.read_text() == text + "\n"
    assert "14 matrices" in text and "64-slot bfloat16 buffer" in text
    rows = _rows(text)
    assert list(rows) == ["rl", "capture", "budget", "fixed"]
    for mode, r in rows.items():
        assert float(r[2]) > 0 and float(r[3]) > 0, r
        assert all(math.isfinite(_ratio(c)) and _ratio(c) > 0 for c in r[7:9]), r
        assert r[6] == "-" and r[9] == "", r  # no GPU memory on CPU, no out-of-memory note
    assert _ratio(rows["rl"][7]) == _ratio(rows["rl"][8]) == 1.0
    assert rows["rl"][4] == rows["capture"][4] == "0"  # no SAE without a callback / before start
    # 4 RL steps, min_samples 2: pushes 2..4 train; fixed: 4 steps of batch 8 each
    assert rows["fixed"][4] == str(4 * 3) and float(rows["fixed"][5]) == 4 * 3 * 8 / 4
    assert int(rows["budget"][4]) >= 1 and float(rows["budget"][5]) > 0


def test_bench_model_has_the_qwen2_5_0_5b_shape_and_every_matrix_is_captured():
    from transformers import AutoModelForCausalLM, Qwen2Config

    from sae_shards.capture.selection import default_targets, select_targets, target_shapes

    with torch.device("meta"):  # shapes only, nothing allocated
        model = AutoModelForCausalLM.from_config(Qwen2Config(**QWEN2_5_0_5B))
    assert sum(p.numel() for p in model.parameters()) == 494_032_768  # Qwen2.5-0.5B, tied
    shapes = target_shapes(select_targets(model, default_targets(model)))
    assert len(shapes) == 24 * 7  # q, k, v, o, gate, up, down in every layer
    assert sum(math.prod(s) for s in shapes.values()) == 357_826_560


def test_widened_tokenizer_keeps_prompts_and_decodes_every_id():
    base, wide = build_tokenizer(), full_vocab_tokenizer(1024)
    assert len(wide) == 1024
    prompt = "<B> the quick fox"
    assert wide(prompt)["input_ids"] == base(prompt)["input_ids"]
    tail = [wide.decode([i]) for i in range(len(base), 1024)]  # every extra id: letters
    assert all(re.fullmatch("[a-z]{2,}", t) for t in tail) and len(set(tail)) == len(tail)


def _gpu_check(tmp_path: Path, *args: str, timeout: int = 300,
               **env_extra: str) -> subprocess.CompletedProcess:
    """The script started from ``tmp_path`` with a relative ``OUT``: its report lands there (it
    once landed in the repository, where the script changes directory)."""
    env = {**os.environ, "PYTHON": sys.executable, "OUT": "gpu_check.md", **env_extra}
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=timeout)


SMOKE_TESTS = "-m gpu tests/test_gpu.py -k buffer"
"""The smoke run's share of the gpu tests (the suite runs all of them on the CPU itself)."""


@pytest.mark.slow  # the whole script: a pytest run and the benchmark (~30 s)
def test_gpu_check_cpu_smoke_writes_the_report(tmp_path):
    proc = _gpu_check(tmp_path, "--cpu-smoke", PYTEST_ARGS=SMOKE_TESTS)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (tmp_path / "gpu_check.md").read_text()
    assert report.startswith("# GPU check (CPU smoke run)")
    assert re.search(r"^- date: \d{4}-\d\d-\d\d \d\d:\d\d UTC$", report, re.M)
    assert "- GPU: none (--cpu-smoke)" in report
    assert f"- torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}" in report
    tests = re.search(rf"^- tests \(`python -m pytest -q {SMOKE_TESTS}`, exit code 0\): (.*)$",
                      report, re.M)
    assert tests and re.match(r"\d+ passed, \d+ skipped, \d+ deselected", tests.group(1)), report
    assert "failed" not in tests.group(1)
    assert set(_rows(report)) == {"rl", "capture", "budget", "fixed"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_gpu_check_without_a_gpu_stops_with_a_message(tmp_path):
    proc = _gpu_check(tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "needs a CUDA GPU" in proc.stderr and "--cpu-smoke" in proc.stderr
    assert not (tmp_path / "gpu_check.md").exists()


def test_gpu_check_rejects_unknown_arguments(tmp_path):
    proc = _gpu_check(tmp_path, "--cpu", timeout=60)
    assert proc.returncode != 0 and "usage: bash scripts/gpu_check.sh [--cpu-smoke]" in proc.stderr
