"""The main job: the built-in RL recipe with a ``ShardCallback``; what ``sae-shards train`` runs.

``run_job(cfg, run_dir)`` is everything below Hydra: prepare the run directory, build the model
(the tiny built-in one, or ``model.path``), the task and the TRL trainer (``rl.algorithm``: GRPO
or RLOO), add one ``ShardCallback`` configured from the job's config, and train. The callback
does the capture, the SAE and every file of the run directory (``run/rundir.py``), exactly as it
does when a user adds it to their own TRL script. ``build_rl`` is shared with the planted
benchmark and the overhead benchmark, so the pipeline is wired in one place.

Surviving kills: TRL checkpoints at the steps the callback does (``runner.checkpoint_every``);
``resume=true`` continues from the newest step both completed (``capture/resume.py``). While it
trains, SIGTERM or SIGINT ends the run after the current step with a checkpoint of both sides
(``summary.json``: ``"interrupted": true``); a second signal stops at once.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import traceback
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import torch
from transformers.trainer_callback import ProgressCallback, TrainerCallback

from sae_shards.capture import distributed, initial_model
from sae_shards.capture import resume as resume_state
from sae_shards.capture.callback import ShardCallback
from sae_shards.capture.pipeline import resolve_targets
from sae_shards.capture.signals import stop_before_training, stop_on_signals
from sae_shards.capture.trl_checkpoints import rng_state_name
from sae_shards.core.checkpoint import CheckpointError
from sae_shards.recipe.models import (build_tiny_model, build_tokenizer, check_policy_dir,
                                      meta_policy)
from sae_shards.recipe.tasks import build_task, check_writable, default_target_length
from sae_shards.recipe.trainers import (ALL_LINEAR, build_trainer, check_lora_modules,
                                        check_precision, check_reward_scale, check_trl_config,
                                        check_trl_settings, freeze_except, lora_modules)
from sae_shards.run import rundir
from sae_shards.run.config import TINY_ONLY, JobConfig
from sae_shards.run.tracking import RunLogger

log = logging.getLogger(__name__)


class JobSetupError(RuntimeError):
    """The job could not start (bad model path, targets matching nothing, buffer too large...).

    Raised before any training; the message says what is wrong and how to fix it."""


SETUP_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotImplementedError)


class RefusedOnRankZero(JobSetupError, distributed.StoppedWithAnotherRank):
    """Raised on the other ranks of a launch when rank 0 refused the job while preparing it
    (``_main_process_first``): they stop with rank 0's reason instead of a lost connection;
    rank 0 reports it."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available here; use device=cpu")
    return device


def _peft_config(cfg: JobConfig):
    if not cfg.model.lora.enabled:
        return None
    from peft import LoraConfig

    lc = cfg.model.lora
    modules = ALL_LINEAR if list(lc.target_modules) == [ALL_LINEAR] else list(lc.target_modules)
    return LoraConfig(r=lc.r, lora_alpha=lc.alpha, target_modules=modules,
                      lora_dropout=lc.dropout, use_rslora=lc.rslora, task_type="CAUSAL_LM")


class _PastEnd(Exception):
    """Raised by ``_NoStepPastEnd``: a run resumed at ``max_steps`` has nothing left to train."""


class _NoStepPastEnd(TrainerCallback):
    """Stop transformers' loop before an optimizer step beyond ``max_steps``: resumed from the
    checkpoint of its last step, the loop would run one more before it checks (the run's end is
    written at ``on_train_begin``: ``ShardCallback._end_at_resume``)."""

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            raise _PastEnd


class RLSetup(NamedTuple):
    trainer: Any  # trl.GRPOTrainer | trl.RLOOTrainer
    model_path: Path
    task: Any  # the built-in task, with its resolved target_length


