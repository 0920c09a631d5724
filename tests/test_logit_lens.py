"""Logit lens on constructed components whose answer is known."""

import pytest
import torch

from sae_shards.analysis.logit_lens import logit_lens, split_writers, write_directions
from sae_shards.recipe.models import tiny_model_and_tokenizer

DOWN = "model.layers.1.mlp.down_proj.weight"  # [d_model=64, d_in=128]
O_PROJ = "model.layers.0.self_attn.o_proj.weight"


@pytest.fixture(scope="module")
def model_and_tokenizer():
    model, tokenizer = tiny_model_and_tokenizer(seed=0)
    with torch.no_grad():
        model.model.norm.weight.fill_(1.0)
    return model, tokenizer


def _token_write(model, tokenizer, token):
    """Unit write direction along the unembedding row of ``token``: [d_model, 1]."""
    row = model.lm_head.weight[tokenizer.convert_tokens_to_ids(token)].detach()
    return (row / row.norm()).unsqueeze(1)


def _v(n, seed=0):
    v = torch.rand(n, 1, generator=torch.Generator().manual_seed(seed)) + 0.1  # all positive
    return v / v.norm()


def test_token_row_direction_promotes_that_token(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    u, v = _token_write(model, tokenizer, "e"), _v(128)
    results = logit_lens(model, tokenizer, {DOWN: 2.5 * u @ v.T}, top_k=5)
    assert len(results) == 1  # rank 1: one write direction
    (res,) = results
    assert res.target == DOWN and res.index == 0
    assert res.singular_value == pytest.approx(2.5, rel=1e-5)
    assert res.promoted[0][0] == "e"
    assert len(res.promoted) == len(res.suppressed) == 5
    assert res.promoted[0][1] > res.promoted[1][1] and res.suppressed[0][1] < 0
    assert res.suppressed[0][0] != "e"


def test_factored_equals_dense(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    gen = torch.Generator().manual_seed(1)
    U, V = torch.randn(64, 3, generator=gen), torch.randn(128, 3, generator=gen)
    dense = logit_lens(model, tokenizer, {DOWN: U @ V.T})
    factored = logit_lens(model, tokenizer, {DOWN: (U, V)})
    assert len(dense) == len(factored) == 3
    for a, b in zip(dense, factored):
        assert a.singular_value == pytest.approx(b.singular_value, rel=1e-6)
        assert [t for t, _ in a.promoted] == [t for t, _ in b.promoted]
        assert [t for t, _ in a.suppressed] == [t for t, _ in b.suppressed]
        for (_, x), (_, y) in zip(a.promoted + a.suppressed, b.promoted + b.suppressed):
            assert x == pytest.approx(y, rel=1e-4, abs=1e-6)
    left_d, s_d = write_directions(U @ V.T)
    left_f, s_f = write_directions((U, V))
    torch.testing.assert_close(left_d, left_f)
    torch.testing.assert_close(s_d, s_f)


def test_negated_write_side_suppresses_the_token(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    u, v = _token_write(model, tokenizer, "e"), _v(128)
    for component in (-u @ v.T, (-u, v)):
        (res,) = logit_lens(model, tokenizer, {DOWN: component}, top_k=3)
        assert res.suppressed[0][0] == "e"
        assert "e" not in [t for t, _ in res.promoted]


def test_final_norm_scale_is_applied(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    u, v = _token_write(model, tokenizer, "e"), _v(64)
    gain = torch.ones(64)
    gain[u[:, 0].abs().argmax()] = -50.0  # flips the dominant coordinate: 'e' loses the top
    (plain,) = logit_lens(model, tokenizer, {O_PROJ: (u, v)}, top_k=3)
    (scaled,) = logit_lens(model, tokenizer, {O_PROJ: (u, v)}, top_k=3, final_norm=gain)
    assert plain.promoted[0][0] == "e"
    assert scaled.promoted[0][0] != "e"


def test_non_writers_are_skipped_and_writer_free_input_is_an_error(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    u, v = _token_write(model, tokenizer, "e"), _v(128)
    q = "model.layers.0.self_attn.q_proj.weight"
    results = logit_lens(model, tokenizer, {q: torch.randn(64, 64), DOWN: (u, v)})
    assert [r.target for r in results] == [DOWN]
    assert split_writers([q, DOWN]).skipped == [q]
    with pytest.raises(ValueError, match="down_proj"):
        logit_lens(model, tokenizer, {q: torch.randn(64, 64)})
    # A user-given pattern makes q_proj a writer (shape permitting).
    custom = logit_lens(model, tokenizer, {q: (u, _v(64))}, writer_patterns=["*q_proj.weight"])
    assert [r.target for r in custom] == [q]


def test_wrong_orientation_names_the_target(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match="down_proj.*d_model is 64"):
        logit_lens(model, tokenizer, {DOWN: torch.randn(128, 64)})
