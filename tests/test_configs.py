"""Hydra configs: every shipped YAML composes and validates; bad values name field and fix."""

import dataclasses
import itertools
import re
import shlex
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from sae_shards.cli import CONFIG_DIR, ConfigError, job_config_from_hydra
from sae_shards.core.sae_config import SAEConfig
from sae_shards.run.config import (TASK_NAMES, CaptureConfig, JobConfig, LoggingConfig,
                                   LoraSettings, ModelConfig, RLConfig, RunnerConfig, check_sae_trains,
                                   deconv_warmup_loss)

# Options that need a value from the user to compose.
REQUIRED = {("model", "hf_path"): ["model.path={model_dir}"]}
"""Overrides an option needs; ``{model_dir}``: a saved tiny model (the policy directory is
checked with the config)."""
# Fields an option leaves out on purpose: a local model directory has no tiny model's shape.
LEFT_OUT = {("model", "hf_path"): {"model.arch", "model.hidden_size", "model.num_layers",
                                   "model.num_heads", "model.intermediate_size",
                                   "model.readout_scale"}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from sae_shards.recipe.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def _required(group: str, option: str, model_dir: Path) -> list[str]:
    return [o.format(model_dir=model_dir) for o in REQUIRED.get((group, option), [])]


def _options():
    for group_dir in sorted(p for p in CONFIG_DIR.iterdir() if p.is_dir()):
        for yaml in sorted(group_dir.glob("*.yaml")):
            yield group_dir.name, yaml.stem


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name="config", overrides=overrides)


@pytest.mark.parametrize("group,option", list(_options()))
def test_every_config_composes_and_validates(group, option, model_dir):
    cfg = _compose([f"{group}={option}", *_required(group, option, model_dir)])
    job = job_config_from_hydra(cfg)
    assert isinstance(job, JobConfig)
    # every field is in the YAML: one missing there takes its dataclass default silently, and
    # an override of it is refused by Hydra ("not in struct") instead of validated
    assert set(_fields_missing(cfg, JobConfig)) == LEFT_OUT.get((group, option), set())


def _fields_missing(node, cls, prefix=""):
    """Dotted names of ``cls``'s fields (recursively) that the composed ``node`` lacks."""
    from omegaconf import DictConfig

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in node:
            yield prefix + f.name
        elif dataclasses.is_dataclass(hints[f.name]) and isinstance(node[f.name], DictConfig):
            yield from _fields_missing(node[f.name], hints[f.name], f"{prefix}{f.name}.")


LAUNCH = re.compile(r"sae-shards train ([^\[#(]*?)(?:\s{2,}|\(|$)")
"""A launch command in a YAML's header comment: its arguments end at two spaces, "(" or the end."""


