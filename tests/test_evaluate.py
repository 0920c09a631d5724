"""`sae-shards evaluate` on short real multiskill runs: figures present, a broken SAE scores worse
than the trained one, and evaluation.json's figures recomputed from their definitions."""

import json
import math
import os
import shutil
import statistics
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from sae_shards.core.checkpoint import (CheckpointError, load_checkpoint, read_safetensors,
                                        save_checkpoint)
from sae_shards.cli import CONFIG_DIR, job_config_from_hydra
from sae_shards.cli import main as cli_main
from sae_shards.analysis.families import MIN_JOINT
from sae_shards.planted.evaluate import evaluate_run

from helpers import (average_linkage_by_definition, edited_copy, random_decoder_copy,
                     shuffled_labels_copy, sparse_safetensors)
from sae_shards.run import rundir
from sae_shards.run.job import run_job


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("planted")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = job_config_from_hydra(compose("config", overrides=[
            "task=multiskill", "rl.max_steps=80", "rl.learning_rate=5e-4", "capture.source=precond",
            "runner.heldout_every=4", "runner.save_samples=true", "runner.sae_steps_per_rl_step=2",
            "sae.n_latents=16", "logging=disabled"]))
    run_job(cfg, out)
    return out


def test_evaluate_reports_every_figure(planted_run):
    r = evaluate_run(planted_run, n_null=3, n_prompts=4)
    assert r["tasks"] == ["A", "B", "C", "D"] and r["n_heldout"] >= 15
    for key in ("mmcs", "mmcs_null", "mmcs_supervised", "mmcs_supervised_null", "auroc_task",
                "auroc_null", "supervised_auroc", "fvu_heldout", "l0"):
        assert r[key] == r[key], key  # not NaN
    assert 0 <= r["mmcs_null"] <= 1 and 0 <= r["auroc_task"] <= 1
    assert set(r["per_task"]) == {"A", "B", "C", "D"}
    on_disk = json.loads((planted_run / "evaluation.json").read_text())
    assert on_disk["mmcs"] == r["mmcs"]
    assert "| mmcs |" in (planted_run / "evaluation.md").read_text()
    # dead latents as the run's summary says (null while the SAE has seen < dead_after samples)
    assert r["dead_frac"] == json.loads((planted_run / "summary.json").read_text())["dead_frac"]
    st = r["steering"]
    assert set(st["per_task"]) == {"A", "B", "C", "D"}
    for e in st["per_task"].values():
        assert set(e["shard_plus"]) == {"A", "B", "C", "D"} and e["coefficient"] == e["coefficient"]
    md = (planted_run / "evaluation.md").read_text()
    assert "selectivity (median over tasks, + sign)" in md
    # every headline row says how to read it, or why it is missing (no null run given here)
    assert "| auroc_null_control | - | n/a: no null-control run given (--null-run DIR" in md
    assert f"| auroc_task | {r['headline']['auroc_task']:.3f} | held-out AUROC" in md
    assert r["auroc_margin"] == pytest.approx(r["auroc_task"] - r["auroc_null"], abs=1e-12)
    # purity and coverage of each task's latent, recomputed from the held-out samples
    from sae_shards.analysis.shards import ShardSet
    from sae_shards.planted.evaluate import EvalData
    from sae_shards.planted.groundtruth import presence

    sae = ShardSet.from_run(planted_run).sae
    x_te, y_te = EvalData(planted_run, [t.name for t in sae.targets]).split(True)
    fires = sae.encode(sae.to_scaled(x_te)).dense(sae.n_latents) != 0
    for t, e in r["per_task"].items():
        on, is_t = fires[:, e["best_latent"]], presence(y_te, t)
        assert e["purity"] == pytest.approx(float((on & is_t).sum()) / max(int(on.sum()), 1)), t
        assert e["coverage"] == pytest.approx(float((on & is_t).sum()) / int(is_t.sum())), t


def test_random_decoder_scores_lower(planted_run, tmp_path):
    trained = evaluate_run(planted_run, n_null=3, steering=False)
    # random decoder and encoder: a pipeline that learnt nothing
    broken = random_decoder_copy(planted_run, tmp_path / "broken")
    r = evaluate_run(broken, n_null=3, steering=False)
    # random directions in ~80k dimensions have |cos| ~ 1/sqrt(D) with anything: near zero
    assert r["mmcs"] < 0.05 and r["mmcs"] < trained["mmcs"] / 3, (r["mmcs"], trained["mmcs"])
    assert r["fvu_heldout"] > trained["fvu_heldout"]
    # the supervised reference does not depend on the SAE: the same ground truth, the same figure
    assert (r["mmcs_supervised"], r["mmcs_supervised_null"]) == \
        (trained["mmcs_supervised"], trained["mmcs_supervised_null"])
    assert 0 < r["mmcs_supervised"] <= 1
    # so does the ground truth's own margin (the held-out directions as shards)
    assert r["mmcs_margin_oracle"] == trained["mmcs_margin_oracle"]
    assert 0 < r["mmcs_margin_oracle"] < 1
    # the signed (class-mean) diagnostic: the references do not depend on the SAE, the random
    # decoder's margin is about zero and the trained SAE's above it (this fixture's samples are
    # per-step updates, whose class means shrink as signs flip: 0.07 measured, so a modest bar)
    cm, cm_broken = trained["mmcs_class_mean"], r["mmcs_class_mean"]
    for ref in ("supervised", "oracle"):
        assert cm_broken[ref] == cm[ref]
    assert abs(cm_broken["latents"]["mmcs_margin"]) < 0.02
    assert cm["latents"]["mmcs_margin"] > cm_broken["latents"]["mmcs_margin"] + 0.03, cm


def test_evaluate_cli_refuses_a_one_task_run_first(short_run_dir, capsys):
    """The default job (task=letters, no samples saved): the first error names the planted
    benchmark, not the samples (saving them would not make the run scorable)."""
    assert cli_main(["evaluate", str(short_run_dir)]) == 2
    err = capsys.readouterr().err
    assert "is a task=letters run (one task)" in err and "experiment=planted" in err


def test_a_truncated_samples_file_is_not_met_with_advice_that_cannot_help(planted_run, tmp_path,
                                                                          capsys):
    """A truncated samples.safetensors was told to read another checkpoint (--checkpoint
    step_N), which reads the same file and fails the same way: the run has one."""
    run = tmp_path / "cut"
    shutil.copytree(planted_run, run)
    samples = run / "samples.safetensors"
    samples.write_bytes(samples.read_bytes()[:1000])
    assert cli_main(["evaluate", str(run), "--n-null", "1"]) == 2
    err = capsys.readouterr().err
    assert "restore it from a copy of the run (a run writes it once, at its end)" in err
    assert "--checkpoint step_XXXXXX" not in err


def test_evaluate_cli_needs_saved_samples(planted_run, tmp_path, capsys):
    run = tmp_path / "no_samples"
    shutil.copytree(planted_run, run)
    (run / "samples.safetensors").unlink()
    assert cli_main(["evaluate", str(run)]) == 2  # a finished run's copy that left them out
    assert ("samples.safetensors: missing, though the run finished (summary.json: 80 RL steps): "
            "a copy of the run without it; copy samples.safetensors from the run"
            in capsys.readouterr().err)
    (run / "summary.json").unlink()
    assert cli_main(["evaluate", str(run)]) == 2  # the run keeps samples: it has not ended
    err = capsys.readouterr().err
    assert ("missing: the run ended before writing it (killed, or stopped at once by a "
            "second signal)") in err
    assert "resume=true" in err
    rundir.lock_run_dir(run)  # a live process writes the run, as a training job would
    try:  # audit 134 F7: it was told to resume the run, a second writer
        done = subprocess.run([sys.executable, "-m", "sae_shards.cli", "evaluate", str(run)],
                              capture_output=True, text=True, timeout=120)
    finally:
        rundir.release_run_dir(run)
    assert done.returncode == 2, done.stderr[-3000:]
    assert (f"samples.safetensors: not written yet: the run is still training (pid "
            f"{os.getpid()} on") in done.stderr
    assert "resume" not in done.stderr
    config = json.loads((run / "config.json").read_text())
    config["runner"]["save_samples"] = False
    (run / "config.json").write_text(json.dumps(config))
    assert cli_main(["evaluate", str(run)]) == 2
    err = capsys.readouterr().err
    assert "samples.safetensors: missing; evaluate needs the run's samples and held-out" in err
    assert "runner.save_samples=true runner.heldout_every=k" in err


@pytest.mark.parametrize("threshold", ["1.5", "0"])  # 0 would join every pair of latents
def test_evaluate_cli_refuses_a_family_threshold_out_of_range(tmp_path, capsys, threshold):
    with pytest.raises(SystemExit) as stop:  # argparse's usage error
        cli_main(["evaluate", str(tmp_path), "--family-threshold", threshold])
    assert stop.value.code == 2
    assert (f"--family-threshold must be in (0, 1], got {float(threshold)}"
            in capsys.readouterr().err)


def test_evaluate_cli_scores_the_checkpoint_asked_with_the_runs_own_seed(planted_run, tmp_path,
                                                                       capsys):
    """Audit 129: --checkpoint must reach the evaluation (the final SAE was scored instead, and
    nothing said so), and the nulls are drawn with the run's own seed unless --seed says
    otherwise, as scripts.planted_sweep evaluates, so the two give the same figures. --task
    with --no-steering, which skips what the task scores, is refused, not ignored."""
    run = tmp_path / "run"
    shutil.copytree(planted_run, run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "seed": 7}))
    step = sorted(p.name for p in (run / rundir.CHECKPOINTS).glob("step_*"))[0]
    for args, checkpoint, seed in ((["--checkpoint", step], step, 7),
                                   (["--checkpoint", "final", "--seed", "11"], "final", 11)):
        out = tmp_path / f"out_{seed}"
        assert cli_main(["evaluate", str(run), "--no-steering", "--n-null", "1", "--out",
                         str(out), *args]) == 0
        evaluation = json.loads((out / "evaluation.json").read_text())
        assert (evaluation["checkpoint"], evaluation["seed"]) == (checkpoint, seed)
    task = tmp_path / "task.py"
    task.write_text("from sae_shards.analysis.reward_task import RewardTask\n"
                    "def const(prompts, completions, **kw):\n    return [0.5] * len(completions)\n"
                    "TASK = RewardTask([{'prompt': 'v 1'}], const)\n")
    capsys.readouterr()
    assert cli_main(["evaluate", str(run), "--no-steering", "--n-null", "1", "--out",
                     str(tmp_path / "out_task"), "--task", f"{task}:TASK"]) == 2
    assert "which --no-steering skips; drop one of them" in capsys.readouterr().err
    assert not (tmp_path / "out_task").exists()