def prepare_model(cfg: JobConfig, run_dir: Path) -> Path:
    """The policy's directory: ``model.path``, or the built-in tiny model, which rank 0 builds
    into the run directory (the other ranks load it once rank 0 is done: ``_main_process_first``)."""
    m = cfg.model
    if m.path:
        return Path(m.path)
    if not distributed.is_main():
        return run_dir / rundir.MODEL
    with rundir.writing(run_dir / rundir.MODEL):  # a full disk: named, not save_pretrained's
        return build_tiny_model(run_dir / rundir.MODEL, m.arch, m.hidden_size, m.num_layers,
                                m.num_heads, m.intermediate_size, seed=cfg.seed,
                                readout_scale=m.readout_scale,
                                # a new run's model/ is a failed start's (an earlier run's was
                                # refused, or removed by overwrite=true): rebuilt, not refused
                                rebuild=not cfg.resume)


def check_recipe(cfg: JobConfig) -> None:
    """The settings ``build_rl`` passes on unchecked by ``JobConfig``: ``model.path`` as a
    policy directory (``check_policy_dir``), ``task.options`` against
    the task's options and ``rl.extra`` against TRL's config class (``ValueError`` naming the
    key). Cheap: ``sae-shards train`` calls it on each job's config before anything is
    written; ``start`` again for a job run from Python."""
    # no causal LM, a truncated weight file, no usable tokenizer
    tokenizer = (_check_policy_dir(Path(cfg.model.path), cfg.model.trust_remote_code)
                 if cfg.model.path else build_tokenizer())
    task = build_task(cfg.task.name, **cfg.task.options)  # its options checked (cheap)
    check_writable(task, tokenizer)  # a rewarded character the policy cannot write
    check_trl_settings({**cfg.rl.trl_kwargs(), "seed": cfg.seed}, cfg.rl.algorithm,
                       new_run=not cfg.resume)
    check_precision({**cfg.rl.trl_kwargs(), "use_cpu": resolve_device(cfg.device).type == "cpu"})
    if not cfg.resume:  # TRL's own checks of the values, on the config it would build
        check_trl_config({**cfg.rl.trl_kwargs(), "seed": cfg.seed,
                          "use_cpu": resolve_device(cfg.device).type == "cpu"},
                         Path(cfg.run_dir) / rundir.TRL_OUTPUT, cfg.rl.algorithm,
                         cfg.runner.checkpoint_every)
    if getattr(task, "scaled", False):
        check_reward_scale(cfg.rl.trl_kwargs(), cfg.rl.algorithm)
    check_targets(cfg)


_CHECKED_DIRS: dict[tuple, Any] = {}
"""Policy directories ``check_policy_dir`` passed, by their files' sizes and times, with
their tokenizers (a sweep checks each job's config: once per directory, again once a file
changes)."""


def _check_policy_dir(path: Path, trust_remote_code: bool) -> Any:
    try:
        files = tuple(sorted((f.name, st.st_size, st.st_mtime_ns)
                             for f in path.iterdir() for st in [f.stat()]))
    except OSError:  # not a directory, or unreadable: check_policy_dir says which
        return check_policy_dir(path, trust_remote_code)
    key = (str(path.resolve()), trust_remote_code, files)
    if key not in _CHECKED_DIRS:
        _CHECKED_DIRS[key] = check_policy_dir(path, trust_remote_code)
    return _CHECKED_DIRS[key]


def check_targets(cfg: JobConfig) -> None:
    """``rl.trainable`` and ``capture.targets`` against the policy's parameter names, before
    any model is loaded: on the meta device, from the model's config alone
    (``models.meta_policy``; with LoRA wrapped in the job's adapter, as TRL wraps it), so a
    pattern that matches nothing, a target RL does not train (frozen by ``rl.trainable``, or
    not adapted by LoRA) or a stacked expert tensor per event is refused as a config error
    (``ValueError``) at once, not after a large model has loaded. The same checks run again on
    the loaded model and stay the authority. Skipped where the config alone builds no model
    (or peft refuses the adapter: ``check_lora_modules`` says why, later). One build per
    distinct model and adapter (a sweep over other settings checks each job on it)."""
    model = _meta_model(cfg)
    if model is None:
        return
    if not cfg.model.lora.enabled:  # (with LoRA, peft has frozen all but the adapters)
        for param in model.parameters():  # the previous job's rl.trainable undone
            param.requires_grad_(True)
        freeze_except(model, cfg.rl.trainable)
    resolve_targets(model, cfg.capture.targets, cfg.capture.granularity, warn=False)


