"""Ground truth, sign invariance and nulls on cases whose answer is known by construction."""

import pytest
import torch

from sae_shards.planted.groundtruth import (abs_cosine, auroc, class_means, energy_shares, flatten, label_sets,
                                    norm_features, presence, principal_direction,
                                    task_directions_with_source,
                                    separability, shuffled, supervised_reference, task_directions,
                                    unflatten)

SHAPES = {"w1": (12, 8), "w2": (8, 12), "b": (6,)}
TASKS = ["A", "B", "C", "D"]


def _planted(n, seed, sign_flip=True, strength=1.0, noise=1.0):
    """Per-sample: random-sign multiple of its task's direction plus isotropic noise."""
    g = torch.Generator().manual_seed(seed)
    d = 12 * 8 * 2 + 6
    truth = torch.randn(len(TASKS), d, generator=torch.Generator().manual_seed(123))
    truth = truth / truth.norm(dim=1, keepdim=True)
    labels = [TASKS[i % len(TASKS)] for i in torch.randperm(n, generator=g).tolist()]
    k = torch.tensor([TASKS.index(y) for y in labels])
    # balanced random signs: within each task, every other sample (in random order) is flipped
    sign = torch.ones(n)
    if sign_flip:
        for t in TASKS:
            idx = [i for i, y in enumerate(labels) if y == t]
            sign[idx[1::2]] = -1
    coef = strength * (1 + 0.3 * torch.rand(n, generator=g)) * sign
    x = coef[:, None] * truth[k] + noise * torch.randn(n, d, generator=g) / d**0.5
    return x, labels, truth


def test_principal_direction_recovers_a_sign_flipping_task():
    x, labels, truth = _planted(400, 0)
    dirs = task_directions(x, labels, TASKS)
    cos = (dirs * truth).sum(1).abs()
    assert (cos > 0.95).all(), cos
    # the signed mean of the same samples does not: signs cancel (why everything is sign-free)
    for k, t in enumerate(TASKS):
        mean = x[torch.tensor([y == t for y in labels])].mean(0)
        assert abs(float(mean @ truth[k] / mean.norm())) < 0.5


def test_principal_direction_matches_eigh_of_second_moment():
    x = torch.randn(30, 50, generator=torch.Generator().manual_seed(1))
    _, vecs = torch.linalg.eigh((x.T @ x).double())
    want = vecs[:, -1].float()
    got = principal_direction(x)
    assert abs(float(got @ want)) == pytest.approx(1.0, abs=1e-5)


def test_shuffled_labels_destroy_the_ground_truth():
    x, labels, truth = _planted(400, 0)
    null = task_directions(x, shuffled(labels, torch.Generator().manual_seed(0)), TASKS)
    assert (null * truth).sum(1).abs().max() < 0.6


def test_shuffled_principal_null_collapses_onto_the_strongest_task_class_means_do_not():
    """Why ``evaluate`` reports ``mmcs_class_mean`` beside the principal-direction mmcs: with
    signed samples, the principal direction of a random quarter of them is the strongest task's
    own direction (a near-perfect "null"), while their class mean is the grand mean."""
    x, labels, truth = _planted(800, 0, sign_flip=False)
    a = torch.tensor([y == "A" for y in labels])
    x[a] = x[a] * 1.3  # task A a little stronger than the others, as one task is in real runs
    assert (abs_cosine(class_means(x, labels, TASKS), truth).diag() > 0.95).all()
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        y = shuffled(labels, g)
        principal_null = abs_cosine(task_directions(x, y, TASKS), truth)  # [K null, K truth]
        assert (principal_null[:, 0] > 0.9).all(), principal_null
        mean_null = abs_cosine(class_means(x, y, TASKS), truth)
        assert (mean_null.max(1).values < 0.75).all(), mean_null
    with pytest.raises(ValueError, match="'E' has no samples"):
        class_means(x, labels, TASKS + ["E"])


def test_auroc_known_values():
    pos = torch.tensor([0, 0, 1, 1], dtype=torch.bool)
    assert auroc(torch.tensor([0.1, 0.2, 0.8, 0.9]), pos) == 1.0
    assert auroc(torch.tensor([0.9, 0.8, 0.2, 0.1]), pos) == 0.0
    assert auroc(torch.tensor([0.5, 0.5, 0.5, 0.5]), pos) == 0.5
    g = torch.Generator().manual_seed(0)
    s, p = torch.rand(50, generator=g), torch.rand(50, generator=g) > 0.5
    brute = sum((float(a > b) + 0.5 * float(a == b)) for a in s[p] for b in s[~p]) / (p.sum() * (~p).sum())
    assert auroc(s, p) == pytest.approx(float(brute))
    assert auroc(s, torch.zeros(50, dtype=torch.bool)) != auroc(s, torch.zeros(50, dtype=torch.bool))