def test_from_step_restricts_the_window(planted_run):
    full = evaluate_run(planted_run, n_null=2, steering=False)
    late = evaluate_run(planted_run, n_null=2, steering=False, from_step=11)
    assert late["from_step"] == 11
    steps = read_safetensors(planted_run / "samples.safetensors")[0]["rl_step"]
    assert 11 in steps.tolist() and late["first_step"] == 11  # step 11 itself is kept
    assert late["n_train"] + late["n_heldout"] <= 70  # steps 11..80 only
    assert full["n_train"] + full["n_heldout"] > 70
    with pytest.raises(Exception, match=r"fewer than 2 non-zero .* from RL step 78 on "
                                        r"\(--from-step; the samples end at step 80\): lower it"):
        evaluate_run(planted_run, n_null=2, steering=False, from_step=78)


def test_evaluation_json_records_what_its_nulls_were_drawn_with(planted_run, tmp_path):
    """The shuffled-label nulls (mmcs_null, auroc_null and the margins over them) depend on how
    many shuffles were drawn and from which seed: evaluation.json records both, so a reader can
    redo the figures. Both the CLI and evaluate_run draw from the run's own seed by default, as
    scripts.planted_sweep does (evaluate_run drew from seed 0, so Python and the CLI disagreed on
    one run). Neither was recorded anywhere without the causal tests."""
    a = evaluate_run(planted_run, n_null=2, seed=7, steering=False, out=tmp_path / "a")
    b = evaluate_run(planted_run, n_null=2, seed=8, steering=False, out=tmp_path / "b")
    assert (a["mmcs_null"], a["auroc_null"]) != (b["mmcs_null"], b["auroc_null"])  # it matters
    on_disk = json.loads((tmp_path / "a" / "evaluation.json").read_text())
    assert (on_disk["n_null"], on_disk["seed"]) == (2, 7)
    assert cli_main(["evaluate", str(planted_run), "--no-steering", "--n-null", "3",
                     "--out", str(tmp_path / "cli")]) == 0
    on_disk = json.loads((tmp_path / "cli" / "evaluation.json").read_text())
    run_seed = json.loads((planted_run / "config.json").read_text())["seed"]
    assert (on_disk["n_null"], on_disk["seed"]) == (3, run_seed)  # the run's own, as the sweep
    assert on_disk["checkpoint"] == "final"
    assert "The SAE of checkpoint final;" in (tmp_path / "cli" / "evaluation.md").read_text()
    assert cli_main(["evaluate", str(planted_run), "--no-steering", "--n-null", "2", "--seed", "7",
                     "--out", str(tmp_path / "seven")]) == 0
    seven = json.loads((tmp_path / "seven" / "evaluation.json").read_text())
    assert seven["seed"] == 7 and seven["mmcs_null"] == a["mmcs_null"]  # the same draw as a's
    # a run of seed 7 (a sweep's capture, say) is evaluated with its seed by default
    copy = tmp_path / "seed7"
    shutil.copytree(planted_run, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "seed": 7}))
    assert cli_main(["evaluate", str(copy), "--no-steering", "--n-null", "2"]) == 0
    again = json.loads((copy / "evaluation.json").read_text())
    assert again["seed"] == 7 and again["mmcs_null"] == a["mmcs_null"]
    python = evaluate_run(copy, n_null=2, steering=False, out=tmp_path / "python")
    assert python["seed"] == 7 and python["mmcs_null"] == a["mmcs_null"]


def test_samples_without_task_labels_get_a_clear_error(planted_run, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from sae_shards.core.checkpoint import CheckpointError

    broken = tmp_path / "no_labels"
    shutil.copytree(planted_run, broken)
    samples = broken / "samples.safetensors"
    with safe_open(samples, "pt") as f:
        header = {k: v for k, v in f.metadata().items() if k != "task_labels"}
    save_file(load_file(samples), samples, metadata=header)
    with pytest.raises(CheckpointError, match=r"samples\.safetensors: no task_labels in the header"):
        evaluate_run(broken, n_null=2, steering=False)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_samples_are_refused_naming_the_tensor_and_count(planted_run, tmp_path, value):
    """A NaN (or Inf) in samples.safetensors is damage (the capture never buffers one). Before,
    a NaN sample counted as an all-zero one: left out of every figure without a word (or, taking
    a task below two samples, "fewer than 2 non-zero samples"); an Inf one failed in torch's
    eigh."""
    names = []

    def poke(tensors, header):  # the first entry of the first three samples of one target
        names.append(sorted(k for k in tensors if k.startswith("sample."))[0])
        tensors[names[0]][:3].view(3, -1)[:, 0] = value

    file = _damaged_samples(planted_run, tmp_path, poke)
    with pytest.raises(CheckpointError, match=(
            rf"{file}: tensor '{names[0]}' has 3 non-finite entries \(NaN or Inf\) of [\d,]+; .*"
            r"damaged or was edited: copy it again from the run, or rerun the run")):
        evaluate_run(file.parent, n_null=1, steering=False)


def test_samples_declaring_more_than_the_buffer_holds_are_refused(planted_run, tmp_path):
    """samples.safetensors holds one row per buffer slot (capture.capacity) of each target: a
    sparse file declaring 10**6 rows of 10**4 numbers (40 GB on no disk, safetensors' size check
    passed) is refused from its header, naming the file and the tensor, before anything maps or
    allocates it."""
    run = tmp_path / "run"
    shutil.copytree(planted_run, run)
    with open(run / "samples.safetensors", "rb") as f:  # keep the header's task_labels
        length = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(length))["__metadata__"]
    file = sparse_safetensors(run / "samples.safetensors",
                              {"sample.model.layers.0.mlp.down_proj.weight": [10**6, 10**4]}, meta)
    capacity = json.loads((run / "config.json").read_text())["capture"]["capacity"]
    with pytest.raises(CheckpointError, match=(
            rf"{file}: tensor 'sample.model.layers.0.mlp.down_proj.weight' is declared with shape "
            rf"\[1000000, 10000\] .*more than capture.capacity={capacity} samples of its largest "
            r"target")):
        evaluate_run(run, n_null=1, steering=False)


def _rewrite_labels(run_dir, fn):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    samples = run_dir / "samples.safetensors"
    with safe_open(samples, "pt") as f:
        meta = dict(f.metadata())
    meta["task_labels"] = json.dumps(fn(json.loads(meta["task_labels"])))
    save_file(load_file(samples), samples, metadata=meta)


def test_headline_opens_the_evaluation(planted_run):
    from sae_shards.planted.evaluate import HEADLINE_KEYS

    r = evaluate_run(planted_run, n_null=2, n_prompts=4, n_shuffled=1)
    on_disk = json.loads((planted_run / "evaluation.json").read_text())
    assert next(iter(on_disk)) == "headline" and tuple(on_disk["headline"]) == HEADLINE_KEYS
    h = r["headline"]
    assert (h["granularity"], h["source"], h["schedule"]) == ("step", "precond", "random")
    assert h["group"] == "body"  # inferred from the targets: every block matrix
    assert h["auroc_null_control"] is None  # no null run given: the sweep fills it
    assert h["auroc_task"] == r["auroc_task"] and h["mmcs_margin"] == r["mmcs_margin"]
    assert h["mmcs_margin_supervised"] == pytest.approx(r["mmcs_supervised"] - r["mmcs_supervised_null"])
    for key in ("steering_selectivity", "steering_selectivity_random", "ablation_selectivity",
                "ablation_selectivity_random", "ablation_selectivity_shuffled", "ablation_own_first"):
        assert h[key] is not None and h[key] == h[key], key
    assert r["ablation"]["per_task"].keys() == {"A", "B", "C", "D"}
    assert set(r["causal"]["kinds"]) == {"shard", "shard_family", "supervised", "random",
                                         "random_shard_family", "shuffled_0"}
    fam = r["families"]
    assert h["n_families"] == fam["n"] == len(fam["members"])
    assert h["auroc_task_family"] == fam["auroc_task"]
    assert h["ablation_selectivity_family"] is not None
    # the family's random control is norm-matched to the family, not to the single shard
    kinds = r["causal"]["kinds"]
    for t in "ABCD":
        assert kinds["random_shard_family"]["per_task"][t]["magnitude"] == pytest.approx(
            abs(kinds["shard_family"]["per_task"][t]["coefficient"]))
        assert kinds["random"]["per_task"][t]["magnitude"] == pytest.approx(
            abs(kinds["shard"]["per_task"][t]["coefficient"]))
    assert h["ablation_selectivity_family_random"] == \
        r["causal"]["families"]["random_shard_family"]["ablation_selectivity"]
    # every latent in exactly one family, but drift latents and latents that never fired
    members = sorted(j for m in fam["members"] for j in m)
    assert set(r["drift"]["latents"]) <= set(fam["left_out"])
    assert sorted(members + fam["left_out"]) == list(range(16))
    assert sum(r["energy_share"].values()) == pytest.approx(1.0)
    assert "## Headline" in (planted_run / "evaluation.md").read_text()