_META_MODEL: dict[tuple, torch.nn.Module | None] = {}
"""``check_targets``' last meta policy, by model and adapter."""


def _meta_model(cfg: JobConfig) -> torch.nn.Module | None:
    m = cfg.model
    peft_config = _peft_config(cfg)
    source = ((str(Path(m.path).resolve()),) if m.path else
              (None, m.arch, m.hidden_size, m.num_layers, m.num_heads, m.intermediate_size))
    key = (source, m.trust_remote_code, repr(peft_config))
    if key not in _META_MODEL:
        _META_MODEL.clear()
        model = meta_policy(*source, trust_remote_code=m.trust_remote_code)
        if model is not None and peft_config is not None:
            from peft import get_peft_model

            check_lora_modules(model, lora_modules(peft_config), warn=False)
            try:
                with torch.device("meta"):
                    model = get_peft_model(model, peft_config)
            except Exception as e:  # peft refuses what check_lora_modules let through:
                log.debug("no meta LoRA policy: %s", e)  # said when the trainer is built
                model = None
        _META_MODEL[key] = model
    return _META_MODEL[key]


def build_rl(cfg: JobConfig, run_dir: Path, device: torch.device,
             model_path: Path | None = None) -> RLSetup:
    """The model (``model_path``, or ``prepare_model``), the task and the TRL trainer, with no
    sae-shards callbacks and TRL's per-step progress printing replaced by the callback's one-line
    report. Under several processes every rank calls it at once: building the trainer may be
    collective (DeepSpeed ZeRO-3 partitions the model as it loads)."""
    model_path = prepare_model(cfg, run_dir) if model_path is None else model_path
    trust = cfg.model.trust_remote_code  # the user's own override: a resume must give it again
    tokenizer = check_policy_dir(model_path, trust)  # a fresh tokenizer: the trainer's own
    # The rewards divide by target_length: tie it to the completion budget, in characters.
    target_length = default_target_length(cfg.rl.max_completion_length, tokenizer)
    task = build_task(cfg.task.name, **{"target_length": target_length, **cfg.task.options})
    trl_kwargs = {**cfg.rl.trl_kwargs(), "seed": cfg.seed}
    if device.type == "cpu":
        trl_kwargs.update(use_cpu=True)
    if task.scheduled:  # the dataset lists the optimizer steps' prompts in order
        dataset = task.step_dataset(cfg.task.n_prompts, cfg.rl.prompts_per_step, cfg.seed)
    else:
        dataset = task.dataset(cfg.task.n_prompts, cfg.seed)
    trainer = build_trainer(model_path, tokenizer, task, dataset, trl_kwargs, callbacks=[],
                            output_dir=run_dir / rundir.TRL_OUTPUT, peft_config=_peft_config(cfg),
                            algorithm=cfg.rl.algorithm,
                            checkpoint_every=cfg.runner.checkpoint_every,
                            trainable=cfg.rl.trainable, trust_remote_code=trust)
    trainer.remove_callback(ProgressCallback)
    return RLSetup(trainer, model_path, task)


def run_config(cfg: JobConfig, target_length: int | None = None,
               built: Path | None = None) -> dict[str, Any]:
    """The whole job config as ``config.json`` records it (model path resolved so analysis
    finds the initial weights; ``target_length``: the task's, as ``build_rl`` resolved it, so
    analysis rebuilds the task the run trained on; ``built``: the tiny model's directory in the
    run, fingerprinted as a ``model.path`` is, so that a directory given to analysis in its
    place, ``--initial-model``, is checked against it)."""
    model_path = str(Path(cfg.model.path).resolve()) if cfg.model.path else None
    out = cfg.to_dict()
    out["model"] = {**out["model"], "path": model_path}
    if model_path:  # the tiny model's shape does not describe a saved one (left out)
        out["model"] = {k: v for k, v in out["model"].items() if k not in TINY_ONLY}
    if model_path and Path(model_path).is_dir():  # theta_0 outside the run: know it again later
        out["model"]["fingerprint"] = initial_model.fingerprint(model_path)
    elif built is not None and built.is_dir():
        out["model"]["fingerprint"] = initial_model.fingerprint(built)
    if target_length is not None:
        out["task"] = {**out["task"], "target_length": int(target_length)}
    return out