def test_supervised_reference_and_its_null():
    x, labels, _ = _planted(600, 0)
    shapes = dict(SHAPES)
    samples = unflatten(x, shapes)
    feats = norm_features(samples, list(shapes))
    tr, te = slice(0, 400), slice(400, 600)
    ref = supervised_reference(x[tr], labels[tr], x[te], labels[te], feats[tr], feats[te], TASKS)
    assert ref.auroc_mean > 0.95
    null_labels = shuffled(labels[tr], torch.Generator().manual_seed(1))
    null = supervised_reference(x[tr], null_labels, x[te], labels[te], feats[tr], feats[te], TASKS)
    assert null.auroc_mean < 0.7 and null.auroc_mean < ref.auroc_mean - 0.25


def test_norm_centroid_separates_tasks_living_on_different_rows():
    g = torch.Generator().manual_seed(0)
    n = 200
    labels = [TASKS[i % 4] for i in range(n)]
    w1 = 0.05 * torch.randn(n, 12, 8, generator=g)
    for i, y in enumerate(labels):  # task k writes (with a random sign) into rows 3k..3k+2
        k = TASKS.index(y)
        w1[i, 3 * k:3 * k + 3] += (1 if torch.rand(1, generator=g) > 0.5 else -1) * torch.randn(3, 8, generator=g)
    samples = {"w1": w1, "b": 0.05 * torch.randn(n, 6, generator=g)}
    feats = norm_features(samples, ["w1", "b"])
    x = flatten(samples, ["w1", "b"])
    ref = supervised_reference(x[:150], labels[:150], x[150:], labels[150:], feats[:150], feats[150:], TASKS)
    assert ref.centroid_accuracy > 0.9 and ref.chance_accuracy == 0.25



def test_flatten_unflatten_round_trip():
    g = torch.Generator().manual_seed(0)
    samples = {n: torch.randn(3, *s, generator=g) for n, s in SHAPES.items()}
    back = unflatten(flatten(samples, list(SHAPES)), SHAPES)
    assert all(torch.equal(back[n], samples[n]) for n in SHAPES)


def _mixed_steps(n, seed):
    """Per-step blends of a `mixed` schedule: each step holds 2-3 tasks, each with a random sign
    and size, plus noise; a few steps hold one task."""
    g = torch.Generator().manual_seed(seed)
    d = 12 * 8 * 2 + 6
    truth = torch.randn(len(TASKS), d, generator=torch.Generator().manual_seed(123))
    truth = truth / truth.norm(dim=1, keepdim=True)
    xs, labels = [], []
    for i in range(n):
        size = 1 if i % 10 == 0 else 2 + int(torch.randint(0, 2, (1,), generator=g))
        present = torch.randperm(len(TASKS), generator=g)[:size].tolist()
        x = 0.1 * torch.randn(d, generator=g) / d**0.5
        for k in present:
            x = x + (1 if torch.rand(1, generator=g) > 0.5 else -1) * (0.5 + torch.rand(1, generator=g)) * truth[k]
        xs.append(x)
        labels.append(sorted(TASKS[k] for k in present))
    return torch.stack(xs), labels, truth


def test_label_sets_and_presence():
    assert label_sets(["A", ["B", "C"], ("A",)]) == [{"A"}, {"B", "C"}, {"A"}]
    assert presence(["A", ["B", "C"], ["A", "C"]], "C").tolist() == [False, True, True]


def test_one_task_samples_give_the_direction_when_there_are_enough():
    x, labels, truth = _mixed_steps(400, 0)
    dirs, source = task_directions_with_source(x, labels, TASKS)
    assert source == {t: "single" for t in TASKS}  # every 10th step holds one task: >= 2 each
    assert ((dirs * truth).sum(1).abs() > 0.9).all()
    # with no one-task sample the task's direction comes from every step it is present in
    multi = [i for i, y in enumerate(labels) if len(y) > 1]
    dirs, source = task_directions_with_source(x[multi], [labels[i] for i in multi], TASKS)
    assert source == {t: "present" for t in TASKS}
    assert ((dirs * truth).sum(1).abs() > 0.5).all()  # a blend: still nearest its own task
    with pytest.raises(ValueError, match="no samples"):
        task_directions_with_source(x[:5], [["A"]] * 5, ["A", "E"])