def test_a_run_of_one_task_is_refused(planted_run, tmp_path):
    one = tmp_path / "one_task"
    shutil.copytree(planted_run, one)
    tensors, _ = read_safetensors(one / "samples.safetensors")
    samples = {k.removeprefix("sample."): v for k, v in tensors.items() if k.startswith("sample.")}
    rundir.save_samples(one / "samples.safetensors", samples, tensors["rl_step"].tolist(),
                        tensors["heldout"].tolist(), [["A"]] * len(tensors["rl_step"]))
    with pytest.raises(CheckpointError, match=r"one task label \(\['A'\]\).*task=multiskill"):
        evaluate_run(one, n_null=2, steering=False)


def test_null_run_fills_the_null_control(planted_run, tmp_path):
    """The headline's ``auroc_null_control`` and ``auroc_null_control_family`` are the null run's
    own ``auroc_task`` and family ``auroc_task`` (its labels shuffled here, so its figures differ
    from the evaluated run's and a figure taken from the wrong run shows)."""
    # a run of the real task as the null control: refused, naming it
    with pytest.raises(CheckpointError, match="is a task=multiskill run; the null control"):
        evaluate_run(planted_run, n_null=2, steering=False, null_run=planted_run)
    # the run's samples with shuffled labels, as a multiskill_null run: its figures fill the
    # headline
    null = shuffled_labels_copy(planted_run, tmp_path / "null")
    config = json.loads((null / "config.json").read_text())
    config["task"]["name"] = "multiskill_null"
    (null / "config.json").write_text(json.dumps(config))
    alone = evaluate_run(null, n_null=2, steering=False, out=tmp_path / "alone")
    r = evaluate_run(planted_run, n_null=2, steering=False, null_run=null)
    # evaluated on its own, the null run says what it is; the real run does not
    assert alone["null_control_run"] and not r["null_control_run"]
    assert "This run is a null control" in (tmp_path / "alone" / "evaluation.md").read_text()
    assert "null control**" not in (planted_run / "evaluation.md").read_text()
    assert r["headline"]["auroc_null_control"] == alone["auroc_task"] != r["auroc_task"]
    assert r["headline"]["auroc_null_control_family"] == alone["families"]["auroc_task"] != (
        r["families"]["auroc_task"])
    assert r["null_control"]["run_dir"] == str(null)
    given = evaluate_run(planted_run, n_null=2, steering=False,
                         null_run={"auroc_task": 0.5, "families": {"auroc_task": 0.25}})
    assert (given["headline"]["auroc_null_control"],
            given["headline"]["auroc_null_control_family"]) == (0.5, 0.25)
    # --out: both evaluations go there, and neither run is written to
    for run in (planted_run, null):
        for name in rundir.EVALUATION:
            (run / name).unlink()
    out = tmp_path / "elsewhere"
    assert cli_main(["evaluate", str(planted_run), "--n-null", "2", "--no-steering",
                     "--null-run", str(null), "--out", str(out)]) == 0
    written = json.loads((out / "evaluation.json").read_text())
    assert written["headline"] == r["headline"] and (out / "evaluation.md").is_file()
    assert json.loads((out / "null_control" / "evaluation.json").read_text())["auroc_task"] == (
        alone["auroc_task"])
    assert not any((run / name).exists() for run in (planted_run, null)
                   for name in rundir.EVALUATION)


def test_causal_rollouts_are_sampled_as_the_run_sampled(planted_run, tmp_path):
    """The steering and ablation rewards sample at the run's own settings (config.json's
    rl.temperature...), as analyze's do: evaluate sampled every run at temperature 1."""
    from sae_shards.analysis.interventions import task_rewards
    from sae_shards.analysis.shards import load_run_models

    run = tmp_path / "cold"
    shutil.copytree(planted_run, run)
    config = json.loads((run / "config.json").read_text())
    config["rl"]["temperature"] = 0.05  # as `sae-shards train rl.temperature=0.05` records it
    (run / "config.json").write_text(json.dumps(config))
    r = evaluate_run(run, n_null=1, n_prompts=2, n_samples=2, n_shuffled=0, out=tmp_path)
    _, final, tok, task = load_run_models(run)
    length = config["rl"]["max_completion_length"]
    sampled = {t: {u: e.mean for u, e in task_rewards(final, tok, task, r["tasks"], n_prompts=2,
                                                      n_samples=2, max_new_tokens=length,
                                                      temperature=t).items()}
               for t in (0.05, 1.0)}
    assert sampled[0.05] != sampled[1.0]  # the setting shows in these rewards
    assert r["causal"]["base_final"] == sampled[0.05]
    assert r["causal"]["settings"]["sampling"]["temperature"] == 0.05
    assert "temperature=0.05" in (tmp_path / "evaluation.md").read_text()


def test_drift_latent_is_never_a_tasks_latent(planted_run, tmp_path):
    """A latent forced on for every sample (huge encoder bias) is reported as the drift latent
    and never chosen for a task nor counted in the mmcs matching."""
    broken = tmp_path / "drift"
    shutil.copytree(planted_run, broken)
    loaded = load_checkpoint(broken / "checkpoints" / "final")
    with torch.no_grad():
        loaded.sae.b_enc[3] = 1e6
    save_checkpoint(broken / "checkpoints" / "final", loaded.sae, loaded.stats, loaded.config["meta"])
    r = evaluate_run(broken, n_null=2, steering=False)
    drift = r["drift"]["latents"]
    assert 3 in drift and r["drift"]["density"][3] == 1.0
    assert all(v["best_latent"] not in drift for v in r["per_task"].values())
    assert r["mmcs"] <= r["drift"]["mmcs_with_drift"]
    # the real run has its own always-on latents (RL's common direction); none is a task's
    real = evaluate_run(planted_run, n_null=2, steering=False)
    assert all(v["best_latent"] not in real["drift"]["latents"] for v in real["per_task"].values())
    assert all(d >= 0.8 for d in real["drift"]["density"].values())
    # a threshold above 1 flags nothing, and the mmcs then counts every latent
    every = evaluate_run(planted_run, n_null=2, steering=False, drift_density=1.01)
    assert every["drift"]["latents"] == [] and every["mmcs"] == every["drift"]["mmcs_with_drift"]


def test_a_drift_latent_holding_a_tasks_direction_does_not_count_for_the_mmcs(event_run,
                                                                             tmp_path):
    """A latent forced on for every sample (a drift latent) is given task A's held-out ground
    truth as its decoder direction (its best approximation at the SAE's rank): the mmcs, which
    leaves drift latents out, does not count that match; ``mmcs_with_drift`` does."""
    from sae_shards.analysis.shards import ShardSet
    from sae_shards.planted.evaluate import EvalData
    from sae_shards.planted.groundtruth import flatten, task_directions_with_source, unflatten

    sae = ShardSet.from_run(event_run).sae
    names = [t.name for t in sae.targets]
    data = EvalData(event_run, names)
    x_te, y_te = data.split(True)
    truth, _ = task_directions_with_source(flatten(x_te, names), y_te, data.tasks)
    first = unflatten(truth[:1], {t.name: t.shape for t in sae.targets})  # task A's
    broken = tmp_path / "drift_match"
    shutil.copytree(event_run, broken)
    loaded = load_checkpoint(broken / "checkpoints" / "final")
    forced = 3
    with torch.no_grad():
        for tf in loaded.sae.factors:
            d = first[tf.spec.name][0]
            if tf.spec.is_matrix:  # U V^T: the truth's top singular pairs
                u, sv, vh = torch.linalg.svd(d, full_matrices=False)
                r = tf.spec.rank
                tf.U[forced], tf.V[forced] = u[:, :r] * sv[:r], vh[:r].T
            else:
                tf.d_dec[forced] = d
        loaded.sae.normalize_decoder_()  # saved directions have unit norm
        loaded.sae.b_enc[forced] = 1e6
    save_checkpoint(broken / "checkpoints" / "final", loaded.sae, loaded.stats, loaded.config["meta"])
    r = evaluate_run(broken, n_null=2, steering=False)
    assert r["drift"]["latents"] == [forced]
    task_a = r["per_task"][data.tasks[0]]
    # the forced latent matches task A far better than any other latent, and is not counted
    assert task_a["max_abs_cos_to_truth"] < 0.3
    assert r["drift"]["mmcs_with_drift"] > r["mmcs"] + 0.1


def test_multi_label_steps(planted_run, tmp_path):
    """Per-step samples holding several tasks (the mixed schedule): "task present" is the AUROC
    positive; directions from one-task steps where a task has >= 2 of them, else from all."""
    other = {"A": "B", "B": "C", "C": "D", "D": "A"}
    half = tmp_path / "half"
    shutil.copytree(planted_run, half)
    _rewrite_labels(half, lambda labels: [lab if i % 3 else sorted({lab[0], other[lab[0]]})
                                          for i, lab in enumerate(labels)])
    r = evaluate_run(half, n_null=2, steering=False)
    assert r["multi_label"]
    # evaluation.md says how many samples hold several tasks (audit 134 F5: only the JSON did)
    blended = r["n_multi_label"]
    assert 0 < blended < r["n_train"] + r["n_heldout"]
    assert (f"**{blended} of the {r['n_train'] + r['n_heldout']} steps hold several tasks**"
            in (half / "evaluation.md").read_text())
    from sae_shards.planted.evaluate import to_markdown

    assert "hold several tasks" not in to_markdown({**r, "n_multi_label": 0})
    # the headline table stays one table, every row in it (audit 138 F2: the note was spliced
    # in 4 rows before its end, and those rendered as text), the notes above it
    from sae_shards.planted.evaluate import HEADLINE_KEYS

    for md in (to_markdown(r), to_markdown({**r, "null_control_run": True})):
        lines = md.splitlines()
        start = lines.index("| figure | value | how to read it |")
        end = lines.index("", start)
        assert [row.split(" | ")[0] for row in lines[start + 2:end]] == [
            f"| {key}" for key in HEADLINE_KEYS[:-4]]
        assert "hold several tasks" in "\n".join(lines[lines.index("## Headline"):start])
    # per task: its one-task held-out steps when it has >= 2 (groundtruth tests the rule itself)
    assert "single" in {v["truth_from"] for v in r["per_task"].values()}
    assert 0 <= r["auroc_task"] <= 1 and r["supervised_auroc"] == r["supervised_auroc"]
    assert sum(r["energy_share"].values()) == pytest.approx(1.0)
    by_set = r["energy_share_by_label_set"]
    if by_set is not None:  # recipe.balance present
        assert sum(by_set.values()) == pytest.approx(1.0) and any("+" in k for k in by_set)
    both = tmp_path / "both"
    shutil.copytree(planted_run, both)
    _rewrite_labels(both, lambda labels: [sorted({lab[0], other[lab[0]]}) for lab in labels])
    r = evaluate_run(both, n_null=2, steering=False)
    assert {v["truth_from"] for v in r["per_task"].values()} == {"present"}
    assert r["supervised_centroid_accuracy"] != r["supervised_centroid_accuracy"]  # no one-task step: NaN
    assert json.loads((both / "evaluation.json").read_text())["supervised_centroid_accuracy"] is None
    with pytest.raises(Exception, match="at least one task label"):
        _rewrite_labels(both, lambda labels: [[] for _ in labels])
        evaluate_run(both, n_null=2, steering=False)