def check_same_settings(cfg: JobConfig, run_dir: Path, how: str) -> None:
    """``rundir.check_resume_config`` for a job continuing the run in ``run_dir`` (a resume, or a
    sweep's resume deciding whether a finished job is this one): its settings must be the run's,
    except a ``model.path`` that holds the run's initial weights at a new place (the model
    moved with the run: ``initial_model.moved_to``), which ``config.json`` then records. The
    tiny model a run built (``model/``, kept by a resume) must still hold the weights the run
    fingerprinted."""
    now = run_config(cfg, built=None if cfg.model.path else run_dir / rundir.MODEL)
    recorded = rundir.section(rundir.read_config(run_dir), "model")
    if now["model"].get("path") and initial_model.moved_to(recorded, now["model"]["path"]):
        now["model"] = {**now["model"], "path": recorded["path"]}
    rundir.check_resume_config(run_dir, now, how)


def shard_callback(cfg: JobConfig, run_dir: Path, target_length: int | None = None,
                   **overrides: Any) -> ShardCallback:
    """The job's ``ShardCallback``: its capture, SAE and runner settings, and the whole config
    for ``config.json`` (``target_length``: see ``run_config``)."""
    kwargs = dict(capture=cfg.capture, runner=cfg.runner, sae=cfg.sae, seed=cfg.seed,
                  resume=cfg.resume, run_config=run_config(
                      cfg, target_length, None if cfg.model.path else run_dir / rundir.MODEL))
    return ShardCallback(run_dir, **{**kwargs, **overrides})


class Started(NamedTuple):
    rl: RLSetup
    callback: ShardCallback
    resume_from: Path | None
    """TRL's checkpoint to resume from (``resume=true``), else None."""


def _check_inputs_outside(cfg: JobConfig, run_dir: Path) -> None:
    """Refuse ``overwrite=true`` when ``model.path``, which the run reads, lies inside
    ``run_dir``, which the overwrite empties first: the policy would be deleted before it was
    loaded (audit 151 F9: an earlier run's ``final_model/`` given as the next run's start)."""
    if not cfg.model.path:
        return
    model, run = Path(cfg.model.path).resolve(), Path(run_dir).resolve()
    if model == run or run in model.parents:
        raise ValueError(
            f"model.path={cfg.model.path} lies inside run_dir={run_dir}, which overwrite=true "
            "empties before the model is loaded: copy the model out of the run first (cp -r "
            f"{cfg.model.path} somewhere/else) and give model.path that copy, or give the new "
            "run another run_dir")


def start(cfg: JobConfig, run_dir: Path, hydra_files: dict[str, str] | None = None) -> Started:
    """Prepare the run directory (then write ``hydra_files`` into ``.hydra/``, unless a resume
    finds the run's own there), build RL and the callback, and resolve its targets: every
    user-fixable problem surfaces here as ``JobSetupError``, before anything is trained."""
    main = distributed.is_main()
    held = False  # this job's hold of the run directory's lock (released by run_job)
    callback = None
    try:
        check_recipe(cfg)
        device = resolve_device(cfg.device)
        if cfg.overwrite:
            _check_inputs_outside(cfg, run_dir)
        with _main_process_first(device, run_dir):
            if main:
                rundir.prepare_run_dir(run_dir, cfg.overwrite, cfg.resume)
                held = True
            resume_from = None
            if cfg.resume:  # before anything is built: a changed seed or model would fail there
                resume_from = _resume_point(cfg, run_dir, main)
            # a resume keeps the run's own .hydra/, the settings it started with: those given
            # again match them (_resume_point), and device, logging.* and the like that it may
            # change (rundir.RESUME_FREE) apply to this attempt, not to the run's later ones
            own = cfg.resume and (run_dir / rundir.HYDRA / "overrides.yaml").is_file()
            for name, text in (hydra_files or {}).items() if main and not own else ():
                with rundir.writing(run_dir / rundir.HYDRA / name):
                    (run_dir / rundir.HYDRA).mkdir(exist_ok=True)
                    (run_dir / rundir.HYDRA / name).write_text(text)
            torch.manual_seed(cfg.seed)
            model_path = prepare_model(cfg, run_dir)  # rank 0 builds the tiny model first
        rl = build_rl(cfg, run_dir, device, model_path)  # all ranks together
        if cfg.resume:
            _check_same_distribution(run_dir, rl.trainer, main)
        callback = shard_callback(cfg, run_dir, rl.task.target_length, logger=RunLogger())
        if main:  # the buffer and the SAE live on rank 0 (other ranks set up in train())
            callback.setup(rl.trainer.model, rl.trainer)
            # the W&B run once nothing can refuse the job (no failed run left for a refusal)
            # its config is config.json's: the task and trainer settings as the run resolved
            # them (the task's target_length, the run's step count), versions and launch
            callback.logger = RunLogger.start(cfg.logging, run_dir, rundir.read_config(run_dir))
    except BaseException as e:
        if callback is not None:  # its own hold, and its SAE worker
            callback.close()
        if held:  # nothing trains: leave the run directory free (rundir.lock_run_dir)
            rundir.release_run_dir(run_dir)
        if isinstance(e, SETUP_ERRORS):  # user-fixable: reported without a traceback by the CLI
            raise JobSetupError(str(e)) from e
        raise
    rl.trainer.add_callback(callback)
    if resume_from is not None:
        rl.trainer.add_callback(_NoStepPastEnd())
    return Started(rl, callback, resume_from)