def _launch_commands(path):
    header = itertools.takewhile(lambda line: line.startswith("#"), path.read_text().splitlines())
    return [shlex.split(m.group(1)) for line in header for m in LAUNCH.finditer(line)]


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.rglob("*.yaml")), ids=lambda p: p.stem)
def test_every_yaml_opens_with_a_launch_command_that_runs(path, model_dir):
    """Each shipped YAML's header shows how to launch it, and that command composes, validates
    and builds its task as the CLI would (its overrides through the same checks and rewriting,
    each value of a sweep; a model.path given is a saved tiny model here)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from sae_shards.cli import check_overrides, open_map_args
    from sae_shards.recipe.tasks import build_task

    commands = _launch_commands(path)
    assert commands, f"{path} lacks its launch comment"
    for args in commands:
        args = open_map_args([f"model.path={model_dir}" if a.startswith("model.path=") else a
                              for a in args if a != "-m"])
        check_overrides(args)
        parsed = OverridesParser.create().parse_overrides(args)
        sweeps = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
                  if o.is_sweep_override() else [text] for text, o in zip(args, parsed)]
        for chosen in itertools.product(*sweeps):
            group, option = path.parent.name, path.stem
            given = [f"{group}={option}"] if path.parent != CONFIG_DIR else []
            job = job_config_from_hydra(_compose([*given, *_required(group, option, model_dir),
                                                   *chosen]))
            build_task(job.task.name, **job.task.options)


def test_options_of_free_form_mappings_need_no_plus():
    """``task.options`` and ``rl.extra`` start empty or partial: a key they do not hold yet is
    given like any other field (passed to Hydra as ``++``), a ``+``/``++``/``~`` form and other
    arguments stay as given."""
    from sae_shards.cli import open_map_args

    assert open_map_args(["-cn", "config", "task.options.target_chars=xyz", "+rl.extra.a=1",
                          "rl.extra.beta=0.1", "~rl.extra.b", "sae.k=2", "-m",
                          "task.options.schedule=mixed,random"]) == [
        "-cn", "config", "++task.options.target_chars=xyz", "+rl.extra.a=1",
        "++rl.extra.beta=0.1", "~rl.extra.b", "sae.k=2", "-m",
        "++task.options.schedule=mixed,random"]
    job = job_config_from_hydra(_compose(open_map_args(
        ["task=letters", "task.options.target_chars=xyz", "rl.extra.scale_rewards=none"])))
    assert job.task.options == {"target_chars": "xyz"}
    assert job.rl.extra == {"scale_rewards": "none"}


def test_default_config_equals_dataclass_defaults():
    # The YAML defaults and the dataclass defaults must not drift apart.
    job = job_config_from_hydra(_compose([]))
    assert job == JobConfig()


@pytest.mark.parametrize("override,message", [
    ("sae.k=100", r"sae.k=100 must be between 1 and sae.n_latents=64"),
    ("sae.sparsity=relu", r"sae.sparsity='relu' is not one of \['signed_topk', 'topk'"),
    ("capture.source=momentum", r"capture.source='momentum' is not one of \['update', 'grad'"),
    ("runner.concurrency=process", r"runner.concurrency='process'"),
    ("rl.num_generations=3", r"rl.per_device_train_batch_size=16 must be a multiple of rl.num_generations=3"),
    ("+sae.n_latent=3", r"unknown config keys \['sae.n_latent \(did you mean sae.n_latents\?\)'\]"),
    ("+sae.K=3", r"unknown config keys \['sae.K \(did you mean sae.k\?\)'\]"),
    ("model=hf_path", r"model.path has no value"),
    ("rl.beta=-1", r"rl.beta=-1.0 must be >= 0"),
    ("rl.temperature=0", r"rl.temperature=0.0 must be > 0"),
    ("runner.min_samples=300", r"runner.min_samples=300 exceeds .*capture.capacity=256"),
    ("runner.sae_start_step=150", r"runner.sae_start_step=150 is not before the last RL step"),
    ("task.n_prompts=1", r"task.n_prompts=1 is fewer than one optimizer step's prompts \(2"),
    ("run_dir=", r"run_dir is empty"),
    ("resume=true overwrite=true", r"resume=true and overwrite=true contradict"),
    # audit 148 F4.3: accepted, AuxK silently off (NaN compares False), and every checkpoint the
    # run wrote then refused by the loader, which wants finite numbers
    ("sae.aux_coef=nan", r"sae.aux_coef=nan: expected a finite number"),
    ("sae.lr=inf", r"sae.lr=inf: expected a finite number"),
    ("rl.learning_rate=inf", r"rl.learning_rate=inf: expected a finite number"),
    ("runner.worker_timeout_s=0", r"runner.worker_timeout_s=0.0 must be > 0"),
    ("capture.outlier_ratio=0.5", r"capture.outlier_ratio=0.5 must be > 1"),
    ("capture.kfac_damping=0", r"capture.kfac_damping=0.0 must be > 0"),
    ("runner.concurrency=thread capture.capacity=9", r"capture.capacity=9 must exceed "
                                                     r"runner.max_lag=8 \+ 1 in thread mode"),
    ("runner.heldout_every=2 capture.capacity=12 runner.min_samples=8",
     r"runner.min_samples=8 exceeds the trainable samples the buffer can hold \(6"),
    ("runner.concurrency=thread capture.capacity=16",  # a window of 7: the SAE never trained
     r"runner.min_samples=8 exceeds the trainable samples the thread worker may draw for a push "
     r"\(7: capture.capacity=16 less \(runner.max_lag=8 \+ 1\)"),
    ("runner.concurrency=thread capture.capacity=19 runner.heldout_every=3",
     r"the thread worker may draw for a push \(7: .* minus one step in every 3, held out\)"),
    # a step's 16 events cannot fit in one push: refused before training (it was a traceback
    # after RL step 1), with the capacity that fits
    ("runner.concurrency=thread capture.granularity=completion capture.capacity=150",
     r"capture.granularity=completion gives up to 16 events per RL step, but "
     r"capture.capacity=150 can take at most 9 per step .* \(runner.concurrency=thread with "
     r"runner.max_lag=8\); raise capture.capacity to at least 207 or lower runner.max_lag$"),
    ("capture.granularity=completion capture.capacity=8",
     r"up to 16 events per RL step, but capture.capacity=8 can take at most 8 per step without "
     r"overwriting samples the SAE has not read; raise capture.capacity to at least 79$"),
    ("rl.num_generations=1 rl.per_device_train_batch_size=4", r"rl.num_generations=1 must be >= 2"),
    ("rl.algorithm=ppo", r"rl.algorithm='ppo' is not one of \['grpo', 'rloo'\]"),
    ("capture.targets=[]", r"capture.targets is empty"),
    ("capture.storage_dtype=bf16", r"capture.storage_dtype='bf16' is not one of \['float32', "
                                   r"'bfloat16'\]"),
    ("logging.mode=cloud", r"logging.mode='cloud' is not one of"),
    ("device=tpu", r"device='tpu'; use auto, cpu or cuda"),
    ("device=cudafoo", r"device='cudafoo'; use auto, cpu or cuda\[:index\]"),
    ("seed=-1", r"seed=-1 must be between 0 and 2\*\*32 - 1"),
    # audit 151 F1, F11: past NumPy's (and a torch generator's) range, refused only at the start
    ("seed=4294967296", r"seed=4294967296 must be between 0 and 2\*\*32 - 1 = 4294967295"),
    ("sae.seed=18446744073709551616", r"sae.seed=18446744073709551616 must be between -2\*\*63 "
                                      r"and 2\*\*64 - 1"),
    # audit 151 F10: every latent active on every sample is no sparse autoencoder
    ("sae.k=64", r"sae.k=64 equals sae.n_latents: every latent would be active on every sample"),
    # audit 151 F2: rotary embeddings pair a head's dimensions (a torch traceback at generation)
    ("model.hidden_size=12 model.num_heads=4 model.intermediate_size=16",
     r"model.hidden_size=12 / model.num_heads=4 gives heads of 3 dimensions; model.arch=qwen2 "
     r"rotates pairs of them"),
    # per-step samples: Adam's scaling has a per-step source, unit normalisation none
    ("capture.precondition=adam", r"capture.precondition=adam applies to per-event samples; set "
                                  r"capture.granularity=group .*use capture.source=precond"),
    ("capture.normalize=unit", r"capture.normalize=unit applies to per-event samples; .*per-step "
                               r"samples are not normalised one by one .*: drop it$"),
    ("runner.keep_checkpoints=1", r"runner.keep_checkpoints=1 must be 0 \(keep every one\) or "
                                  r">= 2"),
    ("task.name=nosuch", re.escape(f"task.name='nosuch' is not one of {list(TASK_NAMES)}")),
    ("+rl.extra.output_dir=/x", r"rl.extra.output_dir is set by sae-shards \(the run writes "
                                r"TRL's checkpoints to run_dir/trl\); remove it"),
    ("+rl.extra.seed=3", r"rl.extra.seed is set by sae-shards \(the top-level seed=N seeds TRL"),
    # audit 151 F8: a ZeroDivisionError, a TypeError and an AttributeError naming no field
    ("capture.granularity=group +rl.extra.num_iterations=0",
     r"rl.extra.num_iterations=0 must be an integer >= 1$"),
    ("capture.granularity=group +rl.extra.num_iterations='1'",
     r"rl.extra.num_iterations='1' must be an integer >= 1$"),
    ("capture.granularity=group +rl.extra.steps_per_generation=0",
     r"rl.extra.steps_per_generation=0 must be an integer >= 1 \(or null"),
    ("""capture.granularity=group +rl.extra.gradient_checkpointing=true """
     """+rl.extra.gradient_checkpointing_kwargs='{"use_reentrant":true}'""",
     r"capture.granularity=group does not support "
     r"rl.extra.gradient_checkpointing_kwargs.use_reentrant=true"),
    ("capture.granularity=group +rl.extra.gradient_checkpointing=true "
     "+rl.extra.gradient_checkpointing_kwargs={use_reentrant:true}",
     r"capture.granularity=group does not support "
     r"rl.extra.gradient_checkpointing_kwargs.use_reentrant=true"),
    ("capture.granularity=group +rl.extra.num_iterations=2",
     r"capture.granularity=group needs one generation per optimizer step .* "
     r"\{'num_iterations': 2\}"),
    ("model=tiny_lora model.lora.dropout=1.5", r"model.lora.dropout=1.5 must be in \[0, 1\)"),
    ("model=tiny_lora model.lora.alpha=-5", r"model.lora.alpha=-5.0 must be > 0"),
    ("model.lora.r=0", r"model.lora.r=0 must be an integer >= 1"),  # with LoRA off too
    ("model=tiny_lora model.arch=gpt2", r"model.lora.enabled=true with model.arch=gpt2: GPT-2's "
                                        r"matrices are Conv1D layers"),
    ("model=tiny_lora model.lora.dropout=0.1 capture.granularity=group",
     r"capture.granularity=group reads each event's exact gradient .* model.lora.dropout=0.1"),
    ("capture.granularity=group rl.max_steps=3 runner.min_samples=8",
     r"rl.max_steps=3 gives 6 trainable events at most \(2 per RL step"),
    ("runner.heldout_every=1", r"runner.heldout_every=1 must be 0 \(none\) or >= 2"),
    ("sae.lr=fast", r"sae.lr: expected float, got str 'fast'"),
    ("rl.trainable=[]", r"rl.trainable is empty"),
    ("capture.targets=lm_head.weight", r"capture.targets: expected a list, got 'lm_head.weight'; "
                                       r"a list of one is written \['lm_head.weight'\] \(on the "
                                       r"command line capture.targets=\[lm_head"),
    ("rl.trainable=['']", r"rl.trainable holds empty or non-string patterns"),
    ("model.readout_scale=0", r"model.readout_scale=0.0 must be > 0"),
    ("model=hf_path model.path=/m +model.readout_scale=4", r"model.readout_scale=4.0: these "
                                                          r"shape the built-in tiny model only"),
    ("model=hf_path model.path=/m +model.arch=llama +model.num_layers=12",
     r"model.arch=llama, model.num_layers=12: these shape the built-in tiny model only, and "
     r"model.path=/m is used as saved"),
    # set by the experiment, not the user: told how to drop it (model.readout_scale=1.0 was
    # refused too; audit 132 F2)
    ("experiment=planted model=hf_path model.path=/m", r"model.readout_scale=4.0: these shape "
     r"the built-in tiny model only, .* is dropped with '~model.readout_scale'\)$"),
    ("model.trust_remote_code=true", r"model.trust_remote_code=true runs the Python code of a "
                                     r"model.path directory, and the built-in tiny model"),
    ("model=hf_path model.path=/m model.trust_remote_code=yes",
     r"model.trust_remote_code: expected bool, got str 'yes'"),
    ("+rl.extra.trust_remote_code=true", r"rl.extra.trust_remote_code is set by sae-shards "
                                         r"\(model.trust_remote_code=true opts in"),
    ("+rl.extra.model_init_kwargs.trust_remote_code=true",
     r"rl.extra.model_init_kwargs.trust_remote_code is set by sae-shards \(model.trust_remote_"
     r"code=true opts in .*; remove it from rl.extra.model_init_kwargs"),
    ("+rl.extra.model_init_kwargs.trust_remote_code=false",  # would override the opt-in too
     r"rl.extra.model_init_kwargs.trust_remote_code is set by sae-shards"),
    ("""+rl.extra.model_init_kwargs='{"trust_remote_code":true}'""",  # a JSON string, as TRL takes
     r"rl.extra.model_init_kwargs.trust_remote_code is set by sae-shards"),
])
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        job_config_from_hydra(_compose(override.split()))


def test_cli_reports_config_error_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sae_shards.cli", "train", "sae.k=0", f"run_dir={tmp_path / 'r'}",
         "logging=disabled"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "sae-shards: config error: sae.k=0 must be between 1 and sae.n_latents=64" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()
    assert not (tmp_path / "r").exists()  # Hydra made it for a refused run: removed again


def test_a_refused_config_keeps_a_directory_that_was_there(tmp_path, capsys):
    """Only the directories Hydra created for the refused run are removed, never one that
    existed before (nor what it holds). In this process: the test above runs a real one."""
    from sae_shards.cli import main as cli_main

    run = tmp_path / "mine"
    run.mkdir()
    (run / "notes.txt").write_text("keep")
    assert cli_main(["train", "seed=-1", f"run_dir={run / 'sub'}"]) == 2
    assert "seed=-1 must be between 0 and 2**32 - 1" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


def test_planted_experiment_is_body_only_mixed_per_event():
    job = job_config_from_hydra(_compose(["experiment=planted"]))
    assert job.rl.trainable == ["model.layers.*"] and job.model.readout_scale > 1
    assert job.task.name == "multiskill" and job.task.options["schedule"] == "mixed"
    assert job.capture.granularity == "group" and job.capture.normalize == "unit"
    events_per_step = job.rl.prompts_per_step  # one event per prompt group
    window = job.capture.capacity // events_per_step
    assert window == job.rl.max_steps - 300 and job.runner.sae_start_step < job.rl.max_steps - window
    assert job.task.n_prompts // job.rl.prompts_per_step >= job.rl.max_steps  # never replayed


def test_planted_captures_draw_each_sample_about_as_often():
    """One run's captures hold the same window of RL steps; a per-step capture has 1 sample per
    step against the per-event capture's ``groups``, so it takes 1/groups of the SAE steps (at
    least one): ~the same draws per sample, not ``groups`` times as many."""
    from sae_shards.planted.benchmark import capture_config, sae_steps

    job = job_config_from_hydra(_compose(["experiment=planted"]))
    groups = job.rl.prompts_per_step
    assert groups == 8 and job.runner.sae_steps_per_rl_step == 6
    event, step = capture_config(job, "body", "event"), capture_config(job, "body", "grad")
    assert event.runner.sae_steps_per_rl_step == 6 and step.runner.sae_steps_per_rl_step == 1
    draws = [c.runner.sae_steps_per_rl_step * c.sae.batch_size / c.capture.capacity
             for c in (event, step)]  # per sample and RL step
    assert draws[1] / draws[0] == pytest.approx(8 / 6)
    with pytest.raises(ValueError, match="capture.granularity=completion: the planted benchmark"):
        capture_config(dataclasses.replace(job, capture=dataclasses.replace(
            job.capture, granularity="completion")), "body", "grad")
    assert (sae_steps(17, "group", "grad", 8), sae_steps(2, "step", "event", 8),
            sae_steps(2, "step", "update", 8), sae_steps(5, "group", "event", 8)) == (3, 16, 2, 5)


def test_an_unknown_config_group_option_names_the_choices(capsys):
    from sae_shards.cli import main

    assert main(["train", "task=nosuch", "run_dir=unused"]) == 2
    err = capsys.readouterr().err
    assert ("sae-shards: config error: task=nosuch is not one of the task configs: "
            f"{', '.join(sorted(TASK_NAMES))} (configs/task/)") in err
    assert main(["train", "experiment=nosuch", "run_dir=unused"]) == 2
    assert "experiment=nosuch is not one of the experiment configs: planted" in \
        capsys.readouterr().err


def test_usage_holds_the_generated_configuration_reference():
    """docs/usage.md's reference is exactly what the dataclasses say: every field, its default and
    its docstring (regenerate with ``python -m scripts.config_reference --write``)."""
    from scripts import config_reference

    reference = config_reference.render()
    text = config_reference.USAGE.read_text()
    assert config_reference.spliced(text, reference) == text, (
        "docs/usage.md's configuration reference is stale: run "
        "`python -m scripts.config_reference --write`")
    for f in dataclasses.fields(SAEConfig):  # the tables are not empty
        assert f"| `{f.name}` |" in reference
    assert "| `heldout_every` | `0` |" in reference
    assert "| `granularity` | `\"step\"` |" in reference


def test_an_undocumented_field_is_refused_by_the_reference():
    from scripts import config_reference

    @dataclasses.dataclass
    class Sample:
        documented: int = 1
        """Has one."""
        bare: int = 2

    assert config_reference.field_docs(Sample) == {"documented": "Has one."}

    @dataclasses.dataclass
    class Derived(Sample):  # a new built-in task subclassing Task: its inherited fields' docs
        bare: int = 3
        """Now has one."""
        more: int = 4
        """Its own."""

    assert config_reference.field_docs(Derived) == {
        "documented": "Has one.", "bare": "Now has one.", "more": "Its own."}
    sections = config_reference.SECTIONS
    try:
        config_reference.SECTIONS = (("sample", Sample, ()),)
        with pytest.raises(ValueError, match=r"Sample.bare has no docstring"):
            config_reference.render()
    finally:
        config_reference.SECTIONS = sections


def test_a_new_built_in_tasks_options_are_in_the_reference(monkeypatch):
    """Audit 137 F1: the reference listed the options of Task and MultiSkillTask by hand, so a
    task added to BUILT_IN_TASKS had its own options documented nowhere, and one without a
    docstring passed every test. The task sections now come from BUILT_IN_TASKS."""
    from scripts import config_reference

    from sae_shards.recipe import tasks

    @dataclasses.dataclass(frozen=True)
    class Digits(tasks.Task):
        min_digits: int = 1

    monkeypatch.setitem(tasks.BUILT_IN_TASKS, "digits", Digits)
    sections = config_reference._task_sections()
    assert [h for h, _, _ in sections][-1] == "`task.options.*` of `task=digits`"
    monkeypatch.setattr(config_reference, "SECTIONS", sections)
    with pytest.raises(ValueError, match=r"Digits.min_digits has no docstring"):
        config_reference.render()
    with pytest.raises(ValueError, match=r"task.name='digitz' is unknown; known tasks: \["
                                         r"'letters', 'multiskill', 'multiskill_null', 'digits'"):
        tasks.build_task("digitz")
    monkeypatch.setattr(tasks, "TASK_NAMES", (*tasks.TASK_NAMES, "words"))  # a half-done add
    with pytest.raises(ValueError, match=r"'words' is unknown \(run.config.TaskName names it, "
                                         r"but recipe.tasks.BUILT_IN_TASKS has no class"):
        tasks.build_task("words")


def test_a_sweeps_job_directories_ignore_every_setting_a_resume_may_change():
    """Hydra names a sweep's job directories by its overrides less ``exclude_keys``: a setting a
    resume may change (``rundir.RESUME_FREE``) that names a job would make a resumed sweep look
    for other directories than the ones its jobs wrote."""
    from omegaconf import OmegaConf

    from sae_shards.run.rundir import RESUME_FREE

    hydra = OmegaConf.load(f"{CONFIG_DIR}/config.yaml").hydra
    excluded = set(hydra.job.config.override_dirname.exclude_keys)
    settable = {k for k in RESUME_FREE  # not overrides (rl.output_dir: a script's trainer's):
                if k not in ("world_size", "launch", "distribution", "versions", "resumed_under",
                             "rl.output_dir", "run_id")}
    assert settable <= excluded, sorted(settable - excluded)


@pytest.mark.parametrize("build,message", [
    (lambda: LoraSettings(enabled=True, target_modules=[]), r"model.lora.target_modules is empty"),
    (lambda: ModelConfig(num_layers=0), r"model.num_layers=0 must be >= 1"),
    (lambda: ModelConfig(intermediate_size=0), r"model.intermediate_size=0 must be >= 1"),
    (lambda: ModelConfig(hidden_size=66, num_heads=4), r"must be divisible by model.num_heads"),
    (lambda: RLConfig(learning_rate=0.0), r"rl.learning_rate=0.0 must be positive"),
    (lambda: RLConfig(max_steps=0), r"rl.max_steps=0 must be >= 1"),
    (lambda: RLConfig(max_completion_length=0), r"rl.max_completion_length=0 must be >= 1"),
    (lambda: CaptureConfig(memory_fraction=1.5), r"capture.memory_fraction=1.5 must be in \(0, 1\]"),
    (lambda: CaptureConfig(event_rank=0), r"capture.event_rank=0 must be >= 1"),
    (lambda: CaptureConfig(granularity="group", source="grad"),
     r"capture.source=grad applies to capture.granularity=step"),
    (lambda: RunnerConfig(sae_budget=11.0), r"runner.sae_budget=11.0 must be in \[0, 10\]"),
    (lambda: RunnerConfig(checkpoint_every=-1), r"runner.checkpoint_every=-1 must be >= 0"),
    (lambda: RunnerConfig(recent_frac=1.5), r"runner.recent_frac=1.5 must be in \[0, 1\]"),
    (lambda: RunnerConfig(sae_start_step=-1), r"runner.sae_start_step=-1 must be >= 0"),
    (lambda: JobConfig(model=ModelConfig(lora=LoraSettings(enabled=True)),
                       rl=RLConfig(trainable=["model.layers.*"])),
     r"rl.trainable cannot be combined with model.lora.enabled=true"),
    (lambda: JobConfig(model=ModelConfig(lora=LoraSettings(enabled=True)),
                       capture=CaptureConfig(source="grad")),
     r"capture.source=grad needs dense targets and is not supported with model.lora"),
])
def test_each_config_range_check_refuses_its_bad_value(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize("build,message", [
    (lambda: CaptureConfig(source="grads"),
     r"capture.source='grads' is not one of \['update', 'grad', 'precond', 'deconv'\]"),
    (lambda: CaptureConfig(granularity="event"), r"capture.granularity='event' is not one of"),
    (lambda: RunnerConfig(concurrency="threads"), r"runner.concurrency='threads' is not one of"),
    (lambda: ModelConfig(arch="mistral"), r"model.arch='mistral' is not one of"),
    (lambda: LoggingConfig(mode="of"), r"logging.mode='of' is not one of"),
    (lambda: ModelConfig(lora=LoraSettings(alpha="16")),
     r"model.lora.alpha: expected float, got str '16'"),
    (lambda: CaptureConfig(capacity=2.5), r"capture.capacity: expected int, got float 2.5"),
    (lambda: RunnerConfig(recent_frac=float("inf")),
     r"runner.recent_frac=inf: expected a finite number"),
    (lambda: RLConfig(beta=float("nan")), r"rl.beta=nan: expected a finite number"),
    (lambda: JobConfig(seed=True), r"seed: expected int, got bool True"),
    (lambda: SAEConfig(k=2.5), r"sae.k=2.5 must be an integer"),
    (lambda: SAEConfig(aux_k=2.5), r"sae.aux_k=2.5 must be an integer"),
    (lambda: SAEConfig(seed="x"), r"sae.seed='x' must be an integer"),
    (lambda: SAEConfig(n_latents=True), r"sae.n_latents=True must be a positive integer"),
    (lambda: SAEConfig(lr=float("inf")), r"sae.lr=inf must be a finite number"),
    (lambda: SAEConfig(aux_coef=float("nan")), r"sae.aux_coef=nan must be a finite number"),
    (lambda: SAEConfig(autocast_bf16="no"), r"sae.autocast_bf16='no' must be true or false"),
    (lambda: SAEConfig(use_b_dec=0), r"sae.use_b_dec=0 must be true, false or null"),
])
def test_a_config_built_in_python_is_checked_as_one_built_from_a_dict(build, message):
    """Audit 148 F4.1, F4.2: a config dataclass built in Python (as a script passes
    ShardCallback(capture=CaptureConfig(...))) took any choice, type or non-finite number, which
    then failed later in some consumer's words, after the run directory was made."""
    with pytest.raises(ValueError, match=message):
        build()
    rl = RLConfig(learning_rate=1)  # an int for a float field is stored as the float
    assert type(rl.learning_rate) is float and rl == RLConfig(learning_rate=1.0)
    assert type(SAEConfig(lr=1).lr) is float  # in core too (audit 149 F3)
    # inf where it means no limit (audit 149 F4: the worker's timeout took it before)
    assert RunnerConfig(worker_timeout_s=float("inf")).worker_timeout_s == float("inf")
    cfg = job_config_from_hydra(_compose(["runner.worker_timeout_s=inf"]))
    assert cfg.runner.worker_timeout_s == float("inf")
    with pytest.raises(ValueError, match=r"runner.worker_timeout_s=nan: expected a finite"):
        RunnerConfig(worker_timeout_s=float("nan"))