def test_a_task_present_in_every_held_out_sample_is_left_out_of_the_auroc_means(planted_run,
                                                                                 tmp_path):
    """AUROC for "task A present" needs held-out samples without A. A task in every one (a
    mixed schedule's per-step samples can hold every task) has no AUROC: it is named, and every
    AUROC mean (latents, families, their nulls, the supervised reference) is over the tasks
    that have one, instead of the latents' mean turning NaN beside a supervised figure
    averaged over the others."""
    every = tmp_path / "every"
    shutil.copytree(planted_run, every)
    _rewrite_labels(every, lambda labels: [sorted({*lab, "A"}) for lab in labels])
    r = evaluate_run(every, n_null=2, steering=False)
    scored = [t for t in r["tasks"] if t != "A"]
    assert r["auroc_unscored"] == ["A"]
    assert r["per_task"]["A"]["auroc"] != r["per_task"]["A"]["auroc"]  # NaN: no negative
    assert r["auroc_task"] == pytest.approx(_mean(r["per_task"][t]["auroc"] for t in scored))
    assert r["headline"]["auroc_task"] == r["auroc_task"]
    assert r["supervised_auroc"] == pytest.approx(
        _mean(r["per_task"][t]["supervised_auroc"] for t in scored))
    fm = r["families"]
    assert fm["auroc_task"] == pytest.approx(
        _mean(fm["per_task"][t]["auroc"] for t in scored))
    for x in (r["auroc_null"], fm["auroc_null"], r["headline"]["auroc_task_family"]):
        assert 0 <= x <= 1
    written = json.loads((every / "evaluation.json").read_text())
    assert written["per_task"]["A"]["auroc"] is None and written["auroc_unscored"] == ["A"]
    md = (every / "evaluation.md").read_text()
    assert "A is in every held-out" in md, md


@pytest.fixture(scope="module")
def event_run(tmp_path_factory):
    """A short real per-event run: body matrices, one sample per prompt group (~20 s)."""
    out = tmp_path_factory.mktemp("events")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = job_config_from_hydra(compose("config", overrides=[
            "experiment=planted", "capture.granularity=group", "rl.max_steps=40",
            "rl.per_device_train_batch_size=32", "task.n_prompts=1024", "capture.capacity=160",
            "runner.heldout_every=2", "runner.sae_start_step=0", "runner.checkpoint_every=0"]))
    run_job(cfg, out)
    return out


def test_per_event_run_end_to_end(event_run, tmp_path):
    import time

    t0 = time.perf_counter()
    r = evaluate_run(event_run, n_null=2)  # the defaults: 8 prompts x 4 samples per task
    wall = time.perf_counter() - t0
    h = r["headline"]
    cfg = json.loads((event_run / "config.json").read_text())
    source = "grad" + "".join(f"-{cfg['capture'][k]}" for k in ("precondition", "normalize")
                              if cfg["capture"][k] != "none")
    assert (h["granularity"], h["source"], h["schedule"], h["group"]) == \
        ("group", source, cfg["task"]["options"]["schedule"], "body")
    assert r["sample_unit"] == "event" and not r["multi_label"]
    assert r["n_train"] + r["n_heldout"] > 100  # 4 groups a step over 40 steps, not 40 steps
    # the planted experiment's capture.normalize=unit: every event reaches the buffer (and the
    # saved samples) at unit norm over all captured matrices together
    assert cfg["capture"]["normalize"] == "unit"
    samples, _ = read_safetensors(event_run / "samples.safetensors")
    sq = sum(v.flatten(1).double().pow(2).sum(1) for k, v in samples.items()
             if k.startswith("sample."))
    torch.testing.assert_close(sq, torch.ones_like(sq), rtol=0, atol=1e-5)
    assert {v["truth_from"] for v in r["per_task"].values()} == {"single"}
    assert sum(r["energy_share"].values()) == pytest.approx(1.0)
    assert 0 < r["fvu_heldout"] < 1.5 and r["l0"] > 0
    for key in ("auroc_task", "auroc_supervised", "mmcs", "mmcs_null", "steering_selectivity",
                "ablation_selectivity", "ablation_selectivity_shuffled"):
        assert h[key] is not None and h[key] == h[key], key
    # a Gaussian direction at the shard's norm, in ~80k dimensions, moves no task selectively
    assert abs(h["ablation_selectivity_random"]) <= 1 and abs(h["steering_selectivity_random"]) <= 1
    c = r["causal"]
    # shard, shard family, supervised, random (shard and family norms), 2 shuffled
    assert c["n_reward_estimates"] == 2 + 3 * 7 * 4
    assert wall < 60, wall  # one evaluation of one run on one thread
    # a random decoder matches no task direction
    broken = random_decoder_copy(event_run, tmp_path / "random_decoder")
    rb = evaluate_run(broken, n_null=2, steering=False)
    assert rb["mmcs"] < 0.05 and rb["mmcs"] < r["mmcs"] / 3
    assert rb["supervised_auroc"] == r["supervised_auroc"]  # the ground truth ignores the SAE


def test_report_marks_always_on_shards_and_only_them(planted_run, tmp_path):
    """On a run whose shards mix always-on and task shards, the report details the others
    beside the always-on ones and marks exactly those active on >= 80% of the samples."""
    from sae_shards.analysis.report import analyze
    from sae_shards.analysis.shards import RunView

    density = RunView(planted_run).density()
    on = {j for j in range(len(density)) if density[j] >= 0.8}
    out = analyze(planted_run, tmp_path / "report.html", n_shards=16, dose=False)
    html, analysis = out.read_text(), json.loads((tmp_path / "analysis.json").read_text())
    marked = {int(s) for s, e in analysis["shards"].items() if e["always_on"]}
    shown = {int(s) for s in analysis["shards"]}
    assert marked == on & shown and shown - on, (sorted(on), sorted(shown))
    for s in shown:
        assert (f"<h3>shard {s} (always on" in html) == (s in on)
    order = analysis["top_shards"]  # the always-on ones, then up to 16 others
    assert [s in on for s in order] == sorted((s in on for s in order), reverse=True)
    for s in order:  # each detailed shard's split over the tasks
        mix = analysis["shards"][str(s)]["task_mix"]
        assert mix and ("|activation| by context: " + ", ".join(
            f"{k} {v:.0%}" for k, v in mix.items())) in html


def test_task_mix_splits_a_shards_activation_by_the_samples_labels(planted_run):
    """RunView.task_mix: each label's share of a shard's |activation|, from the samples' own
    labels (checked against a direct sum), and the report prints it per shard."""
    from sae_shards.analysis.shards import RunView

    view = RunView(planted_run)
    _, acts = view.timeline()
    labels = view.sample_labels()
    assert len(labels) == acts.shape[0] and all(labels)  # every sample carries its task(s)
    shard = int(acts.abs().sum(0).argmax())
    mix = view.task_mix(shard)
    assert sum(mix.values()) == pytest.approx(1.0) and list(mix.values()) == sorted(
        mix.values(), reverse=True)
    task = next(iter(mix))
    direct = sum(float(a) / len(lab) for a, lab in zip(acts[:, shard].abs(), labels)
                 if task in lab)
    assert mix[task] == pytest.approx(direct / float(acts[:, shard].abs().sum()))
    # typical_coefficient: mean |activation| over the samples where the shard is active only
    fired = (acts != 0).sum(0)
    partial = int(fired.masked_fill(fired == acts.shape[0], 0).argmax())
    a = acts[:, partial].abs()
    assert 0 < int((a != 0).sum()) < a.numel()  # a shard silent on some samples
    assert view.typical_coefficient(partial) == pytest.approx(
        float(a[a != 0].mean()) * view.shards.input_scale, rel=1e-6)


def test_each_tasks_latent_is_chosen_on_training_labels_and_scored_on_held_out_ones():
    """The latent per task is picked by training AUROC and only then scored on held-out samples:
    picking it on the held-out samples would report the best held-out AUROC, not a test."""
    from sae_shards.planted.evaluate import _choose_and_score

    y = ["A", "A", "B", "B"]
    scores_tr = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    scores_te = scores_tr.flip(1)  # the held-out samples say the opposite
    train, best, held, null = _choose_and_score(scores_tr, scores_te, y, y, ["A", "B"], [y])
    assert best == [0, 1] and held == {"A": 0.0, "B": 0.0}
    assert train.tolist() == [[1.0, 0.0], [0.0, 1.0]] and null == [0.0]
    _, best, held, _ = _choose_and_score(scores_tr, scores_te, y, y, ["A", "B"], [], exclude=[0])
    assert best == [1, 1] and held == {"A": 1.0, "B": 0.0}


