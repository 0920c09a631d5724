"""`sae-shards analyze`: the HTML report has every section and every image, and opens alone."""

import base64
import json
import math
import shutil
from html import escape as html_escape
from html.parser import HTMLParser

import pytest
import torch

from sae_shards.analysis.report import SECTIONS, analyze
from sae_shards.cli import main as cli_main
from sae_shards.analysis.shards import RunView, ShardSet
from sae_shards.analysis.resolution import resolved_bound, resolved_together
from sae_shards.run.versions import run_versions, version_line


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sections, self.images, self.current = {}, [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.current = attrs["id"]
            self.sections[self.current] = 0
        if tag == "img":
            self.images.append(attrs["src"])
            self.sections[self.current] += 1
        if tag in ("link", "script") and (attrs.get("src") or attrs.get("href")):
            raise AssertionError(f"report loads an external resource: {attrs}")


def test_report_has_every_section_and_image(short_run_dir, tmp_path, caplog):
    caplog.set_level("INFO", logger="sae_shards.analysis.report")
    out = analyze(short_run_dir, tmp_path / "report.html", n_shards=2, n_prompts=8,
                  alphas=(-1.0, 0.0, 1.0))
    # the sampling, which takes minutes on a larger model, is announced and its progress said
    said = [r.getMessage() for r in caplog.records]
    assert any("each estimate samples 8 prompts x 4 completions" in m for m in said), said
    n_top = len(json.loads((tmp_path / "analysis.json").read_text())["top_shards"])
    assert sum(" scored (" in m for m in said) == n_top
    assert any(m.startswith(f"the {n_top} shards scored together") for m in said)
    page = _Page()
    page.feed(out.read_text())
    assert list(page.sections) == list(SECTIONS)
    for section in ("sae-curves", "reward", "timeline", "norms", "dose-response"):
        assert page.sections[section] == 1, section
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    html = out.read_text()
    assert "Needs the run's initial and final model" not in html  # model sections really ran
    assert json.loads((tmp_path / "analysis.json").read_text())["models_skipped"] is None
    assert "+u promotes" in html and "RL step" in html
    summary_json = json.loads((short_run_dir / "summary.json").read_text())
    dead = ("n/a (the SAE saw fewer than sae.dead_after samples)"
            if summary_json["dead_frac"] is None else f"{round(summary_json['dead_frac'] * 16)} of 16")
    assert f"samples)</td><td>{dead}</td>" in html  # the dead shards row, as summary.json says
    # where to check that a shard is more than one SAE's choice (audit 134 F6)
    assert "<td>is a shard real?</td>" in html and "(sae-shards compare RUN OTHER_RUN)" in html
    analysis = json.loads((tmp_path / "analysis.json").read_text())
    live = (RunView(short_run_dir).timeline()[1] != 0).float().mean(0)
    n_always = int((live >= 0.8).sum())
    others = int(((live > 0) & (live < 0.8)).sum())
    assert len(analysis["top_shards"]) == n_always + min(2, others)  # always-on + 2 others
    summary = json.loads((short_run_dir / "summary.json").read_text())
    run = analysis["run"]  # the run's own figures beside the shards'
    assert run["rl_steps"] == summary["rl_steps"] and run["fvu_last"] == summary["fvu_last"]
    assert run["never_fired"] == int((live == 0).sum()) and run["n_shards"] == live.numel()
    view = RunView(short_run_dir)
    _, acts = view.timeline()
    scale = float(view.shards.sae.input_scale)
    for s, entry in analysis["shards"].items():  # the SAE's own account, beside c
        expected = float(acts[:, int(s)].double().sum()) * scale
        assert entry["attributed_update"] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert "attribution (activations summed x input_scale)" in html
    for entry in analysis["shards"].values():
        assert len(entry["dose_response"]["shard"]) == 3
        ablation = entry["ablation"]  # the same coefficient as the dose-response's alpha = 1
        assert ablation["coefficient"] == entry["update_coefficient"]
        first = analysis["shards"][str(analysis["top_shards"][0])]
        assert ablation["reward_final"] == first["ablation"]["reward_final"]  # one baseline
        assert ablation["removed_by_label"] == {}  # one context
        # paired per prompt, equal samples per prompt: the mean change is the change of means
        assert abs(ablation["change_removed"] - (ablation["reward_removed"]
                                                 - ablation["reward_final"])) < 1e-12
        assert abs(ablation["change_overshoot"] - (ablation["reward_overshoot"]
                                                   - ablation["reward_final"])) < 1e-12
        assert ablation["stderr_change_removed"] >= 0
        assert entry["logit_lens"], "the body targets include o_proj/down_proj writers"
    ablations = [entry["ablation"] for entry in analysis["shards"].values()]
    assert [a["told_apart"] for a in ablations] == resolved_together(  # the shards together
        [a["beyond_control"] for a in ablations], [a["stderr_beyond_control"] for a in ablations],
        analysis["draws"]["n_prompts"])
    assert {a["n_prompts"] for a in ablations} == {analysis["draws"]["n_prompts"]}
    together = analysis["together"]  # the detailed shards' span, scored as a whole
    assert together["whole_is_run"] is False  # the run trains lm_head too, which no shard is on
    assert "parameters are all the run changed" not in html
    assert together["shards"] == analysis["top_shards"]
    assert len(together["weights"]) == len(together["shards"])
    assert 0 < together["update_share"] <= 1 + 1e-6
    first = analysis["shards"][str(analysis["top_shards"][0])]
    assert together["rewards"]["final"] == first["ablation"]["reward_final"]  # same baselines
    assert together["rewards"]["initial"] == first["dose_response"]["shard"][1]  # alpha 0
    run, run_se = together["changes"]["run"]
    assert run == pytest.approx(together["rewards"]["final"] - together["rewards"]["initial"],
                                abs=1e-12)
    if together["shares"]["removed"][0] is None:
        bound = resolved_bound(together["n_prompts"])
        assert abs(run) <= bound * run_se and f"is within {bound:.2f} standard errors" in html
    else:  # every prompt scored: the share is the ratio of the paired mean changes
        assert together["shares"]["removed"][0] == pytest.approx(
            -together["changes"]["removed"][0] / run, rel=1e-9)
        assert together["shares"]["kept"][0] == pytest.approx(
            together["changes"]["kept"][0] / run, rel=1e-9)
        assert "Removing the shards' span undoes" in html
    dose = analysis["shards"][str(analysis["top_shards"][0])]["dose_response"]  # the plot's
    cell = lambda m, e, a: f"<td>{m:.4f}" + (f" ± {e:.4f}" if a else "") + "</td>"  # noqa: E731
    row = "".join(map(cell, dose["shard"], dose["stderr_change_shard"], dose["alphas"]))
    last = cell(dose["control"][-1], dose["stderr_change_control"][-1], dose["alphas"][-1])
    assert row + last + "</tr>" in html  # the plot's numbers, listed (± but at alpha 0)
    assert dose["stderr_change_shard"][1] == 0  # alpha 0: no change from itself
    # families partition the shards that fired but are not always on (none in this short run:
    # its 4 live shards fire on every sample; tests/test_evaluate.py has a run with families),
    # and each family's mass share is its members' share of the timeline's |activation|
    _, acts = RunView(short_run_dir).timeline()
    density, mass = (acts != 0).float().mean(0), acts.abs().sum(0) / acts.abs().sum()
    fams = analysis["families"]
    members = sorted(j for f in fams for j in f["shards"])
    assert members == [j for j in range(16) if 0 < density[j] < 0.8]
    for f in fams:
        assert abs(f["mass_share"] - float(mass[f["shards"]].sum())) < 1e-6
    if not fams:
        assert "No families: every shard that fired" in html
    # always-on shards are marked as such wherever they are shown (here: every live shard)
    on = [j for j in range(16) if density[j] >= 0.8]
    assert on, "this short run's live shards fire on every sample"
    for s, entry in analysis["shards"].items():
        assert entry["always_on"] == (int(s) in on)
        assert f"<h3>shard {s} (always on: a common drift direction" in html
    assert f"{', '.join(map(str, on))}: the direction most updates share" in html
    assert f"{int((density == 0).sum())} of 16" in html  # shards that never fired
    assert "by context" not in html  # one task: no split to show
    assert "<td>task</td><td>letters</td>" in html and "<td>RL algorithm</td><td>GRPO (trl.GRPOTrainer)</td>" in html
    # which software made the run, and on what, as recorded in config.json (this process's)
    versions = json.loads((short_run_dir / "config.json").read_text())["versions"]
    assert versions == run_versions(torch.device("cpu"))
    assert analysis["run"]["versions"] == versions and analysis["run"]["resumed_under"] == []
    assert (f"<td>software and device (as the run started)</td><td>{html_escape(version_line(versions))}"
            "</td>") in html


def test_an_unscorable_completion_is_left_out_of_the_reward_curve(short_run_dir, tmp_path):
    """TRL logs a completion no reward function could score as None (rollouts.jsonl keeps it):
    the report's reward curve leaves it out instead of failing on it."""
    from sae_shards.analysis.plots import step_reward_means

    run = tmp_path / "run"
    shutil.copytree(short_run_dir, run)
    rows = [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]
    rows[0]["rewards"][0] = None
    rows[1]["rewards"] = [None] * len(rows[1]["rewards"])  # a step with nothing scored
    (run / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    steps, means = step_reward_means(RunView(run))
    assert rows[1]["step"] not in steps and steps[0] == rows[0]["step"]
    scored = rows[0]["rewards"][1:]
    assert means[0] == pytest.approx(sum(scored) / len(scored))
    out = analyze(run, tmp_path / "report.html", n_shards=1, dose=False)
    skipped = json.loads((tmp_path / "analysis.json").read_text())["models_skipped"]
    assert skipped == "not asked for (--no-dose)"  # audit 150 F9: the JSON said nothing
    page = _Page()
    page.feed(out.read_text())
    assert page.sections["reward"] == 1
    for row in rows:  # no step scored, then no step recorded: the section says why
        row["rewards"] = [None] * len(row["rewards"])
    (run / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    said = analyze(run, tmp_path / "report.html", n_shards=1, dose=False).read_text()
    assert "No reward curve: no completion of any step was scored." in said
    (run / "rollouts.jsonl").write_text("")
    said = analyze(run, tmp_path / "report.html", n_shards=1, dose=False).read_text()
    assert "No reward curve: rollouts.jsonl is empty, the run recorded no rollouts" in said


def test_analyze_cli_reports_a_bad_run_dir(tmp_path, capsys):
    assert cli_main(["analyze", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "cannot analyze" in err and "no checkpoint (neither final/ nor step_XXXXXX/)" in err
    for job in ("sae.k=2", "sae.k=4"):  # a multirun sweep's parent directory names its runs
        (tmp_path / job / "checkpoints" / "final").mkdir(parents=True)
    assert cli_main(["analyze", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is a directory of runs, not a run: it holds the runs ['sae.k=2', 'sae.k=4']" in err
    (tmp_path / "multirun.yaml").write_text("{}\n")  # Hydra's mark of a sweep
    assert cli_main(["analyze", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is a sweep's directory, not a run: it holds the runs ['sae.k=2', 'sae.k=4']" in err
    bad_args = [("analyze", ["--shards", "-2"]), ("analyze", ["--n-prompts", "0"]),
                ("analyze", ["--threads", "0"]), ("evaluate", ["--n-null", "0"]),
                ("evaluate", ["--n-prompts", "0"]), ("evaluate", ["--threads", "-1"]),
                ("evaluate", ["--from-step", "-1"]), ("evaluate", ["--n-null", "two"])]
    for command, bad in bad_args:  # refused before anything is read
        with pytest.raises(SystemExit):
            cli_main([command, str(tmp_path), *bad])
        err = capsys.readouterr().err
        assert any(w in err for w in ("negative", "must be 1 or more", "not a whole number")), err


def test_analyze_details_the_shards_it_is_told_to(short_run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(short_run_dir, run)
    assert cli_main(["analyze", str(run), "--shards", "5,3,5", "--no-dose"]) == 0
    analysis = json.loads((run / "analysis.json").read_text())
    assert analysis["top_shards"] == [5, 3] and sorted(analysis["shards"]) == ["3", "5"]
    html = (run / "report.html").read_text()
    assert "Shard timeline (chosen shards," in html and "<h3>shard 5" in html
    # the row says they were chosen (it said "the always-on ones, then the largest others")
    assert ("detailed shards (chosen: --shards, in that order)</td><td>5 (never left its random "
            "start), 3 (never left its random start)</td>") in html  # (a short run's SAE)
    assert cli_main(["analyze", str(run), "--shards", "3,16", "--no-dose"]) == 2
    assert ("--shards names shard 16, but checkpoint final has shards 0 to 15"
            in capsys.readouterr().err)
    with pytest.raises(SystemExit):
        cli_main(["analyze", str(run), "--shards", "3,x"])
    assert "give a count (4) or shard indices separated by commas" in capsys.readouterr().err
    before = (run / "analysis.json").read_text()  # a count above the shards: meant as an index
    assert cli_main(["analyze", str(run), "--shards", "41", "--no-dose"]) == 2
    assert ("--shards 41 is a count (detail the 41 largest shards), but checkpoint final has 16 "
            "(shards 0 to 15); give a count up to 16, or the indices of the shards to detail (one "
            "shard: end it with a comma, --shards 15,)" in capsys.readouterr().err)
    # the advice is taken (it advised --shards 41, which names no shard either)
    assert (run / "analysis.json").read_text() == before  # refused before anything is written
    assert cli_main(["analyze", str(run), "--shards", "15,", "--no-dose"]) == 0
    assert json.loads((run / "analysis.json").read_text())["top_shards"] == [15]
    assert cli_main(["analyze", str(run), "--shards", "16", "--no-dose"]) == 0  # a count: all
    assert "(a count; every shard)" in capsys.readouterr().err
    assert cli_main(["analyze", str(run), "--shards", "7,", "--no-dose"]) == 0  # one shard
    assert json.loads((run / "analysis.json").read_text())["top_shards"] == [7]
    live = (RunView(run).timeline()[1] != 0).any(0)
    silent = [i for i in range(live.numel()) if not live[i]]
    assert silent  # a chosen shard active nowhere: said, not an empty table
    assert cli_main(["analyze", str(run), "--shards", f"{silent[0]},", "--no-dose"]) == 0
    page = (run / "report.html").read_text()
    assert "Active on no sample of the timeline" in page and "<th>RL step</th>" not in page
    heldout = json.loads((run / "summary.json").read_text())["fvu_heldout"]  # null: none held out
    shown = "held-out FVU (the buffered held-out samples, at the end)</td><td>"
    page = (run / "report.html").read_text()
    if heldout is None:
        assert shown not in page
    else:
        assert f"{shown}{heldout:.3f}</td>" in page
    from sae_shards.analysis.report import _summary_html, checkpoint_figures

    view = RunView(run)  # a run that held samples out: the row shows their FVU
    figures, own = checkpoint_figures(view, json.loads((run / "summary.json").read_text()))
    table = _summary_html(view, {}, {**figures, "fvu_heldout": 0.25}, own, [], view.density(), {})
    assert f"{shown}0.250</td>" in table
    # at a checkpoint, each row says how far its own count went (both said "to 150 and 572")
    summary = json.loads((run / "summary.json").read_text())
    table = _summary_html(view, summary, {**figures, "rl_steps": 5, "sae_steps": 3}, False, [],
                          view.density(), {})
    assert (f"RL steps</td><td>5 (as of the checkpoint; the run went on to "
            f"{summary['rl_steps']})</td>") in table
    assert (f"SAE steps</td><td>3 (as of the checkpoint; the run went on to "
            f"{summary['sae_steps']})</td>") in table
    assert cli_main(["analyze", str(run), "--shards", "6", "--no-dose"]) == 0  # said to be a count
    assert ("--shards 6 details the always-on shards and the 6 largest others (a count; shard 6 "
            "alone is --shards 6,)") in (
        capsys.readouterr().err)


def test_top_shards_are_every_always_on_shard_then_exactly_n_others_largest_first():
    from types import SimpleNamespace

    import torch

    from sae_shards.analysis.report import top_shards

    # 10 samples, 6 shards: 0 and 4 always on (density 1.0, 0.8), 1-3 in some samples
    acts = torch.zeros(10, 6)
    acts[:, 0] = 1.0
    acts[2:, 4] = 5.0  # density 0.8, ALWAYS_ON_DENSITY itself: always on (families.is_always_on)
    acts[:3, 1] = 2.0  # mass 6
    acts[:5, 2] = 3.0  # mass 15
    acts[:2, 3] = -1.0  # mass 2 (|activation|); shard 5 never fires
    view = SimpleNamespace(timeline=lambda which: (torch.arange(10), acts))
    assert top_shards(view, 2) == [4, 0, 2, 1]  # always on by mass, then the 2 largest others
    assert top_shards(view, 3) == [4, 0, 2, 1, 3]
    assert top_shards(view, 9) == [4, 0, 2, 1, 3]  # a shard that never fired is not one
    assert top_shards(view, 0) == [4, 0]


def test_families_table_lists_families_of_several_shards_largest_first():
    from sae_shards.analysis.report import _families_html

    rows = [{"shards": [0, 3], "density": 0.2, "mass_share": 0.1},
            {"shards": [1], "density": 0.1, "mass_share": 0.05},
            {"shards": [2, 4, 5], "density": 0.3, "mass_share": 0.4}]
    page = _families_html(rows)
    assert page.index("2, 4, 5") < page.index("0, 3")
    assert "2 families of several shards; 1 shard is a family of one (" in page
    assert "of one" not in _families_html([rows[0]])  # no family of one: not said
    assert "<td>1</td>" not in page  # the single shard is counted, not listed


def test_the_rl_algorithm_has_one_name_however_the_run_recorded_it():
    """sae-shards train records ``grpo``, ShardCallback the trainer's class: one name for both."""
    from sae_shards.analysis.report import algorithm_name

    assert algorithm_name("grpo") == algorithm_name("GRPOTrainer") == "GRPO (trl.GRPOTrainer)"
    assert algorithm_name("rloo") == algorithm_name("RLOOTrainer") == "RLOO (trl.RLOOTrainer)"
    assert algorithm_name("OnlineDPOTrainer") == "OnlineDPOTrainer"
    assert algorithm_name(None) == "n/a"


def test_every_algorithm_has_its_trainer_and_its_name():
    """``rl.algorithm``'s choices, the recipe's ``TRAINERS`` and ``ALGORITHM_TRAINERS`` (the
    report's names) are one list: a new algorithm missing from one of them fails here."""
    from typing import get_args

    from sae_shards.recipe.trainers import TRAINERS
    from sae_shards.run.config import ALGORITHM_TRAINERS, Algorithm

    assert set(get_args(Algorithm)) == set(TRAINERS) == set(ALGORITHM_TRAINERS)
    for algorithm, (_, trainer) in TRAINERS.items():
        assert trainer.__name__ == ALGORITHM_TRAINERS[algorithm]


def test_a_steps_rollouts_show_its_contexts_and_one_completion_per_prompt():
    """A step of two prompt groups per context: the table names the contexts and samples each
    prompt once, not the first prompt's group members."""
    from sae_shards.analysis.report import _contexts, _group_samples

    row = {"prompts": ["<A> x"] * 4 + ["<B> y"] * 4 + ["<A> z"] * 4,
           "completions": [f"c{i}" for i in range(12)], "rewards": [0.5] * 11 + [None],
           "tasks": ["A"] * 4 + ["B"] * 4 + ["A"] * 4}
    assert _contexts(row) == "A 8, B 4" and _contexts({"tasks": None}) == "-"
    chat = {"prompts": [[{"role": "user", "content": "v 93"}]] * 2,
            "completions": [[{"role": "assistant", "content": "aei"}]] * 2, "rewards": [1.0, 0.0]}
    assert _group_samples(chat) == ["user: 'v 93' → assistant: 'aei' (r=1.00)"]
    assert _group_samples(row) == ["'<A> x' → 'c0' (r=0.50)", "'<B> y' → 'c4' (r=0.50)",
                                   "'<A> z' → 'c8' (r=0.50)"]


def test_the_notebook_example_in_docs_runs_as_written(short_run_dir, tmp_path):
    """docs/analysis.md's notebook snippet, on a short run (its shard index swapped for one of
    this run's live shards): every line runs, and the interventions restore the weights."""
    import re
    from pathlib import Path

    import torch

    text = (Path(__file__).resolve().parents[1] / "docs" / "analysis.md").read_text()
    code = re.search(r"## In a notebook\n```python\n(.*?)```", text, re.S).group(1)
    live = int(RunView(short_run_dir).density().argmax())
    code = code.replace('"runs/default", 100))', '"runs/default", 12))')  # its step checkpoint
    code = code.replace('"runs/default"', repr(str(short_run_dir)))
    code = code.replace('"my_shards"', repr(str(tmp_path / "my_shards")))
    code = code.replace('"two_shards"', repr(str(tmp_path / "two_shards")))
    code = code.replace("view.shards[20]", f"view.shards[{live}]")
    code = code.replace("view.top_steps(20,", f"view.top_steps({live},")
    code = code.replace("view.rollouts[120]", "view.rollouts[12]")  # this run's last step
    code = code.replace(".derived(120)", ".derived(12)")
    scope: dict = {}
    exec(compile(code, "docs/analysis.md", "exec"), scope)
    initial, final = scope["initial"], scope["final"]
    again = scope["load_run_models"](short_run_dir)
    for model, fresh in ((initial, again.initial), (final, again.final)):
        for (name, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
            assert torch.equal(p, q), name  # restored bit-exactly after each intervention
    assert 0 <= scope["steered"].mean <= 1 and 0 <= scope["ablated"].mean <= 1
    assert (tmp_path / "my_shards" / "sae.safetensors").is_file()  # saved where it was told
    assert len(ShardSet.load(tmp_path / "two_shards")) == 2


def test_the_python_api_takes_what_a_notebook_hands_it(short_run_dir):
    """Shards, models and runs as load_run_models and ShardSet give them; mistakes named."""
    from sae_shards.analysis.interventions import (add_direction, mean_reward, remove_direction,
                                                   update_coefficient)
    from sae_shards.analysis.shards import load_run_models
    from sae_shards.core.checkpoint import CheckpointError

    view = RunView(short_run_dir)
    shards = view.shards
    live = int(view.density().argmax())
    assert view.top_steps(shards[live]) == view.top_steps(live)  # a Shard or its index
    assert [s.index for s in shards[1:3]] == [1, 2]
    with pytest.raises(IndexError, match=f"shard index {len(shards)} out of range"):
        view.top_steps(len(shards))
    with pytest.raises(ValueError, match="which='Final': 'final'"):
        view.timeline("Final")
    with pytest.raises(CheckpointError, match=r"no checkpoint 'fina' \(it has \['final'"):
        load_run_models(short_run_dir, "fina")
    initial, final, tokenizer, task = load_run_models(short_run_dir)
    direction = shards[live].dense(scaled=False)
    c = update_coefficient(final, initial, direction)  # models, as load_run_models gives them
    assert c == update_coefficient(dict(final.named_parameters()),
                                   dict(initial.named_parameters()), direction)
    with remove_direction(final, direction, initial) as removed:
        assert removed == c
    with pytest.raises(TypeError, match=r"not Shard \(a Shard: give shard.dense\(scaled=False\)"):
        with add_direction(initial, shards[live], 1.0):
            pass
    with pytest.raises(TypeError, match="task is None; a run of your own TRL script"):
        mean_reward(final, tokenizer, None)


def test_the_readme_loading_example_runs_as_written(short_run_dir):
    """README's "Loading shards" snippet, on a short run: every line runs."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## Loading shards\n\n```python\n(.*?)```", text, re.S).group(1)
    code = code.replace('"runs/default", 100))', '"runs/default", 12))')  # its step checkpoint
    code = code.replace('"runs/default"', repr(str(short_run_dir)))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert set(scope["shard"].dense(scaled=False)) == set(scope["shards"].target_names)
    # it shows a shard that fired (audit 115 F3: shard 3 of the default run never did)
    assert scope["shard"].density > 0 and scope["view"].top_steps(scope["i"], k=5)


def test_the_reports_interventions_are_the_plain_calls_with_shared_baselines(
        short_run_dir, tmp_path, monkeypatch):
    """The report scores each policy unchanged once (the dose-response's alpha 0 and the
    ablation's reference, for every shard) and scales each shard's direction by c in place
    after its ablation: its figures are exactly those of dose_response(c * direction) and
    ablate(direction) called on their own, with fewer rollouts, drawn again from the seeds and
    counts analysis.json records (``draws``; none were recorded before)."""
    import dataclasses

    import sae_shards.analysis.interventions as iv
    import sae_shards.analysis.report as report
    from sae_shards.analysis.shards import load_run_models, run_sampling
    from sae_shards.run import rundir

    score = iv.score_rollouts
    calls = []
    counted = lambda *a, **k: calls.append(1) or score(*a, **k)  # noqa: E731
    monkeypatch.setattr(iv, "score_rollouts", counted)
    monkeypatch.setattr(report, "score_rollouts", counted)
    alphas = (-1.0, 0.0, 1.0)
    analyze(short_run_dir, tmp_path / "report.html", n_shards=2, n_prompts=4, alphas=alphas)
    analysis = json.loads((tmp_path / "analysis.json").read_text())
    n = len(analysis["shards"])
    # the reward tried on two prompts, each policy unchanged, then per shard the shard and
    # the control at the two non-zero alphas and the ablation's three (removed, overshoot,
    # control)
    assert len(calls) == 1 + 2 + n * (2 * 2 + 3)
    monkeypatch.undo()
    initial, final, tokenizer, task = load_run_models(short_run_dir)
    theta0 = dict(initial.named_parameters())
    sampling = run_sampling(short_run_dir)
    view = RunView(short_run_dir)
    s = analysis["top_shards"][-1]
    direction = view.shards[s].dense(scaled=False)
    c = iv.update_coefficient(final, theta0, direction)
    drawn = analysis["draws"]  # what the prompts, rollouts and random controls were drawn with
    assert drawn == {"seed": 0, "control_seed": 0, "n_prompts": 4, "n_samples": 4}
    redraw = {**sampling, "n_prompts": drawn["n_prompts"], "seed": drawn["seed"],
              "control_seed": drawn["control_seed"], "n_samples": drawn["n_samples"]}
    dr = iv.dose_response(initial, tokenizer, task, {k: d * c for k, d in direction.items()},
                          alphas, **redraw)
    ab = iv.ablate(final, tokenizer, task, direction, theta0, **redraw)
    entry = analysis["shards"][str(s)]
    assert entry["update_coefficient"] == c
    same = lambda x: json.loads(json.dumps(rundir.strict_json(x), default=float))  # noqa: E731
    assert entry["dose_response"] == same(report._dose_entry(dr))
    assert entry["ablation"].pop("told_apart") in (True, False)  # judged with the others
    assert entry["ablation"] == same(dataclasses.asdict(ab))


def test_a_share_that_is_exactly_zero_says_no_reward_changed():
    """A span whose removal changed no prompt's reward (no sampled token moved: 0 with 0 error)
    is said to be that, not printed as a 0.0% ± 0.0% measurement."""
    from sae_shards.analysis.report import together_line

    entry = {"shards": [3, 5], "changes": {"run": [0.4, 0.05]},
             "shares": {"removed": [0.0, 0.0], "kept": [0.125, 0.0125],
                        "removed_whole": [0.5, 0.05]}}
    line = together_line({"together": entry})
    assert "undoes 0% (no prompt's reward changed) of the run's reward change (+0.4000)" in line
    assert "the same parameters 50.0% ± 5.0%" in line and "recovers 12.5% ± 1.2%" in line
    # the shards' parameters are all the run changed: the reference is the run, not a figure
    line = together_line({"together": {**entry, "whole_is_run": True}})
    assert "their parameters are all the run changed;" in line and "50.0%" not in line
    assert "as far again" not in line  # an analysis.json of an earlier version: no overshoot
    entry["shares"]["overshoot"] = [0.06, 0.01]
    line = together_line({"together": entry})
    assert ("the same parameters 50.0% ± 5.0%, and moving as far again past the policy loses "
            "6.0% ± 1.0%; their span alone recovers 12.5% ± 1.2%") in line


def test_a_share_within_two_standard_errors_of_zero_is_marked_not_resolved():
    """3.3% ± 2.7% is no share at all on these rollouts: it says so (as the ablation table's
    note says of such a change); a share clear of 0 is printed plainly."""
    from sae_shards.analysis.report import together_line

    entry = {"shards": [3], "changes": {"run": [0.4, 0.05]},
             "shares": {"removed": [0.033, 0.027], "kept": [0.60, 0.08],
                        "removed_whole": [0.7, 0.1]}}
    line = together_line({"together": entry})
    assert "undoes 3.3% ± 2.7% (not resolved from 0) of the run's reward change" in line
    assert "recovers 60.0% ± 8.0%" in line and "60.0% ± 8.0% (not" not in line


def test_the_spans_line_sets_each_share_beside_its_random_control():
    """Audit 134 F1: the line gave 'their span alone recovers 44.4% ± 19.6%' where a random
    direction of the span's norm undid twice what the span did and recovered half as much,
    within noise of the span: each share now has its control beside it, and a share not told
    apart from it (the paired difference within two standard errors) says so."""
    from sae_shards.analysis.report import together_line

    entry = {"shards": [45, 50], "changes": {"run": [0.0088, 0.0032],
                                             "removed_beyond_control": [0.0019, 0.0030],
                                             "kept_beyond_control": [0.03, 0.005]},
             "shares": {"removed": [0.222, 0.249], "kept": [0.444, 0.196],
                        "removed_whole": [1.0, 0.0], "removed_control": [0.444, 0.173],
                        "kept_control": [0.222, 0.129]}}
    line = together_line({"together": entry})
    assert ("of the run's reward change (+0.0088) (a random direction of its norm: 44.4% ± "
            "17.3%; not told apart from it)") in line
    assert "recovers 44.4% ± 19.6% (a random direction of its norm: 22.2% ± 12.9% (not " \
           "resolved from 0)) (report" in line  # told apart: 0.03 is 6 standard errors


@pytest.mark.parametrize("content, problem", [
    ("{\"rl_steps\": 12,", r"not valid JSON"),
    ("[1, 2]", r"expected a JSON object, got list"),
    (json.dumps({"rl_steps": 12, "reward_first": "0.1"}), r"reward_first is str '0.1', expected "
                                                          r"a number or null"),
    (json.dumps({"interrupted": "no"}), r"interrupted is str 'no', expected true or false"),
])
def test_a_damaged_summary_is_refused_naming_it(short_run_dir, tmp_path, content, problem):
    """summary.json that is not JSON, not an object, or holds a figure of another type (edited,
    or another tool's file): the report names the file and the figure, instead of json's or
    format()'s error from inside analyze."""
    from sae_shards.core.checkpoint import CheckpointError

    run = tmp_path / "run"
    shutil.copytree(short_run_dir, run)
    (run / "summary.json").write_text(content)
    with pytest.raises(CheckpointError, match=rf"{run / 'summary.json'}: {problem}.*copy it "
                                              r"again from the run, or delete it"):
        analyze(run, tmp_path / "report.html", n_shards=1, dose=False)
    (run / "summary.json").unlink()  # the figures are then recomputed from the logs
    analyze(run, tmp_path / "report.html", n_shards=1, dose=False)


def test_a_summary_holding_none_of_the_figures_is_not_taken_for_them(short_run_dir, tmp_path):
    """Audit 147 F5: {"steps": "many"} was taken as final's figures, every one n/a, without a
    word; a summary that does not describe the checkpoint is recomputed from the logs, as none
    is."""
    from sae_shards.analysis.report import RUN_FIGURES, checkpoint_figures

    run = tmp_path / "run"
    shutil.copytree(short_run_dir, run)
    summary = json.loads((run / "summary.json").read_text())
    view = RunView(run)
    assert checkpoint_figures(view, summary) == ({k: summary.get(k) for k in RUN_FIGURES}, True)
    recomputed, own = checkpoint_figures(view, {})
    assert not own and recomputed["rl_steps"] == summary["rl_steps"]
    for foreign in ({"steps": "many"}, {**summary, "rl_steps": summary["rl_steps"] + 1}):
        figures, own = checkpoint_figures(view, foreign)
        assert not own and {**figures, "interrupted": None} == {**recomputed,
                                                                 "interrupted": None}


def test_a_per_step_run_of_mixed_batches_says_its_context_shares_repeat_the_batches_mix(
        tmp_path):
    """Per-step samples of batches that mix contexts (the planted task's `mixed` schedule:
    every step holds every task) blend them, so each shard's |activation| by context repeats
    the batches' mix: the report says so, with the count, and points to per-event capture;
    analysis.json records the count. A per-event run of the same task (one context a sample)
    has no such note."""
    from hydra import compose, initialize_config_dir

    from sae_shards.cli import CONFIG_DIR, job_config_from_hydra
    from sae_shards.run.job import run_job

    runs = {}
    for granularity, extra in (("step", ["capture.precondition=none", "capture.normalize=none"]),
                               ("group", [])):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            cfg = job_config_from_hydra(compose("config", overrides=[
                *extra, "experiment=planted", f"capture.granularity={granularity}",
                "rl.max_steps=6",
                "rl.per_device_train_batch_size=32", "task.n_prompts=256",
                "runner.sae_start_step=0", "runner.min_samples=2", "runner.checkpoint_every=0",
                "logging=disabled"]))
        run_job(cfg, tmp_path / granularity)
        out = analyze(tmp_path / granularity, tmp_path / f"{granularity}.html", n_shards=2,
                      dose=False)
        runs[granularity] = (out.read_text(), json.loads(
            (tmp_path / f"{granularity}.analysis.json").read_text()))
    labels = RunView(tmp_path / "step").sample_labels()
    blended = sum(len(set(sample)) > 1 for sample in labels)
    assert blended == len(labels) == 6  # every step holds every task
    html, analysis = runs["step"]
    assert (analysis["run"]["blended_samples"], analysis["run"]["n_samples"]) == (6, 6)
    assert "6 of 6 samples (optimizer steps) hold rollouts of more than one context" in html
    assert "capture.granularity=group" in html
    html, analysis = runs["group"]
    assert analysis["run"]["blended_samples"] == 0 and analysis["run"]["n_samples"] > 6
    assert "hold rollouts of more than one context" not in html


def test_a_shard_whose_steering_changed_no_score_is_named():
    """A short run's c is small: at every alpha each prompt scored as at alpha 0, and the table's
    '± 0.0000' read as an effect of exactly zero. The report names such a shard; one whose
    scores moved, even if the mean came back, is not named."""
    from sae_shards.analysis.interventions import DoseResponse
    from sae_shards.analysis.report import _unmoved_note

    def dose(rewards, paired):
        return DoseResponse(alphas=[-1.0, 0.0, 1.0], reward_shard=rewards, stderr_shard=[0.1] * 3,
                            reward_control=rewards, stderr_control=[0.1] * 3, n=8,
                            stderr_change_shard=paired, stderr_change_control=paired)

    note = _unmoved_note({3: dose([0.5] * 3, [0.0] * 3), 7: dose([0.5] * 3, [0.02, 0.0, 0.02]),
                          9: dose([0.4, 0.5, 0.6], [0.01, 0.0, 0.01])})
    assert note.startswith("<p>Shard 3: at every alpha") and "7" not in note and "9" not in note
    assert _unmoved_note({9: dose([0.4, 0.5, 0.6], [0.01, 0.0, 0.01])}) == ""
    assert _unmoved_note({3: dose([0.5] * 3, [])}) == ""  # no alpha 0: nothing paired


def test_a_shard_without_a_writer_says_why_it_has_no_logit_lens(tmp_path):
    """Shards of query projections only (no residual-stream writer): the report and
    analysis.json say why there is no logit lens, instead of an empty table or list."""
    from hydra import compose, initialize_config_dir

    from sae_shards.cli import CONFIG_DIR, job_config_from_hydra
    from sae_shards.run.job import run_job

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = job_config_from_hydra(compose("config", overrides=[
            "rl.max_steps=6", "runner.min_samples=2", "sae.n_latents=8", "logging=disabled",
            "capture.targets=[*q_proj.weight]"]))
    run_job(cfg, tmp_path / "run")
    out = analyze(tmp_path / "run", tmp_path / "report.html", n_shards=1, n_prompts=2,
                  alphas=(0.0, 1.0))
    entry = next(iter(json.loads((out.parent / "analysis.json").read_text())["shards"].values()))
    assert entry["logit_lens"] == []
    assert entry["logit_lens_none"].startswith("no part of this shard is on a residual-stream "
                                               "writer")
    assert "No logit lens: no part of this shard" in out.read_text()


def test_a_policy_without_a_final_norm_gets_a_report_saying_why_there_is_no_logit_lens(
        tmp_path):
    """A model whose final norm the lens cannot tell (post-norm OPT, OPT-350m's layout, has
    none) ended analyze in the lens's traceback with no report; now its logit lens says why
    and the rest of the report is written."""
    import torch
    from hydra import compose, initialize_config_dir
    from transformers import AutoConfig, AutoModelForCausalLM

    from sae_shards.cli import CONFIG_DIR, job_config_from_hydra
    from sae_shards.recipe.models import build_tokenizer
    from sae_shards.run.job import run_job

    tokenizer = build_tokenizer()
    config = AutoConfig.for_model(
        "opt", vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32, do_layer_norm_before=False,
        max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "opt")
    tokenizer.save_pretrained(tmp_path / "opt")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = job_config_from_hydra(compose("config", overrides=[
            "rl.max_steps=6", "runner.min_samples=2", "sae.n_latents=8", "logging=disabled",
            "model=hf_path", f"model.path={tmp_path / 'opt'}"]))
    run_job(cfg, tmp_path / "run")
    out = analyze(tmp_path / "run", tmp_path / "report.html", n_shards=1, n_prompts=2,
                  alphas=(0.0, 1.0))
    analysis = json.loads((out.parent / "analysis.json").read_text())
    entry = next(iter(analysis["shards"].values()))
    assert entry["logit_lens"] == []
    assert entry["logit_lens_none"].startswith("cannot tell the final norm of OPTForCausalLM")
    assert "No logit lens: cannot tell the final norm of OPTForCausalLM" in out.read_text()
    assert "dose_response" in entry  # the interventions still ran


def test_the_worse_than_its_mean_warning_needs_an_fvu_above_one():
    from sae_shards.capture.summary import worse_than_mean

    assert "(FVU over its last tenth of steps 1.06 > 1, after 12 SAE steps)" in worse_than_mean(
        1.06, 12)
    assert [worse_than_mean(f, 12) for f in (0.98, 1.0, math.nan, None)] == [None] * 4


def test_the_reports_logit_lens_reads_the_initial_policy(short_run_dir, tmp_path,
                                                               monkeypatch):
    """docs/analysis.md s.5: the report's logit lens goes through the *initial* model (its final
    norm and unembedding), as the dose-response steers the initial weights."""
    import sae_shards.analysis.report as report
    from sae_shards.analysis.shards import load_run_models

    initial, final, _, _ = load_run_models(short_run_dir)
    given = []

    class Stop(Exception):
        pass

    def record(model, tokenizer, shard, top_k):
        given.append({n: p.detach().clone() for n, p in model.named_parameters()})
        raise Stop

    monkeypatch.setattr(report, "lens_rows", record)
    with pytest.raises(Stop):
        report.analyze(short_run_dir, tmp_path / "report.html", n_shards=1, n_prompts=2)
    (seen,) = given
    moved = [n for n, p in final.named_parameters()
             if not torch.equal(p, dict(initial.named_parameters())[n])]
    assert moved  # the run changed the policy, so the two are told apart
    assert all(torch.equal(seen[n], p) for n, p in initial.named_parameters())


def test_analysis_json_lists_each_shards_top_k_steps(short_run_dir, tmp_path):
    """analysis.json's top_steps of a shard: RunView.top_steps(shard, top_k), all top_k of them."""
    import json

    from sae_shards.analysis.report import analyze
    from sae_shards.analysis.shards import RunView

    analyze(short_run_dir, tmp_path / "report.html", n_shards=2, top_k=3, dose=False)
    analysis = json.loads((tmp_path / "analysis.json").read_text())
    view = RunView(short_run_dir)
    for s, entry in analysis["shards"].items():
        want = [t["rl_step"] for t in view.top_steps(int(s), 3)]
        assert len(want) == 3
        assert entry["top_steps"] == want


def test_the_dose_tables_control_column_is_the_largest_alphas():
    """The report's dose table ends with the control's reward at the largest alpha (its header
    names that alpha), whatever the alphas' order."""
    from sae_shards.analysis.interventions import DoseResponse
    from sae_shards.analysis.report import _dose_table

    dr = DoseResponse(alphas=[-1.0, 0.0, 2.0], reward_shard=[0.1, 0.2, 0.3],
                      stderr_shard=[0.01] * 3, reward_control=[0.111, 0.2, 0.777],
                      stderr_control=[0.01] * 3, n=8, stderr_change_shard=[0.02, 0.0, 0.03],
                      stderr_change_control=[0.04, 0.0, 0.05])
    html = _dose_table({3: dr}, {"shards": {3: {"update_coefficient": 0.5}}}, {})
    assert "control at 2" in html and "0.7770 ± 0.0500" in html
    assert "0.1110" not in html


def test_the_ablation_table_says_which_shards_are_not_told_apart_from_their_control():
    """Audit 134 F1: under the ablation table a fixed sentence said a random direction 'usually
    changes no sampled token, so its row reads 0', false where the control moved the reward as
    much as the shards did. The table now gives each shard's removal minus its control's,
    paired per prompt, and names the shards not told apart from it."""
    from sae_shards.analysis.interventions import Ablation
    from sae_shards.analysis.report import _ablation_html

    def ablation(beyond: float, stderr: float) -> Ablation:
        return Ablation(coefficient=0.05, reward_final=0.15, stderr_final=0.01,
                        reward_removed=0.148, stderr_removed=0.01, reward_control=0.147,
                        stderr_control=0.01, n=64, change_removed=-0.002,
                        stderr_change_removed=0.002, change_control=-0.003,
                        stderr_change_control=0.002, beyond_control=beyond,
                        stderr_beyond_control=stderr, n_prompts=16)

    entries = {s: {"attributed_update": 0.1, "attributed_steps": [1, 30]} for s in (45, 50)}
    page = _ablation_html({45: ablation(-0.03, 0.005), 50: ablation(0.001, 0.002)}, {},
                          "final policy", entries)
    assert "without the shard minus without random" in page
    assert "-0.0300 ± 0.0050</td>" in page and "+0.0010 ± 0.0020 (not told apart)" in page
    assert "Not told apart from the random direction's: shard 50.</p>" in page
    assert "usually changes no sampled token" not in page
    page = _ablation_html({50: ablation(0.001, 0.002)}, {}, "final policy", entries)
    assert "For no shard is the removal told apart" in page


def test_shards_whose_c_and_attribution_disagree_in_sign_are_named_under_both_tables():
    """Audit 142 F2: c, alpha = 1 of the dose-response and the amount the ablation removes, was
    called 'the shard's share of the run's update', and only the ablation table said when it
    contradicts the SAE's own attribution (the default run's always-on shards: c +0.17 against
    -1.06). Both tables now name those shards."""
    from sae_shards.analysis.interventions import Ablation
    from sae_shards.analysis.report import _ablation_html, _against_attribution

    def ablation(c: float) -> Ablation:
        return Ablation(coefficient=c, reward_final=0.15, stderr_final=0.01,
                        reward_removed=0.148, stderr_removed=0.01, reward_control=0.147,
                        stderr_control=0.01, n=64, beyond_control=0.0,
                        stderr_beyond_control=0.01, n_prompts=16)

    entries = {20: {"attributed_update": -1.06, "update_coefficient": 0.17,
                    "attributed_steps": [1, 150]},
               30: {"attributed_update": -0.14, "update_coefficient": -0.29,
                    "attributed_steps": [1, 150]}}
    page = _ablation_html({20: ablation(0.17), 30: ablation(-0.29)}, {}, "final policy", entries)
    assert "For shard(s) 20 the two disagree in sign" in page
    said = _against_attribution({"shards": entries}, "their curves measure")
    assert said.startswith("For shard(s) 20 c and the SAE's attribution disagree in sign: their "
                           "curves measure the update along that direction")
    entries[20]["update_coefficient"] = -0.17
    assert _against_attribution({"shards": entries}, "their curves measure") == ""


def test_the_ablation_table_sets_each_removal_beside_its_overshoot():
    """Audit 142 F4: pushing the final policy as far again along a shard cost nearly as much as
    removing it (shard 5: 0.028 against 0.033), so a removal's cost was partly the policy's
    curvature. The table gives the overshoot's change, and names the shards whose removal
    cost no more than it."""
    from sae_shards.analysis.interventions import Ablation
    from sae_shards.analysis.report import _ablation_html

    def ablation(removed: float, over: float) -> Ablation:
        return Ablation(coefficient=0.2, reward_final=0.67, stderr_final=0.01,
                        reward_removed=0.67 + removed, stderr_removed=0.01, reward_control=0.67,
                        stderr_control=0.01, n=128, change_removed=removed,
                        stderr_change_removed=0.005, change_control=0.0,
                        stderr_change_control=0.0, beyond_control=removed,
                        stderr_beyond_control=0.005, reward_overshoot=0.67 + over,
                        change_overshoot=over, stderr_change_overshoot=0.004, n_prompts=32)

    entries = {s: {} for s in (1, 5)}
    page = _ablation_html({1: ablation(-0.065, -0.033), 5: ablation(-0.033, -0.036)}, {},
                          "final policy", entries)
    assert "pushed as far again (+ c * shard): change" in page
    assert "-0.0330 ± 0.0040</td>" in page and "-0.0360 ± 0.0040</td>" in page
    assert ("For shard 5 pushing further costs at least as much as removing: that removal's "
            "cost is the policy's curvature") in page
    # a removal that cost nothing is no curvature to explain, whatever the overshoot costs
    # (audit 145 S7)
    page = _ablation_html({1: ablation(-0.065, -0.033), 7: ablation(0.01, -0.02)}, {},
                          "final policy", {1: {}, 7: {}})
    assert "pushing further costs at least as much" not in page


def test_a_share_is_marked_unresolved_on_students_t_and_an_unknown_control_is_not_beyond():
    """Audit 145 S6, S8: the span's shares were marked on the normal's 2 standard errors (2.4
    at 8 prompts is within Student's 2.43), and a control difference that could not be
    estimated (NaN) counted as told apart, printing "Both differ" with no data behind it."""
    from sae_shards.analysis.report import _share, _span_against_control

    assert _share(0.024, 0.01, 8) == "2.4% ± 1.0% (not resolved from 0)"
    assert _share(0.025, 0.01, 8) == "2.5% ± 1.0%"
    text = _span_against_control({"removed_beyond_control": (math.nan, math.nan),
                                  "kept_beyond_control": (0.03, 0.005)}, 32)
    assert text.startswith("On these rollouts removing it is not told apart")
    text = _span_against_control({"removed_beyond_control": (0.03, 0.005),
                                  "kept_beyond_control": (0.03, 0.005)}, 32)
    assert text.startswith("Both differ from the random direction's")
    text = _span_against_control({"removed_beyond_control": (0.03, 0.005),  # 2.4 < 2.43
                                  "kept_beyond_control": (0.024, 0.01)}, 8)
    assert text.startswith("On these rollouts adding it is not told apart")


def test_a_shard_told_apart_alone_is_not_among_shards_that_do_nothing():
    """One shard 2.3 standard errors beyond its control is told apart (16 prompts: Student's t
    needs 2.18); the same beside five shards at 0 is not (Holm's correction: the first of six
    must pass 3.08), and the note under the table says how many shards were judged together."""
    from sae_shards.analysis.interventions import Ablation
    from sae_shards.analysis.report import _ablation_html

    def ablation(beyond: float) -> Ablation:
        return Ablation(coefficient=0.05, reward_final=0.15, stderr_final=0.01,
                        reward_removed=0.148, stderr_removed=0.01, reward_control=0.147,
                        stderr_control=0.01, n=64, change_removed=-0.002,
                        stderr_change_removed=0.002, change_control=-0.003,
                        stderr_change_control=0.002, beyond_control=beyond,
                        stderr_beyond_control=0.01, n_prompts=16)

    entries = {s: {"attributed_update": 0.1, "attributed_steps": [1, 30]} for s in range(6)}
    alone = _ablation_html({0: ablation(-0.023)}, {}, "final policy", entries)
    assert "-0.0230 ± 0.0100</td>" in alone and "Not told apart" not in alone
    assert "beyond 2.18 standard errors.</p>" in alone and "over 16 prompts" in alone
    six = _ablation_html({0: ablation(-0.023), **{s: ablation(0.0) for s in range(1, 6)}}, {},
                         "final policy", entries)
    assert "-0.0230 ± 0.0100 (not told apart)</td>" in six
    assert "For no shard is the removal told apart" in six
    assert "for the 6 shards here together (Holm's correction" in six and "must pass 3.08" in six


def test_a_shard_that_never_left_its_random_start_is_said_to_be_one(short_run_dir, tmp_path):
    """Audit 138 F5: analyze detailed, lensed and intervened on shards whose direction was still
    their random initialisation (|cos| 0.6-0.99 with it), without a word, where compare leaves
    such shards out as untrained. The report now tags them and counts them in the Run table.
    The fixture's short run is such a run (its SAE trains a few steps); one shard moved to
    another direction is then not tagged."""
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(short_run_dir, run)
    assert cli_main(["analyze", str(run), "--no-dose"]) == 0
    analysis = json.loads((run / "analysis.json").read_text())
    shown = analysis["top_shards"]
    cos = {int(s): e["initial_cosine"] for s, e in analysis["shards"].items()}
    assert all(c > 0.9 for c in cos.values()), cos
    html = (run / "report.html").read_text()
    assert (f"<td>shards that never left their random start (|cos| &gt;= 0.5 with their initial "
            f"direction)</td><td>{len(shown)} of the {len(shown)} detailed "
            f"({', '.join(map(str, shown))}); ") in html
    assert "still mostly the SAE&#x27;s random initialisation" in html
    # the always-on row lists the always-on shards alone (audit 140: it listed every tagged one)
    from sae_shards.analysis.families import is_always_on

    density = RunView(run).density()
    always = [i for i in range(len(density)) if is_always_on(density[i])]
    some = next(i for i in range(len(density)) if not is_always_on(density[i]))
    assert cli_main(["analyze", str(run), "--no-dose", "--shards", f"{some},",
                     "--out", str(tmp_path / "one.html")]) == 0
    one = (tmp_path / "one.html").read_text()
    assert f"<h3>shard {some} (never left its random start" in one  # tagged, yet not always on
    row = one.split("always-on shards (active on &gt;= 80% of the samples)</td><td>")[1]
    assert row.startswith(f"{', '.join(map(str, always))}: the direction" if always else "none")
    titles = {int(t.split()[0]): t for t in html.split("<h3>shard ")[1:]}
    for s in shown:  # (after "always on: ..." for an always-on one)
        assert f"never left its random start: |cos| {cos[s]:.2f}" in titles[s].split("</h3>")[0]

    # one detailed shard's decoder moved to a direction of its own
    moved = shown[-1]
    path = run / "checkpoints" / "final" / "sae.safetensors"
    weights = load_file(path)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        header = f.metadata()  # sae-shards' own header, kept
    gen = torch.Generator().manual_seed(5)
    for key in weights:
        if key.startswith("decoder."):
            weights[key][moved] = torch.randn(weights[key][moved].shape, generator=gen)
    square = 0.0  # the direction's squared norm over every target, to be made 1 as saved
    for key in weights:
        if key.startswith("decoder.") and key.endswith(".U"):
            U, V = weights[key][moved], weights[key[:-1] + "V"][moved]
            square += float((U @ V.T).pow(2).sum())
        elif key.startswith("decoder.") and not key.endswith(".V"):
            square += float(weights[key][moved].pow(2).sum())
    for key in weights:
        if key.startswith("decoder."):  # U, V scale as c (their product as c^2), a vector as c^2
            power = 0.25 if key.endswith((".U", ".V")) else 0.5
            weights[key][moved] /= square ** power
    save_file(weights, path, metadata=header)
    assert float(RunView(run).shards.initial_cosines()[moved]) < 0.3
    assert cli_main(["analyze", str(run), "--no-dose"]) == 0
    html = (run / "report.html").read_text()
    titles = {int(t.split()[0]): t for t in html.split("<h3>shard ")[1:]}
    assert "never left" not in titles[moved].split("</h3>")[0]
    assert f"{len(shown) - 1} of the {len(shown)} detailed (" in html
    assert json.loads((run / "analysis.json").read_text())["shards"][str(moved)][
        "initial_cosine"] < 0.3


def test_a_span_whose_overshoot_costs_as_much_as_its_removal_is_named_so():
    """Section 8's overshoot (theta_T + P) beside the removal: a removal that costs no more than
    moving as far again past the policy shows its curvature, and the report says so; a
    removal that costs more is left plain."""
    from sae_shards.analysis.report import _span_overshoot
    from sae_shards.analysis.span import SpanEffect

    def effect(removed: float, over: float) -> SpanEffect:
        return SpanEffect(n=128, n_prompts=32, rewards={},
                          changes={"removed": (removed, 0.01), "overshoot": (over, 0.01)},
                          shares={"overshoot": (-over / 0.5, 0.02)})

    text = _span_overshoot(effect(-0.10, -0.12))
    assert "loses 24.0% ± 2.0%" in text and "the policy's curvature" in text
    text = _span_overshoot(effect(-0.10, -0.03))
    assert "loses 6.0% ± 2.0%" in text and "curvature" not in text
    assert _span_overshoot(SpanEffect(n=1, n_prompts=32, rewards={}, changes={},
                                      shares={})) == ""  # an effect scored without it