def test_prompts_per_step_counts_gradient_accumulation():
    rl = RLConfig(per_device_train_batch_size=8, num_generations=4, gradient_accumulation_steps=3)
    assert rl.prompts_per_step == 6
    # a dataset of 5 prompts cannot fill one optimizer step of 6
    with pytest.raises(ValueError, match=r"task.n_prompts=5 is fewer than one optimizer step's "
                                         r"prompts \(6"):
        JobConfig.from_dict({"rl": {"per_device_train_batch_size": 8, "num_generations": 4,
                                    "gradient_accumulation_steps": 3},
                             "task": {"n_prompts": 5}})


def test_sae_must_start_before_the_last_rl_step_and_count_held_out_steps():
    capture = CaptureConfig()
    with pytest.raises(ValueError, match=r"runner.sae_start_step=10 is not before the last RL step"):
        check_sae_trains(capture, RunnerConfig(sae_start_step=10), 10)
    check_sae_trains(capture, RunnerConfig(sae_start_step=9), 10)  # the last step trains it
    # 10 steps, every 2nd held out: 5 trainable samples, fewer than 6
    with pytest.raises(ValueError, match=r"rl.max_steps=10 gives 5 trainable per-step samples"):
        check_sae_trains(capture, RunnerConfig(heldout_every=2, min_samples=6), 10)
    check_sae_trains(capture, RunnerConfig(heldout_every=2, min_samples=5), 10)
    # audit 151 F6: every 11th step of 10 holds out none (fvu_heldout null, without a word)
    with pytest.raises(ValueError, match=r"runner.heldout_every=11 holds out no step of a run of "
                                         r"rl.max_steps=10 .*lower it, or 0 for none"):
        check_sae_trains(capture, RunnerConfig(heldout_every=11, min_samples=2), 10)
    check_sae_trains(capture, RunnerConfig(heldout_every=10, min_samples=2), 10)  # step 10
    # deconv under a warmup from 0 loses steps 1 and 2; step 2 is also held out, counted once
    # (audit 144 F5): steps 3, 5, 7, 9 train
    deconv = CaptureConfig(source="deconv")
    lost = deconv_warmup_loss(2)
    check_sae_trains(deconv, RunnerConfig(heldout_every=2, min_samples=4), 10, lost=lost)
    with pytest.raises(ValueError, match=r"gives 4 trainable per-step samples .*cannot invert "
                                         r"the first 2 steps"):
        check_sae_trains(deconv, RunnerConfig(heldout_every=2, min_samples=5), 10, lost=lost)
    # sae-shards train reads the warmup from rl.extra (a script's, from its optimizer)
    with pytest.raises(ValueError, match=r"rl.max_steps=10 gives 8 trainable per-step samples "
                                         r"\(one per RL step; capture.source='deconv' cannot "
                                         r"invert the first 2 steps"):
        JobConfig(capture=deconv, runner=RunnerConfig(min_samples=9),
                  rl=RLConfig(max_steps=10, extra={"warmup_steps": 2}))
    JobConfig(capture=deconv, runner=RunnerConfig(min_samples=9), rl=RLConfig(max_steps=10))


@pytest.mark.parametrize("data,message", [
    ({"rl": {"max_steps": True}}, r"rl.max_steps: expected int, got bool True"),
    ({"rl": {"learning_rate": True}}, r"rl.learning_rate: expected float, got bool True"),
    ({"capture": {"targets": [3]}}, r"capture.targets\[0\]: expected str, got int 3"),
    ({"rl": {"trainable": ["model.layers.*", 1]}}, r"rl.trainable\[1\]: expected str, got int 1"),
])
def test_a_wrongly_typed_value_is_refused_with_its_dotted_name(data, message):
    with pytest.raises(ValueError, match=message):
        JobConfig.from_dict(data)


def test_the_way_to_drop_an_experiments_tiny_model_field_works():
    """The advice of the refusal above: '~model.readout_scale' drops experiment=planted's value,
    and the config is then refused only for what is really wrong (here a missing model.path)."""
    with pytest.raises(ConfigError, match="model path /m is not a directory"):
        job_config_from_hydra(_compose(["experiment=planted", "model=hf_path", "model.path=/m",
                                        "~model.readout_scale"]))