def _labels_edit(edit):
    def apply(tensors, header):
        header["task_labels"] = edit(json.loads(header["task_labels"]))
    return apply


@pytest.mark.parametrize("damage, problem", [
    (_labels_edit(lambda labels: json.dumps(labels[:-3])), r"task_labels in the header is "
                                                           r"(\d+) labels, expected a list of "),
    (_labels_edit(lambda labels: "[["), r"task_labels in the header is not valid JSON"),
    (_labels_edit(lambda labels: json.dumps([5] * len(labels))), r"task_labels in the header "
                                                                 r"holds 5"),
    (lambda t, h: t.pop("heldout"), r"missing tensors \['heldout'\]"),
    (lambda t, h: t.update(heldout=t["heldout"].float()), r"heldout is torch.float32 \[\d+\], "
                                                          r"expected bool"),
    (lambda t, h: t.update(rl_step=t["rl_step"][:-2].contiguous()), r"heldout is torch.bool "
                                                                    r"\[\d+\], expected bool"),
    (lambda t, h: t.update({k: t[k][:-2].contiguous() for k in t if k.startswith("sample.")}),
     r"sample\.\S+ is torch.float32 \[\d+, .*\], expected floating"),
    (lambda t, h: t.update({k: t[k][..., :-1].contiguous() for k in t if k.startswith("sample.")}),
     r"sample\.\S+ is torch.float32 \[\d+, .*\], expected floating"),
])
def test_damaged_samples_are_refused_naming_the_file(planted_run, tmp_path, damage, problem):
    """samples.safetensors whose labels, held-out flags, RL steps or samples disagree with each
    other or with the checkpoint's targets (damaged, or another run's): evaluate names the file
    and what is wrong, instead of an IndexError, KeyError or torch's size error from inside it,
    or labels paired with other samples than theirs."""
    file = _damaged_samples(planted_run, tmp_path, damage)
    with pytest.raises(CheckpointError, match=rf"{file}: {problem}.*copy it again from the run"):
        evaluate_run(file.parent, n_null=1, steering=False)


def _damaged_samples(planted_run, tmp_path, damage):
    """A copy of the run whose samples.safetensors is re-saved after ``damage(tensors, header)``
    changed them in place; the file's path."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(planted_run, run)
    file = run / "samples.safetensors"
    with safe_open(file, "pt") as f:
        header = dict(f.metadata())
    tensors = load_file(file)
    damage(tensors, header)
    save_file(tensors, file, metadata=header)
    return file


# --- evaluation.json's figures recomputed from their definitions ------------------------------
# Each figure is redone here from the run's own saved material (samples.safetensors, the final
# SAE's factors and its encoder's activations, the recorded seed) with plain dense code that
# calls none of evaluate's, groundtruth's, metrics' or families' functions: a wrong formula, or a
# figure wired to the wrong entry, fails where a range check would pass.


def _pairwise_auroc(scores, positive):
    """The fraction of (positive, negative) pairs the scores rank right, ties counting half."""
    pos, neg = scores.double()[positive], scores.double()[~positive]
    wins = (pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()
    return float(wins.mean())


def _top_direction(x):
    """Unit top right-singular vector ``[D]`` of ``x [S, D]`` (sign arbitrary), through a QR of
    ``x^T`` so the SVD is only ``[S, S]``."""
    q, r = torch.linalg.qr(x.double().T)  # x^T = Q R, Q [D, S] orthonormal
    return q @ torch.linalg.svd(r.T).Vh[0]


def _abs_cos(a, b):
    """``[A, B]`` |cos| between the rows of ``a [A, D]`` and of ``b [B, D]``."""
    unit = lambda v: v.double() / v.double().norm(dim=1, keepdim=True)  # noqa: E731
    return (unit(a) @ unit(b).T).abs()


def _mmcs(refs, dirs):
    """Mean over the rows of ``refs`` of the largest |cos| with any row of ``dirs``."""
    return float(_abs_cos(refs, dirs).max(1).values.mean())


class _Material:
    """A run's saved samples split as evaluate splits them (all-zero samples dropped), with their
    label sets, the final SAE's activations and its dense decoder directions, and the nulls'
    shuffled labellings redrawn from the seed evaluation.json records."""

    def __init__(self, run_dir, r):
        from safetensors import safe_open
        from safetensors.torch import load_file

        from sae_shards.analysis.shards import ShardSet

        sae = ShardSet.from_run(run_dir).sae
        names = [t.name for t in sae.targets]
        tensors = load_file(run_dir / "samples.safetensors")
        with safe_open(run_dir / "samples.safetensors", "pt") as f:
            labels = json.loads(f.metadata()["task_labels"])
        labels = [frozenset([y]) if isinstance(y, str) else frozenset(y) for y in labels]
        x = {n: tensors[f"sample.{n}"] for n in names}
        flat = torch.cat([x[n].flatten(1).double() for n in names], 1)  # [S, D]
        acts = sae.encode(sae.to_scaled(x)).dense(sae.n_latents).double()  # [S, N]
        held, nonzero = tensors["heldout"], flat.norm(dim=1) > 0
        tr = ((~held) & nonzero).nonzero().flatten().tolist()
        te = (held & nonzero).nonzero().flatten().tolist()
        self.tasks = r["tasks"]
        self.x_tr, self.x_te, self.acts_tr, self.acts_te = flat[tr], flat[te], acts[tr], acts[te]
        self.y_tr, self.y_te = [labels[i] for i in tr], [labels[i] for i in te]
        dec = []  # [N, D]: U V^T per matrix target, d per vector target, in the samples' order
        for tf in sae.factors:
            f = [p.detach().double() for p in tf.factors("decoder")]
            dec.append(torch.einsum("imr,inr->imn", *f).flatten(1) if tf.spec.is_matrix else f[0])
        self.decoders = torch.cat(dec, 1)
        self.input_scale, self.factored = float(sae.input_scale), sae.sample_form == "factored"
        self.b_dec = (torch.cat([b.detach().double().flatten() for b in sae.b_dec])
                      if sae.uses_b_dec else None)  # [D], scaled units
        density = (self.acts_tr != 0).double().mean(0)
        self.drift = [j for j in range(sae.n_latents) if density[j] >= r["drift"]["threshold"]]
        self.allowed = [j for j in range(sae.n_latents) if j not in self.drift]
        # one generator from the recorded seed: n_null held-out labellings (the mmcs nulls), then
        # n_null training labellings (the AUROC nulls)
        g = torch.Generator().manual_seed(r["seed"])
        perm = lambda y: [y[i] for i in torch.randperm(len(y), generator=g).tolist()]  # noqa: E731
        self.null_te = [perm(self.y_te) for _ in range(r["n_null"])]
        self.null_tr = [perm(self.y_tr) for _ in range(r["n_null"])]
        # then, with causal tests, one training labelling per shuffled-label control
        kinds = (r["causal"] or {}).get("kinds", {})
        self.causal_tr = [perm(self.y_tr) for k in kinds if k.startswith("shuffled_")]

    def present(self, labels, task):
        return torch.tensor([task in s for s in labels])

    def truth(self, x, labels):
        """``[K, D]``: each task's principal direction, from its one-task samples where it has at
        least two (or they are all it has), else from every sample it is present in."""
        rows = []
        for t in self.tasks:
            single = torch.tensor([s == {t} for s in labels])
            n_single, present = int(single.sum()), self.present(labels, t)
            use = single if n_single >= 2 or n_single == int(present.sum()) else present
            rows.append(_top_direction(x[use]))
        return torch.stack(rows)

    def choose(self, scores, labels, columns):
        """Per task, the column whose |score| on the training samples has the highest AUROC
        (the first on a tie)."""
        return [max(columns, key=lambda j: _pairwise_auroc(scores[:, j].abs(),
                                                           self.present(labels, t)))
                for t in self.tasks]

    def family_directions(self, members):
        """``[F, D]``: each family's principal direction of its members' summed contributions
        ``sum_j a_j d_j`` over the training samples (an SVD in the members' span)."""
        dirs = []
        for f in members:
            basis, _ = torch.linalg.qr(self.decoders[f].T)  # [D, |f|]
            coords = self.acts_tr[:, f] @ (self.decoders[f] @ basis)  # [S_tr, |f|]
            dirs.append(basis @ torch.linalg.svd(coords).Vh[0])
        return torch.stack(dirs)

    def held_out_auroc(self, scores, columns):
        """Per task, the held-out AUROC of the |score| of its column."""
        return {t: _pairwise_auroc(scores[:, j].abs(), self.present(self.y_te, t))
                for t, j in zip(self.tasks, columns)}


@pytest.fixture(scope="module", params=["planted_run", "event_run"])
def scored(request, tmp_path_factory):
    """``(evaluation.json, _Material)`` of a per-step run (one task a step; its SAE has drift
    latents) and of a per-event run of the headline's setting (``mixed``, body, unit events),
    evaluated without causal tests with a seed other than the default."""
    run = request.getfixturevalue(request.param)
    out = tmp_path_factory.mktemp("scored")
    evaluate_run(run, n_null=2, seed=3, steering=False, out=out)
    r = json.loads((out / "evaluation.json").read_text())
    return r, _Material(run, r)


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs)


def test_the_drift_latent_nearest_the_common_direction_is_by_the_top_principal_direction(scored):
    """``drift.top_direction_latent``: the latent whose decoder direction has the largest |cos|
    with the training samples' top principal direction, and that |cos| (audit 125, E30: the
    latent nearest their mean sample, another one on the per-step run, went unnoticed)."""
    r, m = scored
    cos = _abs_cos(m.decoders, _top_direction(m.x_tr)[None])[:, 0]  # [N]
    assert r["drift"]["top_direction_latent"] == int(cos.argmax())
    assert r["drift"]["top_direction_abs_cos"] == pytest.approx(float(cos.max()), abs=1e-4)


