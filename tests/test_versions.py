"""Which software made a run (``run/versions.py``): recorded, compared, shown."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys

import pytest

import torch

from sae_shards.cli import main as cli_main
from sae_shards.run.versions import (changed_versions, describe, device_name, fp32_matmul,
                                     library_versions, run_versions, version_line)


def test_the_versions_are_this_process_s():
    found = library_versions()
    assert list(found)[:2] == ["sae-shards", "python"]
    assert found["python"] == platform.python_version()
    assert found["torch"] == torch.__version__
    assert found["trl"] == importlib.metadata.version("trl")
    assert found["sae-shards"] == importlib.metadata.version("sae-shards")


def test_changes_are_named_with_both_versions():
    now = {"sae-shards": "0.2.0", "python": "3.11.7", "trl": "1.16.0", "peft": None}
    assert changed_versions({**now}, now) == {}
    assert changed_versions(None, now) == {}  # a run of an earlier sae-shards records none
    saved = {**now, "trl": "1.15.0", "peft": "0.20.0"}
    changed = changed_versions(saved, now)
    assert changed == {"trl": ["1.15.0", "1.16.0"], "peft": ["0.20.0", None]}
    assert describe(changed) == "trl 1.15.0 -> 1.16.0, peft 0.20.0 -> none"
    # a library the run did not record (added to LIBRARIES later) is not a change
    assert changed_versions({"trl": "1.16.0"}, now) == {}


def test_the_version_line_leaves_out_what_is_not_installed(capsys):
    assert version_line({"sae-shards": "0.1.0", "deepspeed": None, "torch": "2.13.0"}) == (
        "sae-shards 0.1.0, torch 2.13.0")
    assert version_line(None) == "not recorded"
    assert cli_main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == version_line(library_versions())


def test_the_device_is_named_as_kernels_differ_by_it():
    assert device_name(torch.device("cpu")) == "cpu"
    if torch.cuda.is_available():  # the GPU machine: its own name
        assert device_name(torch.device("cuda")) == f"cuda {torch.cuda.get_device_name()}"
    assert describe(changed_versions({"device": "cpu"}, {"device": "cuda NVIDIA H200"})) == (
        "device cpu -> cuda NVIDIA H200")


def test_the_fp32_matmul_precision_is_recorded_and_a_change_is_named():
    """TF32 (or bf16 passes) in fp32 products changes every SAE step's rounding: a run records
    torch's setting, and a resume under another is a change like another library version's."""
    started = run_versions(torch.device("cpu"))
    assert started["fp32 matmul"] == "ieee" and started["device"] == "cpu"  # torch's default
    assert fp32_matmul(torch.device("cuda")) == "ieee"  # read from flags: no GPU needed
    now = {**started, "fp32 matmul": "tf32"}
    assert describe(changed_versions(started, now)) == "fp32 matmul ieee -> tf32"
    assert "fp32 matmul tf32" in version_line(now)


@pytest.mark.parametrize("setting, cpu, cuda", [
    ("torch.set_float32_matmul_precision('high')", "tf32", "tf32"),
    ("torch.set_float32_matmul_precision('medium')", "bf16", "tf32"),
    ("torch.backends.cuda.matmul.allow_tf32 = True", "ieee", "tf32"),  # transformers' tf32=True
    # the newer API: torch then raises on reading the legacy flags, which must not be read
    ("torch.backends.cuda.matmul.fp32_precision = 'tf32'", "ieee", "tf32"),
    ("torch.backends.fp32_precision = 'tf32'", "tf32", "tf32"),
    ("torch.backends.cuda.matmul.allow_tf32 = True; "
     "torch.backends.cuda.matmul.fp32_precision = 'ieee'", "ieee", "ieee"),
])
def test_each_way_a_script_sets_the_precision_is_read(setting, cpu, cuda):
    """In a fresh process (the flags are process-wide, and torch forbids reading the legacy ones
    once the new ones are set): whichever way the script set it, the recorded precision is
    what torch computes with, and reading it raises nothing."""
    code = ("import torch\nfrom sae_shards.run.versions import fp32_matmul\n" + setting + "\n"
            "print(fp32_matmul(torch.device('cpu')), fp32_matmul(torch.device('cuda')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [cpu, cuda]


def test_a_torch_before_2_9_is_read_in_the_same_words(monkeypatch):
    """torch 2.4-2.8 (allowed by pyproject) has no fp32_precision: the legacy settings are read
    and said as ieee/tf32/bf16 (audit 112 F6: the CPU's were recorded as highest/high)."""
    import types

    monkeypatch.setattr(torch.backends, "mkldnn", types.SimpleNamespace())  # no .matmul
    before = torch.get_float32_matmul_precision()
    try:
        for legacy, word in (("highest", "ieee"), ("high", "tf32"), ("medium", "bf16")):
            torch.set_float32_matmul_precision(legacy)
            assert fp32_matmul(torch.device("cpu")) == word
    finally:
        torch.set_float32_matmul_precision(before)
    # a GPU's: transformers' tf32=True sets allow_tf32 there (audit 114 M41: always "ieee")
    for allowed, word in ((True, "tf32"), (False, "ieee")):
        monkeypatch.setattr(torch.backends.cuda, "matmul", types.SimpleNamespace(
            allow_tf32=allowed))
        assert fp32_matmul(torch.device("cuda")) == word