def test_a_task_direction_comes_from_exactly_its_one_task_samples():
    """With two or more one-task samples a task's direction is the principal direction of
    exactly those, not of every sample the task is present in (blended samples three times
    larger would otherwise dominate it; audit 125, G04)."""
    from sae_shards.planted.groundtruth import principal_direction

    x = torch.randn(12, 7, generator=torch.Generator().manual_seed(0))
    labels = [["A"]] * 3 + [["B"]] * 3 + [["A", "B"]] * 6
    x[6:] *= 3.0
    dirs, source = task_directions_with_source(x, labels, ["A", "B"])
    assert source == {"A": "single", "B": "single"}
    for k, rows in enumerate(([0, 1, 2], [3, 4, 5])):
        assert abs(float(dirs[k] @ principal_direction(x[rows]))) == pytest.approx(1.0, abs=1e-5)


def test_multi_label_supervised_reference_and_its_null():
    """Mixed steps: "task present" is separable sign-free; shuffled label sets are at chance."""
    x, labels, _ = _mixed_steps(600, 1)
    samples = unflatten(x, dict(SHAPES))
    feats = norm_features(samples, list(SHAPES))
    tr, te = slice(0, 400), slice(400, 600)
    ref = supervised_reference(x[tr], labels[tr], x[te], labels[te], feats[tr], feats[te], TASKS)
    assert ref.auroc_mean > 0.8, ref.auroc_per_task
    assert ref.centroid_accuracy == ref.centroid_accuracy  # one-task test steps exist
    g = torch.Generator().manual_seed(0)
    null = supervised_reference(x[tr], shuffled(labels[tr], g), x[te], labels[te], feats[tr],
                                feats[te], TASKS)
    assert abs(null.auroc_mean - 0.5) < 0.12 and null.auroc_mean < ref.auroc_mean - 0.2
    # the per-event case (one task each) still gives the single-label figures
    xe, ye, _ = _planted(400, 2)
    fe = norm_features(unflatten(xe, dict(SHAPES)), list(SHAPES))
    one = supervised_reference(xe[:300], ye[:300], xe[300:], ye[300:], fe[:300], fe[300:], TASKS)
    sets = supervised_reference(xe[:300], [[y] for y in ye[:300]], xe[300:], [[y] for y in ye[300:]],
                                fe[:300], fe[300:], TASKS)
    assert one.auroc_per_task == sets.auroc_per_task and one.centroid_accuracy == sets.centroid_accuracy


def test_energy_shares():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [3.0, 0.0]])
    shares = energy_shares(x, ["A", "B", ["A", "B"], "C"], ["A", "B", "C"])
    # energies 1, 4, 2 (split 1 + 1), 9: total 16
    assert shares == pytest.approx({"A": 2 / 16, "B": 5 / 16, "C": 9 / 16})
    assert sum(shares.values()) == pytest.approx(1.0)
    # balanced planted tasks share the energy about equally; a task scaled x3 takes the most
    xp, labels, _ = _planted(400, 0)
    even = energy_shares(xp, labels, TASKS)
    assert max(even.values()) < 0.3
    scaled = xp.clone()
    scaled[torch.tensor([y == "B" for y in labels])] *= 3
    assert energy_shares(scaled, labels, TASKS)["B"] > 0.7


def test_rank_ceiling_is_the_best_cosine_a_low_rank_direction_reaches():
    from sae_shards.planted.groundtruth import rank_ceiling

    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(6, 1, generator=g), torch.randn(1, 5, generator=g)
    dense = torch.randn(6, 5, generator=g)
    vec = torch.randn(4, generator=g)
    dirs = {"a": torch.stack([u @ v, dense]), "b": torch.stack([vec, vec])}  # K = 2
    ceiling = rank_ceiling(dirs, rank=1)
    s = torch.linalg.svdvals(dense.double())
    want = ((s[0] ** 2 + vec.double().pow(2).sum())
            / (s.pow(2).sum() + vec.double().pow(2).sum())).sqrt()
    assert abs(float(ceiling[0]) - 1.0) < 1e-6  # exactly rank 1 per target: reachable
    assert abs(float(ceiling[1]) - float(want)) < 1e-6 and float(ceiling[1]) < 0.99
    # ... and the best rank-1 direction (top singular pair, the vector whole) reaches it
    U, S, Vh = torch.linalg.svd(dense.double())
    best = torch.cat([(S[0] * U[:, :1] @ Vh[:1]).flatten(), vec.double()])
    target = torch.cat([dense.double().flatten(), vec.double()])
    cos = float(best @ target / (best.norm() * target.norm()))
    assert abs(cos - float(ceiling[1])) < 1e-6
    assert torch.allclose(rank_ceiling(dirs, rank=5), torch.ones(2))