def test_per_task_purity_and_coverage_follow_their_definitions(scored):
    """Each task's best latent on the held-out samples: purity = the samples it fires on that
    hold the task / the samples it fires on; coverage = the same / the samples that hold the
    task (audit 125, E16: purity computed as coverage went unnoticed)."""
    r, m = scored
    for t, row in r["per_task"].items():
        fires = m.acts_te[:, row["best_latent"]] != 0
        present = torch.tensor([t in y for y in m.y_te])
        both = int((fires & present).sum())
        assert row["purity"] == pytest.approx(both / int(fires.sum()) if fires.any() else 0.0)
        assert row["coverage"] == pytest.approx(both / max(int(present.sum()), 1))
        assert row["n_heldout"] == int(present.sum())


def test_all_zero_samples_are_left_out_of_both_splits(planted_run, tmp_path):
    """An all-zero per-step sample (the capture keeps them, counted: capture/delta.py) says
    nothing of any task, and would enter every AUROC as a tie: evaluate drops it from the
    training and the held-out samples alike (audit 125, E23)."""
    from safetensors.torch import load_file

    from sae_shards.analysis.shards import ShardSet
    from sae_shards.planted.evaluate import EvalData

    held = load_file(planted_run / "samples.safetensors")["heldout"]
    zeroed = [int(held.nonzero()[0]), int((~held).nonzero()[0])]  # one of each split

    def zero(tensors, _):
        for key in tensors:
            if key.startswith("sample."):
                tensors[key][zeroed] = 0.0
    run = edited_copy(planted_run, tmp_path / "run", "samples.safetensors", zero)
    data = EvalData(run, ShardSet.from_run(run).target_names)
    assert len(data.split(True)[1]) == int(held.sum()) - 1
    assert len(data.split(False)[1]) == int((~held).sum()) - 1


def test_headline_auroc_is_the_pairwise_ranking_fraction_of_the_latent_chosen_on_training_samples(
        scored):
    """``auroc_task``: per task, the non-drift latent whose |activation| ranks the task's training
    samples above the others most often is scored the same way on the held-out samples; the mean
    over tasks. ``auroc_null`` chooses with shuffled training labels (the recorded seed's
    draws) and scores against the true held-out labels; ``auroc_margin`` is the difference."""
    r, m = scored
    h = r["headline"]
    assert r["drift"]["latents"] == m.drift
    best = m.choose(m.acts_tr, m.y_tr, m.allowed)
    held = m.held_out_auroc(m.acts_te, best)
    assert [r["per_task"][t]["best_latent"] for t in m.tasks] == best
    for t in m.tasks:
        assert r["per_task"][t]["auroc"] == pytest.approx(held[t], rel=0, abs=1e-12), t
    assert h["auroc_task"] == r["auroc_task"] == pytest.approx(_mean(held.values()), abs=1e-12)
    null = _mean(_mean(m.held_out_auroc(m.acts_te, m.choose(m.acts_tr, y, m.allowed)).values())
                 for y in m.null_tr)
    assert r["auroc_null"] == pytest.approx(null, rel=0, abs=1e-12)
    assert r["auroc_margin"] == pytest.approx(r["auroc_task"] - r["auroc_null"], abs=1e-12)


def test_headline_mmcs_is_the_mean_best_abs_cosine_of_a_shard_with_each_held_out_task_direction(
        scored):
    """``mmcs``: per task, the largest |cos| between the task's principal direction on the
    held-out samples and a non-drift decoder direction, averaged over tasks; ``mmcs_null`` the
    same for the held-out labels shuffled (the recorded seed's draws, mean over them);
    ``mmcs_margin`` their difference; ``mmcs_with_drift`` counts every latent."""
    r, m = scored
    h = r["headline"]
    truth = m.truth(m.x_te, m.y_te)  # [K, D]
    cos = _abs_cos(truth, m.decoders[m.allowed])  # [K, non-drift latents]
    for k, t in enumerate(m.tasks):
        assert r["per_task"][t]["max_abs_cos_to_truth"] == pytest.approx(float(cos[k].max()),
                                                                         abs=1e-5), t
    null = _mean(_mmcs(m.truth(m.x_te, y), m.decoders[m.allowed]) for y in m.null_te)
    assert h["mmcs"] == r["mmcs"] == pytest.approx(_mmcs(truth, m.decoders[m.allowed]), abs=1e-5)
    assert h["mmcs_null"] == r["mmcs_null"] == pytest.approx(null, abs=1e-5)
    assert h["mmcs_margin"] == r["mmcs_margin"] == h["mmcs"] - h["mmcs_null"]
    assert r["drift"]["mmcs_with_drift"] == pytest.approx(_mmcs(truth, m.decoders), abs=1e-5)


def test_headline_supervised_figures_score_the_training_principal_directions(scored):
    """``auroc_supervised``: each held-out sample's |cos| with the task's principal direction on
    the training samples, as a pairwise AUROC for the task, averaged over tasks;
    ``mmcs_margin_supervised``: the mmcs margin of those directions in place of the shards,
    against the same ground truth and null."""
    r, m = scored
    h = r["headline"]
    sup = m.truth(m.x_tr, m.y_tr)  # [K, D]
    scores = _abs_cos(m.x_te, sup)  # [S_te, K]
    per = {t: _pairwise_auroc(scores[:, k], m.present(m.y_te, t)) for k, t in enumerate(m.tasks)}
    for t in m.tasks:
        assert r["per_task"][t]["supervised_auroc"] == pytest.approx(per[t], abs=1e-12), t
    assert h["auroc_supervised"] == r["supervised_auroc"] == pytest.approx(_mean(per.values()),
                                                                           abs=1e-12)
    truth = m.truth(m.x_te, m.y_te)
    null = _mean(_mmcs(m.truth(m.x_te, y), sup) for y in m.null_te)
    assert r["mmcs_supervised"] == pytest.approx(_mmcs(truth, sup), abs=1e-5)
    assert r["mmcs_supervised_null"] == pytest.approx(null, abs=1e-5)
    assert h["mmcs_margin_supervised"] == pytest.approx(_mmcs(truth, sup) - null, abs=1e-5)


def test_headline_family_figures_follow_from_each_familys_summed_contribution(scored):
    """The families are the average-linkage groups of the latents' co-activation on the training
    samples; a family's strength on a sample is the norm of its members' summed contribution
    ``sum_j a_j d_j``, chosen and scored per task as a latent is (``auroc_task_family``, and its
    shuffled-label null); its direction is the principal direction of those contributions over
    the training samples, matched to the ground truth as shards are (``mmcs_margin_family``)."""
    r, m = scored
    h, fam = r["headline"], r["families"]
    members = fam["members"]
    assert h["n_families"] == fam["n"] == len(members)
    # the grouping: average linkage on the correlation of the latents' |activation| over the
    # training samples (pairs that fired together fewer than MIN_JOINT times unlinked), drift
    # latents and latents that never fired left out
    on = (m.acts_tr != 0).double()
    left_out = sorted(set(m.drift) | {j for j in range(on.shape[1]) if not on[:, j].any()})
    assert fam["left_out"] == left_out
    similarity = torch.corrcoef(m.acts_tr.abs().T).nan_to_num(0.0)
    similarity[on.T @ on < MIN_JOINT] = 0.0
    assert members == average_linkage_by_definition(similarity, fam["threshold"], left_out)

    def strength(acts, f):  # [S]
        return (acts[:, f] @ m.decoders[f]).norm(dim=1)

    st_tr = torch.stack([strength(m.acts_tr, f) for f in members], 1)  # [S_tr, F]
    st_te = torch.stack([strength(m.acts_te, f) for f in members], 1)
    best = m.choose(st_tr, m.y_tr, range(len(members)))
    assert fam["best_family"] == best
    held = m.held_out_auroc(st_te, best)
    assert h["auroc_task_family"] == fam["auroc_task"] == pytest.approx(_mean(held.values()),
                                                                         abs=1e-9)
    null = _mean(_mean(m.held_out_auroc(st_te, m.choose(st_tr, y, range(len(members)))).values())
                 for y in m.null_tr)
    assert fam["auroc_null"] == pytest.approx(null, abs=1e-9)
    dirs = m.family_directions(members)  # [F, D]
    truth = m.truth(m.x_te, m.y_te)
    null = _mean(_mmcs(m.truth(m.x_te, y), dirs) for y in m.null_te)
    assert fam["mmcs"] == pytest.approx(_mmcs(truth, dirs), abs=1e-5)
    assert fam["mmcs_null"] == pytest.approx(null, abs=1e-5)
    assert h["mmcs_margin_family"] == fam["mmcs_margin"] == fam["mmcs"] - fam["mmcs_null"]


def test_reference_figures_follow_from_the_held_out_samples(scored):
    """Below the headline: each task's energy share (its held-out samples' squared norm, a sample
    of several tasks split equally, over the total); ``mmcs_margin_oracle`` (the held-out task
    directions themselves as shards: mmcs 1 against the same null); ``mmcs_class_mean`` (the
    margins against each task's signed held-out class mean, whose null is the class means of the
    same shuffled held-out labellings), for the latents, the families, the training class means
    and the held-out class means themselves."""
    r, m = scored
    sq = m.x_te.pow(2).sum(1)
    per = {t: sum(float(e) / len(s) for e, s in zip(sq, m.y_te) if t in s) for t in m.tasks}
    for t in m.tasks:
        assert r["energy_share"][t] == pytest.approx(per[t] / sum(per.values()), rel=1e-5), t
    assert r["energy_share_max"] == max(r["energy_share"].values())
    truth = m.truth(m.x_te, m.y_te)
    oracle = 1.0 - _mean(_mmcs(m.truth(m.x_te, y), truth) for y in m.null_te)
    assert r["mmcs_margin_oracle"] == pytest.approx(oracle, abs=1e-5)

    def class_means(x, labels):  # [K, D]
        return torch.stack([x[m.present(labels, t)].mean(0) for t in m.tasks])

    means = class_means(m.x_te, m.y_te)
    nulls = [class_means(m.x_te, y) for y in m.null_te]
    answers = {"latents": m.decoders[m.allowed],
               "families": m.family_directions(r["families"]["members"]),
               "supervised": class_means(m.x_tr, m.y_tr), "oracle": means}
    for name, dirs in answers.items():
        want = _mmcs(means, dirs) - _mean(_mmcs(n, dirs) for n in nulls)
        assert r["mmcs_class_mean"][name]["mmcs_margin"] == pytest.approx(want, abs=1e-5), name