def _check_same_distribution(run_dir: Path, trainer: Any, main: bool) -> None:
    """A resume under another distribution than the run's (``config.json``'s ``distribution``)
    is refused on every rank before TRL loads its checkpoint: the other ranks would otherwise
    fail inside that load, each saying so. Rank 0 says why (``ValueError``); the others stop
    with ``RefusedOnRankZero``, which is not said again."""
    why = distributed.distribution_mismatch(
        run_dir, rundir.read_config(run_dir),
        distributed.distribution(trainer, distributed.world_size()))
    if why:
        raise ValueError(why) if main else RefusedOnRankZero(why)


def _resume_point(cfg: JobConfig, run_dir: Path, main: bool) -> Path:
    """TRL's checkpoint a resume continues from, once the run in ``run_dir`` passed every check
    a resume makes before anything is written: its settings are the run's (on rank 0:
    ``check_same_settings``), it has a complete checkpoint (a copy missing one of the three
    parts is told which it holds, not to start again), and its step logs hold what that
    checkpoint recorded of them (``resume.check_step_logs``)."""
    if main:
        saved = run_dir / rundir.HYDRA / "overrides.yaml"
        if not saved.is_file() and _made_by_a_script(run_dir):
            raise ValueError(
                f"resume=true but run_dir={run_dir} was written by a script's ShardCallback, "
                "not by sae-shards train (its config.json records no task and the run has no "
                f"{rundir.HYDRA}/): resume it from that script, with "
                f"ShardCallback(run_dir='{run_dir}', resume=True) and "
                "trainer.train(resume_from_checkpoint=True)")
        check_same_settings(
            cfg, run_dir,
            f"Resume with the settings it started with (sae-shards train run_dir={run_dir} "
            f"resume=true reuses the run's own overrides, {rundir.HYDRA}/overrides.yaml), or "
            "start a new run_dir." if saved.is_file() else
            f"This copy of the run has no {rundir.HYDRA}/overrides.yaml, from which a resume "
            "takes the run's own overrides: copy that folder from the run, or give the "
            f"settings {rundir.CONFIG} records on the command line.")
    step = resume_state.latest_complete(run_dir)
    partial = resume_state.partial_checkpoints(run_dir) if step is None else None
    if partial:  # a copy without some part: overwrite=true would delete the rest
        raise FileNotFoundError(
            f"resume=true but run_dir={run_dir} has no step with all three parts of a "
            f"checkpoint ({rundir.RESUME}/step_N.safetensors, {rundir.CHECKPOINTS}/step_N, "
            f"{rundir.TRL_OUTPUT}/checkpoint-N); it holds {partial}. A copy that left a part "
            "out: copy it from the run; a run killed while it wrote its first checkpoint: "
            "start it anew with overwrite=true (which deletes what the directory holds)")
    if step is None:
        raise FileNotFoundError(
            f"resume=true but run_dir={run_dir} has no complete checkpoint (it was killed "
            "before its first runner.checkpoint_every steps); start it anew with "
            "overwrite=true")
    resume_state.check_step_logs(run_dir, step)  # a copy's logs hold every step
    return run_dir / rundir.TRL_OUTPUT / f"checkpoint-{step}"