def _pushing_against_the_others(n, seed, noise=0.5):
    """Per-event-like samples: each raises its own task's direction by a random amount and lowers
    another task's by up to more (as a softmax gradient lowers the other classes), with a
    consistent sign, plus isotropic noise."""
    g = torch.Generator().manual_seed(seed)
    d = 12 * 8 * 2 + 6
    truth = torch.randn(len(TASKS), d, generator=torch.Generator().manual_seed(123))
    truth = truth / truth.norm(dim=1, keepdim=True)
    k = torch.randint(0, len(TASKS), (n,), generator=g)
    other = (k + torch.randint(1, len(TASKS), (n,), generator=g)) % len(TASKS)
    own = 0.2 + 1.4 * torch.rand(n, 1, generator=g)
    against = 0.2 + 2.0 * torch.rand(n, 1, generator=g)
    x = own * truth[k] - against * truth[other] + noise * torch.randn(n, d, generator=g) / d**0.5
    return x, [TASKS[i] for i in k.tolist()]


def test_separability_ladder_reads_signs_and_the_probe_reaches_what_labels_allow():
    x_tr, y_tr = _pushing_against_the_others(400, 0)
    x_te, y_te = _pushing_against_the_others(400, 1)
    sep = separability(x_tr, y_tr, x_te, y_te, TASKS)
    assert set(sep) == {"principal_abs", "principal_signed", "class_mean", "linear_probe"}
    m = {k: v["mean"] for k, v in sep.items()}  # measured: 0.77, 1.00, 1.00, 0.92
    # |cos| counts a sample pushing against a task as evidence for it; the signed figures do not
    assert m["principal_signed"] > m["principal_abs"] + 0.15, m
    assert m["class_mean"] > m["principal_abs"] + 0.15, m
    assert m["linear_probe"] > m["principal_abs"] + 0.05, m
    # sign-flipping samples: orientation carries nothing, so the signed figure drops to chance
    xf_tr, yf_tr, _ = _planted(400, 0)
    xf_te, yf_te, _ = _planted(400, 1)
    flip = separability(xf_tr, yf_tr, xf_te, yf_te, TASKS)
    assert flip["principal_abs"]["mean"] > 0.9 and abs(flip["principal_signed"]["mean"] - 0.5) < 0.1
    # labels that carry nothing (drawn independently of the samples, training and test): chance
    g = torch.Generator().manual_seed(0)
    noise_labels = lambda n: [TASKS[i] for i in torch.randint(0, 4, (n,), generator=g).tolist()]  # noqa: E731
    null = separability(x_tr, noise_labels(400), x_te, noise_labels(400), TASKS)
    assert all(abs(v["mean"] - 0.5) < 0.1 for v in null.values()), null
    with pytest.raises(ValueError, match="ridge"):
        separability(x_tr, y_tr, x_te, y_te, TASKS, ridge=0.0)



def test_centroid_accuracy_scores_one_task_samples_against_one_task_centroids():
    """Mixed-label samples neither pull a task's centroid (one-task training samples exist) nor
    count in the accuracy (a sample of two tasks has no one right answer)."""
    e = torch.eye(3)
    tasks = ["A", "B", "C"]
    f_train = torch.stack([e[0], e[0], e[1], e[1], e[2], e[2], 10 * e[2], 10 * e[2]])
    y_train = [["A"], ["A"], ["B"], ["B"], ["C"], ["C"], ["A", "B"], ["A", "B"]]
    f_test = torch.stack([e[0], e[1], e[2], e[2]])
    y_test = [["A"], ["B"], ["C"], ["A", "B"]]  # the last sits at C's centroid
    ref = supervised_reference(f_train, y_train, f_test, y_test, f_train, f_test, tasks)
    assert ref.centroid_accuracy == 1.0 and ref.chance_accuracy == pytest.approx(1 / 3)


def test_norm_features_and_abs_cosine_on_known_values():
    """Rows then columns of each matrix (each sample at unit total norm), |entries| of vectors;
    |cos| is scale-free."""
    w = torch.tensor([[[3.0, 0.0], [0.0, 0.0]]])  # [1, 2, 2]
    b = torch.tensor([[0.0, -4.0]])  # [1, 2]: total norm 5
    feats = norm_features({"w": w, "b": b}, ["w", "b"])
    torch.testing.assert_close(feats, torch.tensor([[0.6, 0.0, 0.6, 0.0, 0.0, 0.8]]))
    x = torch.tensor([[3.0, 4.0], [0.0, -20.0]])
    torch.testing.assert_close(abs_cosine(x, torch.tensor([[2.0, 0.0], [0.0, 1.0]])),
                               torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
