"""Smoke test of scripts/bench_experts.py: a small stacked target, two rounds (seconds)."""

import math

from scripts.bench_experts import main


def test_bench_reports_every_expert_count_with_a_finite_ratio():
    text = main(["--quick", "--experts", "1,4,16", "--n-latents", "16", "--k", "2",
                 "--batch", "2", "--threads", "1"])
    first, second = text.split("Encoder inner products")
    rows = [line.split("|") for line in first.splitlines() if line.startswith("| ") and
            line[2].isdigit()]
    assert [int(r[1]) for r in rows] == [1, 4, 16]
    assert [r[2].strip() for r in rows] == ["128 x 128", "64 x 64", "32 x 32"]
    # factors per latent: E (m + n) at rank 1
    assert [int(r[3]) for r in rows] == [256, 512, 1024]
    assert float(rows[0][5]) == 1.0
    assert all(math.isfinite(float(r[5])) and float(r[5]) > 0 for r in rows)
    # the batched alternative was checked equal to the SAE's encoder, and timed at every E
    batched = [line.split("|") for line in second.splitlines() if line.startswith("| ") and
               line[2].isdigit()]
    assert [int(r[1]) for r in batched] == [1, 4, 16]
    assert all(math.isfinite(float(r[4])) and float(r[4]) > 0 for r in batched)


def test_batched_inner_is_the_sum_of_the_per_expert_products():
    """The alternative the bench times computes what the SAE's loop does: sum over experts of
    sum_r a_r^T x_e b_r, checked against an einsum."""
    import torch

    from scripts.bench_experts import batched_inner

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64)
    A = torch.randn(4, 7, 5, 2, generator=g, dtype=torch.float64)
    B = torch.randn(4, 7, 6, 2, generator=g, dtype=torch.float64)
    want = torch.einsum("bemn,eimr,einr->bi", x, A, B)
    assert torch.allclose(batched_inner(x, A, B), want)
    assert not torch.allclose(batched_inner(x, A, B.flip(0)), want)  # experts matched