def test_heldout_reconstruction_figures_are_pooled_over_the_held_out_samples(scored):
    """``fvu_heldout``: the held-out samples' summed squared reconstruction error (in the SAE's
    scaled units, ``sum_j a_j d_j`` plus the decoder bias) over their summed squared deviation
    from their mean, or about zero for per-event samples (as they are trained); ``ml2r_heldout``:
    the mean ratio of reconstruction to sample norm; ``l0``: the mean number of active
    latents."""
    r, m = scored
    x = m.x_te / m.input_scale  # [S_te, D]
    recon = m.acts_te @ m.decoders + (0.0 if m.b_dec is None else m.b_dec)
    centre = 0.0 if m.factored else x.mean(0)
    assert r["fvu_heldout"] == pytest.approx(
        float((x - recon).pow(2).sum() / (x - centre).pow(2).sum()), rel=1e-4)
    assert r["ml2r_heldout"] == pytest.approx(float((recon.norm(dim=1) / x.norm(dim=1)).mean()),
                                              rel=1e-4)
    assert r["l0"] == pytest.approx(float((m.acts_te != 0).sum(1).double().mean()), abs=1e-6)


def test_separability_ladder_scores_one_labelled_direction_per_task(scored):
    """``separability``: samples scaled to unit norm; per task one direction from the training
    samples, each held-out sample scored by its cosine with it (sign-free for ``principal_abs``),
    AUROC for the task, mean over tasks. Directions: the principal one, the same oriented so the
    task's training samples project positively in sum, the class mean, and the ridge (0.1)
    regression of +-1 "task present" targets (in its dual form, ``X^T (X X^T + 0.1 I)^-1 y``)."""
    r, m = scored
    unit = lambda v: v / v.norm(dim=1, keepdim=True)  # noqa: E731
    x_tr, x_te = unit(m.x_tr), unit(m.x_te)
    principal = m.truth(x_tr, m.y_tr)  # [K, D]
    present = [m.present(m.y_tr, t) for t in m.tasks]
    signs = torch.stack([torch.sign((x_tr[p] @ d).sum()) for p, d in zip(present, principal)])
    targets = torch.stack([p.double() * 2 - 1 for p in present], 1)  # [S_tr, K]
    gram = x_tr @ x_tr.T + 0.1 * torch.eye(len(x_tr), dtype=torch.float64)
    ladder = {"principal_abs": (principal, True),
              "principal_signed": (principal * signs[:, None], False),
              "class_mean": (torch.stack([x_tr[p].mean(0) for p in present]), False),
              "linear_probe": ((x_tr.T @ torch.linalg.solve(gram, targets)).T, False)}
    for name, (dirs, sign_free) in ladder.items():
        scores = x_te @ unit(dirs).T  # [S_te, K]
        scores = scores.abs() if sign_free else scores
        per = {t: _pairwise_auroc(scores[:, k], m.present(m.y_te, t))
               for k, t in enumerate(m.tasks)}
        for t in m.tasks:
            assert r["separability"][name][t] == pytest.approx(per[t], abs=1e-9), (name, t)
        assert r["separability"][name]["mean"] == pytest.approx(_mean(per.values()), abs=1e-9)


@pytest.fixture(scope="module")
def linear_causal(event_run, tmp_path_factory):
    """The per-event run evaluated with causal tests whose reward is linear in the weights (no
    rollouts): task u's reward is ``<theta - theta_0, R_u>`` over the SAE's targets, ``R_u``
    Gaussian. Every direction then moves every task by a known amount, distinct for every kind
    and task, so a figure computed or wired wrongly shows (the rollouts themselves: test_causal
    and test_causal_rollouts_are_sampled_as_the_run_sampled). Returns ``(evaluation.json,
    _Material, theta_T - theta_0 [D], {task: R_u [D]})``, flattened in the samples' order."""
    from sae_shards.analysis.shards import ShardSet, load_run_models
    from sae_shards.planted import evaluate as evaluate_module
    from sae_shards.planted.causal import causal_tests

    names = ShardSet.from_run(event_run).target_names
    models = load_run_models(event_run)
    tasks = list(models.task.labels)
    theta0 = {n: p.detach().double().clone() for n, p in models.initial.named_parameters()
              if n in names}
    theta1 = {n: p.detach().double() for n, p in models.final.named_parameters() if n in names}
    # a seed whose own-first rates are neither 0 nor 1 and differ: 0.25 (shard), 0.375 (shuffled)
    g = torch.Generator().manual_seed(14)
    R = {t: {n: torch.randn(theta0[n].shape, generator=g, dtype=torch.float64) for n in names}
         for t in tasks}

    def linear(model):
        p = dict(model.named_parameters())
        return {t: float(sum(((p[n].detach().double() - theta0[n]) * R[t][n]).sum()
                             for n in names)) for t in tasks}

    def with_linear_rewards(*args, **kwargs):
        return causal_tests(*args, reward_fn=linear, **kwargs)

    out = tmp_path_factory.mktemp("linear_causal")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate_module, "causal_tests", with_linear_rewards)
        evaluate_run(event_run, n_null=2, seed=3, n_shuffled=2, out=out)
    r = json.loads((out / "evaluation.json").read_text())
    flat = lambda d: torch.cat([d[n].flatten() for n in names])  # noqa: E731
    return (r, _Material(event_run, r), flat({n: theta1[n] - theta0[n] for n in names}),
            {t: flat(R[t]) for t in tasks})


def test_causal_effects_are_reward_changes_along_the_runs_own_update(linear_causal):
    """For the shard (the task's best latent's decoder), the shard family, the supervised and the
    shuffled-label directions ``d`` (unit; rebuilt here from the SAE's factors, the samples and
    the recorded seed's shuffles): the coefficient is ``c = <theta_T - theta_0, d>``; steering
    adds ``+-alpha v`` to the initial weights and ablation removes ``v`` from the final ones,
    ``v = c d``, or for a control ``|c_shard|`` times ``d`` signed as its own ``c``. With
    linear rewards the effect on task u is ``<v, R_u>`` times ``alpha``, ``-alpha`` and 1."""
    r, m, delta, R = linear_causal
    c = r["causal"]
    alpha, kinds = c["settings"]["alpha"], c["kinds"]
    unit = lambda d: d / d.norm()  # noqa: E731
    fam = r["families"]
    family_dirs = m.family_directions([fam["members"][f] for f in fam["best_family"]])
    sup = m.truth(m.x_tr, m.y_tr)
    own = {"shard": {t: unit(m.decoders[r["per_task"][t]["best_latent"]]) for t in m.tasks},
           "shard_family": dict(zip(m.tasks, family_dirs)), "supervised": dict(zip(m.tasks, sup))}
    shuffled = {f"shuffled_{i}": dict(zip(m.tasks, m.truth(m.x_tr, y)))
                for i, y in enumerate(m.causal_tr)}
    assert set(kinds) == {*own, *shuffled, "random", "random_shard_family"}
    c_shard = {t: float(delta @ d) for t, d in own["shard"].items()}
    checked = 0
    for kind, dirs in {**own, **shuffled}.items():
        for t, d in dirs.items():
            e = kinds[kind]["per_task"][t]
            coefficient = float(delta @ d)  # sign: the direction's own (a principal one's is free)
            if kind == "shard":
                assert e["coefficient"] == pytest.approx(coefficient, rel=1e-4), (kind, t)
            assert abs(e["coefficient"]) == pytest.approx(abs(coefficient), rel=1e-4), (kind, t)
            size = abs(c_shard[t]) if kind in shuffled else abs(coefficient)
            v = math.copysign(size, coefficient) * d
            for u in m.tasks:
                effect = float(v @ R[u])
                close = lambda x: pytest.approx(x, rel=1e-3, abs=1e-6)  # noqa: E731
                assert e["steer_plus"][u] == close(alpha * effect), (kind, t, u)
                assert e["steer_minus"][u] == close(-alpha * effect), (kind, t, u)
                assert e["ablate_drop"][u] == close(effect), (kind, t, u)
                checked += 1
    assert checked == (3 + len(shuffled)) * len(m.tasks) ** 2
    for kind, like in (("random", c_shard), ("random_shard_family", {
            t: float(delta @ d) for t, d in own["shard_family"].items()})):
        for t in m.tasks:  # the controls: norm-matched, effects not reproducible here (drawn)
            assert kinds[kind]["per_task"][t]["magnitude"] == pytest.approx(abs(like[t]), rel=1e-4)


def _selectivity(effects, own, floor):
    """The effect on ``own`` over the mean |effect| on the other tasks, or ``floor`` if larger."""
    others = [abs(v) for u, v in effects.items() if u != own]
    return effects[own] / max(sum(others) / len(others), floor)


def _broken_task(drops, floor):
    """The task that dropped most, if one did alone and by at least ``floor``."""
    top = max(drops.values())
    first = [u for u, v in drops.items() if v == top]
    return first[0] if len(first) == 1 and top >= floor else None