def _made_by_a_script(run_dir: Path) -> bool:
    """Whether ``run_dir``'s ``config.json`` is a ``ShardCallback``'s (task None, none of the
    job's own fields such as ``device``) rather than ``sae-shards train``'s; False when it
    cannot be read (``check_same_settings`` names that)."""
    config = rundir.read_config(run_dir)  # {} when missing or unreadable
    return "task" in config and config["task"] is None and "device" not in config


@contextlib.contextmanager
def _main_process_first(device: torch.device, run_dir: Path) -> Iterator[None]:
    """Under a multi-process launch (``accelerate launch``), rank 0 runs the block first (it
    prepares the run directory and builds the model) and the other ranks after it, once rank 0
    has told them (a broadcast) whether it got through: when it raised, they raise
    ``RefusedOnRankZero`` with its message instead of running the block. Before that, every
    rank must have been given one ``run_dir`` (``run_dir=runs/r_${oc.env:RANK}`` is refused
    on every rank: rank 1 failed on a model path of its own directory, audit 135 F8). One
    process: just the block."""
    if distributed.world_size() == 1:
        yield
        return
    import torch.distributed as dist
    from accelerate import PartialState

    # The state TRL's config creates next is this one (a singleton): on a CPU, gloo processes.
    state = PartialState(cpu=device.type == "cpu")
    distributed.check_same_run_dir(run_dir)
    if not state.is_main_process:
        verdict: list[str | None] = [None]
        dist.broadcast_object_list(verdict, src=0)  # between the run's own processes only
        if verdict[0] is not None:
            raise RefusedOnRankZero(verdict[0])
        yield
        return
    try:
        yield
    except BaseException as e:
        refused = isinstance(e, (*SETUP_ERRORS, JobSetupError))  # said in the user's terms
        dist.broadcast_object_list([str(e) if refused else
                                    f"rank 0 failed: {type(e).__name__}: {e}"], src=0)
        distributed.told_every_rank(e)
        raise
    dist.broadcast_object_list([None], src=0)


def run_job(cfg: JobConfig, run_dir: Path,
            hydra_files: dict[str, str] | None = None) -> dict[str, Any]:
    """Run the whole job into ``run_dir``; returns the summary (also written to summary.json).

    Sets torch's thread count (``runner.torch_threads``): the job is an entry point."""
    torch.set_num_threads(cfg.runner.torch_threads)
    with stop_before_training():  # a real model may take minutes to load
        rl, callback, resume_from = start(cfg, Path(run_dir), hydra_files)
    try:
        with stop_on_signals(callback):
            rl.trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except _PastEnd:  # resumed at max_steps: the callback wrote the end, nothing to train
        pass
    except Exception as e:  # a full disk in TRL's checkpoint: named, not torch's traceback
        if _refused_as_training_began(e):  # the capture's own checks: said as setup's are
            raise JobSetupError(str(e)) from e
        if resume_from is not None and _loading_trl_checkpoint(e):
            raise CheckpointError(
                f"{resume_from}: TRL could not load this checkpoint{_which_file(e, rl.trainer)} "
                f"({_load_failure(e)}); "
                + (_other_format(resume_from, rl.trainer, Path(run_dir)) or
                   "a file of it is damaged (a copy's?): copy it again from the run, or delete "
                   "this checkpoint to resume from the one before it, where the run kept one")
            ) from e
        if isinstance(e, rundir.RunWriteError) or not rundir.write_failure(e):
            raise
        raise rundir.write_error(_failed_write(e, Path(run_dir), rl.trainer), e) from e
    finally:
        callback.close()
        rundir.release_run_dir(Path(run_dir))  # the hold start() took (a no-op on other ranks)
    return callback.summary


def _load_failure(e: BaseException) -> str:
    """Why a file of a TRL checkpoint did not load, for the resume's message: torch's refusal
    of a pickle under ``weights_only=True`` said in a line, not its advice to load it with
    ``weights_only=False`` (which would run whatever the pickle holds)."""
    if isinstance(e, pickle.UnpicklingError):
        return (f"{type(e).__name__}: not a file torch reads as plain tensors, damaged or "
                "holding other objects; transformers reads it with torch's weights_only=True "
                "only, so nothing in it ran, and it should not be loaded otherwise")
    return f"{type(e).__name__}: {e}"


TRL_LOADERS = ("_load_from_checkpoint", "_load_optimizer_and_scheduler", "_load_rng_state",
               "_load_scaler")
"""transformers' ``Trainer`` methods that read a checkpoint when ``train()`` resumes from one."""


def _refused_as_training_began(e: BaseException) -> bool:
    """Whether ``e`` is a user-fixable refusal from a callback's ``on_train_begin`` (the
    capture's checks that need the trainer's optimizer or model, such as the optimizer
    ``capture.source=precond`` needs), before any step; a resume's ``CheckpointError`` is its
    own kind ("cannot resume")."""
    return (isinstance(e, SETUP_ERRORS) and not isinstance(e, CheckpointError)
            and _raised_in(e, ("on_train_begin",)))


def _loading_trl_checkpoint(e: BaseException) -> bool:
    """Whether ``e`` came from transformers reading the checkpoint ``train()`` resumes from
    (a truncated ``model.safetensors``: safetensors' error, which names no file)."""
    return _raised_in(e, TRL_LOADERS)


def _raised_in(e: BaseException, functions: tuple[str, ...]) -> bool:
    """Whether one of ``functions`` (by name) is on ``e``'s traceback."""
    return any(frame.name in functions for frame in traceback.extract_tb(e.__traceback__))


def _which_file(e: BaseException, trainer: Any) -> str:
    """The file of TRL's checkpoint that ``e`` came from, where the error names none and the
    reader says which (the random state: one file per process, which may be another
    process's than rank 0's)."""
    if _raised_in(e, ("_load_rng_state",)):
        return f"'s {rng_state_name(trainer.args)} (the random state of this process)"
    return ""


def _other_format(checkpoint: Path, trainer: Any, run_dir: Path) -> str | None:
    """Why TRL's ``checkpoint`` is in another format than ``trainer`` reads, when it is:
    DeepSpeed keeps the weights and the optimizer in ``global_step<N>/``, other trainers beside
    it. Only for a run whose ``config.json`` records no ``distribution`` (an earlier version's),
    told here instead of that its checkpoint is damaged: a run that records one was checked
    before training, so its checkpoint is in the format read, and a failure is damage (a
    DeepSpeed checkpoint copied without its ``global_step<N>/``)."""
    config = rundir.read_config(run_dir)
    if isinstance(config.get("distribution"), str):
        return None
    deepspeed_format = any(checkpoint.glob("global_step*"))
    if deepspeed_format == bool(getattr(trainer, "is_deepspeed_enabled", False)):
        return None
    launch = config.get("launch") or "one process"
    written = ("under DeepSpeed (its global_step*/ holds the weights and the optimizer), and "
               "this launch is not DeepSpeed's" if deepspeed_format else
               "without DeepSpeed (it has no global_step*/), and this launch is DeepSpeed's")
    return (f"it was written {written}; nothing of it is damaged: resume it with the launch "
            f"the run started with ({launch})")


def _failed_write(e: BaseException, run_dir: Path, trainer: Any) -> Path:
    """Where a write failed during ``trainer.train()`` (``rundir.write_failure``): the file the
    ``OSError`` names, else TRL's checkpoint of the current step when the failure came from
    transformers' ``_save_checkpoint`` (torch and safetensors name no file), else the run
    directory."""
    if isinstance(e, OSError) and e.filename:
        return Path(e.filename)
    cause = e.__cause__ or e.__context__
    if isinstance(cause, OSError) and cause.filename:
        return Path(cause.filename)
    if _raised_in(e, ("_save_checkpoint",)):
        return Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}"
    return run_dir