def test_headline_selectivities_are_medians_of_own_effect_over_the_others_mean_abs_effect(
        linear_causal):
    """Every causal headline figure, from the recorded effects: per task, the effect on its own
    task over the mean |effect| on the others (or the floor), median over tasks (the shuffled
    controls pooled); ``ablation_own_first``: how often the own task drops most. Beside them the
    steering and ablation views must repeat the same figures."""
    r, m, _, _ = linear_causal
    h, c = r["headline"], r["causal"]
    floor = c["settings"]["floor"]
    shuffled = sorted(k for k in c["kinds"] if k.startswith("shuffled_"))
    assert len(shuffled) == 2
    kinds_of = {"": ["shard"], "_random": ["random"], "_shuffled": shuffled,
                "_supervised": ["supervised"], "_family": ["shard_family"],
                "_family_random": ["random_shard_family"]}
    checked = {}
    for suffix, kinds in kinds_of.items():
        entries = [(t, e) for k in kinds for t, e in c["kinds"][k]["per_task"].items()]
        assert len(entries) == len(kinds) * len(m.tasks)
        figures = {
            "steering_selectivity": statistics.median(
                _selectivity(e["steer_plus"], t, floor) for t, e in entries),
            "ablation_selectivity": statistics.median(
                _selectivity(e["ablate_drop"], t, floor) for t, e in entries),
            "ablation_own_first": _mean(_broken_task(e["ablate_drop"], floor) == t
                                        for t, e in entries)}
        for name, value in figures.items():
            if name + suffix in h:
                checked[name + suffix] = value
                assert h[name + suffix] == pytest.approx(value, rel=1e-12), name + suffix
    causal_keys = {k for k in h if "selectivity" in k or "own_first" in k}
    assert set(checked) == causal_keys
    # the figures differ from kind to kind here, so one wired to another kind's entry shows
    sel = [checked[k] for k in causal_keys if "selectivity" in k]
    assert len({round(v, 9) for v in sel}) == len(sel), checked
    own_first = (checked["ablation_own_first"], checked["ablation_own_first_shuffled"])
    assert 0 < min(own_first) and max(own_first) < 1 and own_first[0] != own_first[1], own_first
    st, ab = r["steering"], r["ablation"]
    assert (st["selectivity"], st["control_selectivity"], st["shuffled_selectivity"]) == (
        h["steering_selectivity"], h["steering_selectivity_random"],
        h["steering_selectivity_shuffled"])
    assert (ab["selectivity"], ab["control_selectivity"], ab["shuffled_selectivity"],
            ab["own_first_rate"], ab["own_first_rate_shuffled"]) == (
        h["ablation_selectivity"], h["ablation_selectivity_random"],
        h["ablation_selectivity_shuffled"], h["ablation_own_first"],
        h["ablation_own_first_shuffled"])
    for t in m.tasks:
        shard = c["kinds"]["shard"]["per_task"][t]
        assert st["per_task"][t]["latent"] == ab["per_task"][t]["latent"] == \
            r["per_task"][t]["best_latent"]
        assert st["per_task"][t]["shard_plus"] == shard["steer_plus"]
        assert ab["per_task"][t]["drop"] == shard["ablate_drop"]
        assert ab["per_task"][t]["own_first"] == (_broken_task(shard["ablate_drop"], floor) == t)


def test_a_run_without_shard_families_is_evaluated_saying_so(planted_run, tmp_path):
    """Every latent a drift latent or silent (a per-step SAE of a mixed sweep point): the
    families' figures raised IndexError inside argmax, and the sweep lost every point. Now
    they are None, the reason is given, and the report says it."""
    from sae_shards.analysis.families import Families
    from sae_shards.planted.evaluate import _family_figures, _mmcs_margin, to_markdown

    none = Families([], [], 0.5)
    empty = torch.zeros(6, 0)  # [samples, families]
    truth = torch.randn(4, 10, dtype=torch.float64)
    figures = _family_figures(None, none, torch.zeros(0, 16), empty, empty, list("ABCDAB"),
                              list("ABCDAB"), list("ABCD"), truth, [truth], [list("BADCBA")], {})
    assert figures["n"] == 0 and figures["auroc_task"] is None and figures["mmcs_margin"] is None
    assert figures["skipped"].startswith("no shard family: every latent is a drift latent")
    assert _mmcs_margin(lambda t: torch.zeros(len(t), 0), truth, [truth]) == {
        "mmcs": None, "mmcs_null": None, "mmcs_margin": None}
    r = evaluate_run(planted_run, n_null=2, steering=False, out=tmp_path)
    r["families"] = {**figures, "left_out": list(range(16))}
    r["mmcs_class_mean"]["families"] = _mmcs_margin(lambda t: torch.zeros(len(t), 0), truth,
                                                    [truth])
    r["headline"].update(auroc_task_family=None, mmcs_margin_family=None, n_families=0)
    md = to_markdown(r)
    assert "Shard families: none (no shard family: every latent is a drift latent" in md
    assert "families -," in md


def _fmt(x) -> str:
    return "-" if x is None or x != x else f"{x:.3f}"


def test_an_ablation_drop_below_the_floor_is_marked_unresolved(planted_run, tmp_path):
    """evaluation.md said rows below the floor are marked; the steering table marked them, the
    ablation table did not (a drop of 0.004 beside a floor of 0.005 showed a plain +0.781)."""
    from sae_shards.planted.evaluate import to_markdown

    r = evaluate_run(planted_run, n_null=2, steering=False, out=tmp_path)
    tasks = r["tasks"]
    zero = {u: 0.0 for u in tasks}
    r["steering"] = {"alpha": 1.0, "n_prompts": 2, "n_samples": 4, "sampling": {}, "floor": 0.005,
                     "selectivity": 1.0, "control_selectivity": 0.0, "shuffled_selectivity": None,
                     "per_task": {t: {"latent": 0, "shard_plus": {**zero, t: 0.1},
                                      "shard_minus": zero, "shard_selectivity": 20.0,
                                      "control_selectivity": 0.0} for t in tasks}}
    drops = {tasks[0]: 0.004, tasks[1]: 0.2}  # below the floor, above it
    r["ablation"] = {"selectivity": 1.0, "control_selectivity": 0.0, "shuffled_selectivity": None,
                     "own_first_rate": 0.5, "own_first_rate_shuffled": None,
                     "per_task": {t: {"latent": 0, "drop": {**zero, t: drops.get(t, 0.1)},
                                      "broken_task": None if t == tasks[0] else t,
                                      "selectivity": 0.781, "control_selectivity": 0.0}
                                  for t in tasks}}
    md = to_markdown(r)
    assert f"| {tasks[0]} | 0 | +0.004 | none (no drop reached 0.005, or a tie) | +0.781 " \
           "(unresolved) |" in md
    assert f"| {tasks[1]} | 0 | +0.200 | +0.200 ({tasks[1]}) | +0.781 | +0.000 |" in md
    # the headline says when no task's effect was resolved (audit 138 F11: "0.000" beside a
    # resolved reference); here steering's are, one ablation drop is not
    headline = md.split("## Details")[0]
    assert "(unresolved" not in headline
    for t in tasks:  # every effect below the floor
        r["steering"]["per_task"][t]["shard_plus"][t] = 0.001
        r["ablation"]["per_task"][t]["drop"][t] = 0.002
    headline = to_markdown(r).split("## Details")[0]
    for key in ("steering_selectivity", "ablation_selectivity", "ablation_own_first"):
        assert f"| {key} | {_fmt(r['headline'][key])} (unresolved: no task effect reached the " \
               "floor) |" in headline, key
    assert "| steering_selectivity_random | " in headline  # the others as they were


def test_planted_diagnostics_needs_its_evaluation_first_and_finds_one_elsewhere(planted_run,
                                                                               tmp_path):
    """scripts.planted_diagnostics read evaluation.json after ~30 s of work, from the run
    directory only: an evaluation written with --out could not be used."""
    from scripts.planted_diagnostics import diagnose

    copy = tmp_path / "run"
    shutil.copytree(planted_run, copy, ignore=shutil.ignore_patterns("evaluation.*"))
    with pytest.raises(SystemExit, match=r"evaluation.json: cannot be read .* run `sae-shards "
                                         r"evaluate .*` first, or name the evaluation"):
        diagnose(copy)
    r = evaluate_run(copy, n_null=2, steering=False, out=tmp_path / "elsewhere")
    figures = diagnose(copy, evaluation=tmp_path / "elsewhere")
    assert figures["auroc_task"] == r["auroc_task"]


def test_evaluate_takes_a_moved_initial_model_as_analyze_does(planted_run, tmp_path, capsys):
    """Audit 150 F1: evaluate's causal tests, skipped for a run whose initial model moved, told
    the reader to "give its new place with --initial-model DIR", which evaluate did not take
    (argparse: unrecognized arguments). It takes it now, checked as analyze checks it."""
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "run"
    shutil.copytree(planted_run, copy)
    for name in rundir.DERIVED:
        (copy / name).unlink(missing_ok=True)
    moved = tmp_path / "moved"
    shutil.move(copy / "model", moved)
    r = evaluate_run(copy, n_null=1, n_prompts=2, n_samples=2, n_shuffled=0)
    assert r["causal"] is None and "lacks its model/ folder" in r["causal_skipped"]

    assert cli_main(["evaluate", str(copy), "--n-null", "1", "--n-prompts", "2",
                     "--initial-model", str(moved)]) == 0
    on_disk = json.loads((copy / "evaluation.json").read_text())
    assert on_disk["causal"] is not None and on_disk["causal_skipped"] is None
    assert on_disk["headline"]["ablation_selectivity"] is not None

    other = tmp_path / "other"  # other weights named on purpose: refused before any work
    shutil.copytree(moved, other)
    weights = load_file(other / "model.safetensors")
    save_file({k: v + 0.01 for k, v in weights.items()}, other / "model.safetensors",
              metadata={"format": "pt"})
    kept = (copy / "evaluation.json").read_text()
    capsys.readouterr()
    assert cli_main(["evaluate", str(copy), "--n-null", "1", "--initial-model", str(other)]) == 2
    err = capsys.readouterr().err
    assert f"cannot evaluate {copy}: --initial-model {other} holds other weights" in err
    assert (copy / "evaluation.json").read_text() == kept
