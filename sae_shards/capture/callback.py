"""``ShardCallback``: sae-shards in any TRL script, in one line, writing a full run directory.

::

    trainer = GRPOTrainer(model=..., reward_funcs=..., args=..., train_dataset=...)
    trainer.add_callback(ShardCallback(run_dir="runs/x"))
    trainer.train()

At ``on_train_begin`` the callback resolves its targets against the trainer's model (default:
every block's attention and MLP matrices, by module type), allocates the ring buffer on the
model's device (memory checked first), and builds the SAE and its runner. Each optimizer step
``DeltaCapture`` writes one sample into the buffer (per-event capture: ``EventCapture``, one
sample per prompt group or completion); the step's rollouts are read from TRL's
completion log into ``rollouts.jsonl`` and the sample's metadata; the runner trains the SAE
(inline or in a thread) and checkpoints it. At ``on_train_end`` it writes the final shards,
activations, summary and (by default) the final policy, so ``sae-shards analyze`` and
``RunView`` read the directory exactly as they read one from ``sae-shards train``, which is a
thin recipe over this callback. See ``run/rundir.py`` for the files.

Checkpoints: whenever the trainer saves its own checkpoint (``control.should_save`` at the
step's end, or TRL's ``on_save`` when it decided after the step, as ``save_strategy="epoch"``
does), the callback waits for the SAE worker, takes a snapshot of the SAE side and writes it as
a resumable checkpoint (``capture/resume.py``) on a background thread while RL goes on
(``capture/background.py``); the next step waits for that write before it touches the ring
buffer. At the other steps of ``runner.checkpoint_every`` it writes the shards only: no TRL
checkpoint could resume from them. ``ShardCallback(..., resume=True)``
with ``trainer.train(resume_from_checkpoint=...)`` continues a killed run from the step TRL
resumes at. ``request_stop()`` (``sae-shards train`` calls it on SIGTERM/SIGINT) ends the run
after the current step with a checkpoint of both sides; ``summary.json`` then says
``"interrupted": true``.

It sets no torch thread counts or seeds (the script's entry point does). Under DDP (``accelerate
launch``) the run directory, the buffer and the SAE belong to the main process (rank 0), which
holds the same parameters as every rank; with per-event capture the other ranks record their own
rows' events and send them to rank 0 each step (``capture/distributed.py``, docs/scaling.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence

import torch
from transformers import TrainerCallback

from sae_shards.capture import distributed, initial_model
from sae_shards.capture.signals import SignalGuard
from sae_shards.capture.step_rules import deconv_leading_loss
from sae_shards.capture import resume as resume_state
from sae_shards.capture.runner import STOP_GRACE_S
from sae_shards.capture.background import BackgroundWriter
from sae_shards.capture.buffer import StepMeta
from sae_shards.capture.callback_args import (build_config, check_argument_types,
                                              check_learning_rate, check_meta, check_output_dir,
                                              check_same_output, check_same_world, given_fields,
                                              oversized_rank_text, with_shortcuts)
from sae_shards.capture.callback_hooks import (paid, quiet_on_other_ranks, script_worded,
                                               stop_words)
from sae_shards.capture.delta import DeltaCapture
from sae_shards.capture.event_capture import EventCapture
from sae_shards.capture.gathered_policy import gathered_state_dict
from sae_shards.capture.policy_memory import pending_policy_memory
from sae_shards.capture.pipeline import Pipeline, build_pipeline, resolve_targets
from sae_shards.capture.rollouts import TRLRollouts, calling_trainer, scored_mean
from sae_shards.capture.summary import clip_figures, final_activations, heldout_fvu, run_summary
from sae_shards.capture.selection import LoraTarget, few_names, target_shapes
from sae_shards.capture.sharded_delta import ShardedDeltaCapture, sharded_targets
from sae_shards.capture.trainer_settings import (SAMPLING_ARGS, TIED_METRIC,
                                                 TiedRewardsWatch, dataset_record,
                                                 lora_settings, model_id, reward_batch,
                                                 reward_names, reward_weights, rows_changed,
                                                 step_settings,
                                                 trained_steps, trainer_samples_per_step,
                                                 without_digest)
from sae_shards.capture.trl_checkpoints import (SCRIPT_RESUME,
                                                in_script_terms,
                                                missing_rng_state, resumed_checkpoint,
                                                trl_checkpoint_steps, trl_dir,
                                                warn_earlier_trl_checkpoints,
                                                warn_later_trl_checkpoints, warn_reshuffled_epochs,
                                                warn_model_only_checkpoints,
                                                warn_no_trl_checkpoints, writes_checkpoints)
from sae_shards.capture.zero3_delta import Zero3DeltaCapture, zero3_targets
from sae_shards.core import events as ev
from sae_shards.core.checkpoint import CheckpointError, save_checkpoint
from sae_shards.core.sae_config import SAEConfig
from sae_shards.core.targets import make_targets, oversized_ranks
from sae_shards.run import rundir, versions
from sae_shards.run.config import (MAX_SEED, CaptureConfig, RunnerConfig, check_sae_trains,
                                    check_sae_window, check_sparse, check_steps_or_budget,
                                    sample_form, sample_source)
from sae_shards.run.tracking import RunLogger

log = logging.getLogger(__name__)


class ShardCallback(TrainerCallback):
    """Capture parameter updates of a TRL run and train a low-rank SAE on them concurrently.

    Every argument but ``run_dir`` is optional (a str or Path; a leading ``~`` is the home
    directory, as ``TrainingArguments`` takes ``output_dir``). The shortcuts (``targets``,
    ``source``, ``capacity``, ``sae_steps_per_rl_step``, ``concurrency``,
    ``checkpoint_every``) set the field of the same name in ``capture`` / ``runner``
    (``run.config.CaptureConfig`` / ``RunnerConfig``, each documented there); ``sae`` is an
    ``SAEConfig`` or a dict of its fields. Bad values raise ``ValueError`` here, before training.

    ``log_to_wandb``: add the SAE's figures and the shards artifact to the W&B run the trainer
    logs to (``report_to="wandb"``), if there is one. ``label_column``: the column of TRL's
    completion log (added by reward functions with ``log_extra``) holding each completion's
    context label, e.g. its task; used for ``rollouts.jsonl`` and the samples' metadata.
    ``record_rollouts``: read the trainer's completion log into ``rollouts.jsonl`` (False for a
    trainer that keeps none: samples then carry no reward or labels).
    ``save_model``: save the final policy (and tokenizer) to ``run_dir/final_model``, and the
    initial one to ``run_dir/model`` when it was not loaded from a local directory, for the
    report's interventions. ``seed``: the seed of the SAE's batch sampling (compared on resume;
    the SAE's initialisation takes ``sae={"seed": ...}``). ``overwrite``: replace an earlier run
    in ``run_dir`` (otherwise refused); ``resume``: continue it (see the module docstring);
    ``resume="auto"``: continue it when it has a checkpoint, else start a new run (the setting
    of a script a scheduler starts and requeues alike: ``rundir.auto_resume``; pair it with
    ``trainer.train(resume_from_checkpoint=callback.resume_from(trainer))``).
    ``run_config``: the job's whole config dict for ``config.json`` (``sae-shards train`` passes
    it); ``logger``: a ``RunLogger`` to use instead of the trainer's W&B run; ``meta``: extra
    checkpoint metadata. ``handle_signals``: the first SIGTERM/SIGINT asks the run to stop after
    the current step with a checkpoint (``request_stop``) instead of killing it (False: leave
    the signals to the script).
    """

    @quiet_on_other_ranks
    def __init__(
        self,
        run_dir: str | Path,
        *,
        targets: list[str] | None = None,
        source: str | None = None,
        sae: SAEConfig | Mapping[str, Any] | None = None,
        capacity: int | None = None,
        sae_steps_per_rl_step: int | None = None,
        concurrency: str | None = None,
        checkpoint_every: int | None = None,
        log_to_wandb: bool = True,
        capture: CaptureConfig | Mapping[str, Any] | None = None,
        runner: RunnerConfig | Mapping[str, Any] | None = None,
        label_column: str | None = "task",
        record_rollouts: bool = True,
        save_model: bool = True,
        seed: int = 0,
        overwrite: bool = False,
        resume: bool | Literal["auto"] = False,
        run_config: Mapping[str, Any] | None = None,
        logger: RunLogger | None = None,
        meta: Mapping[str, Any] | None = None,
        handle_signals: bool = True,
    ) -> None:
        importing = getattr(sys.modules.get("sae_shards.analysis.reward_task"), "IMPORTING", None)
        if importing is not None:  # `sae-shards analyze --task SCRIPT:NAME` is importing it
            raise ValueError(
                f"importing {importing} for --task started a run (ShardCallback): keep the "
                "script's training under `if __name__ == \"__main__\":`, so that importing it "
                "only defines the reward task. Nothing was trained or written.")
        flags = {"log_to_wandb": log_to_wandb, "record_rollouts": record_rollouts,
                 "save_model": save_model, "overwrite": overwrite,
                 "handle_signals": handle_signals}
        check_argument_types(
            run_dir=(run_dir, (str, os.PathLike), "a directory path: a str or a Path"),
            **{name: (value, (kind, Mapping, type(None)),
                      f"{kind.__name__}(...), a dict of its fields, or None")
               for name, value, kind in (("sae", sae, SAEConfig), ("capture", capture,
                                                                   CaptureConfig),
                                         ("runner", runner, RunnerConfig))},
            label_column=(label_column, (str, type(None)), "a column name or None"),
            seed=(seed, int, "an int"), meta=(meta, (Mapping, type(None)), "a mapping or None"),
            resume=(resume, bool if resume != "auto" else str, 'True, False or "auto"'),
            **{name: (value, bool, "True or False") for name, value in flags.items()})
        if label_column is not None and not label_column.strip():
            raise ValueError(f"ShardCallback: label_column={label_column!r} names no column; "
                             "give the dataset's context column, or None to record no context; "
                             "nothing was written")
        if not 0 <= seed <= MAX_SEED:
            raise ValueError(f"ShardCallback: seed={seed} must be between 0 and 2**32 - 1 (as "
                             "sae-shards train's seed); nothing was written")
        if str(run_dir).startswith("~"):  # as TrainingArguments takes output_dir
            run_dir = Path(run_dir).expanduser()
        check_meta(meta)
        self.capture_cfg = with_shortcuts(build_config(CaptureConfig, capture, "capture"), capture,
                                 targets=targets, source=source, capacity=capacity)
        check_steps_or_budget(given_fields(runner, RunnerConfig, sae_steps_per_rl_step=(
            sae_steps_per_rl_step)), " in ShardCallback's arguments")
        self.runner_cfg = with_shortcuts(build_config(RunnerConfig, runner, "runner"), runner,
                                sae_steps_per_rl_step=sae_steps_per_rl_step,
                                concurrency=concurrency, checkpoint_every=checkpoint_every)
        self.sae_cfg = build_config(SAEConfig, sae, "sae")
        check_sparse(self.sae_cfg)
        self.sae_cfg.check_sample_form(sample_form(self.capture_cfg.granularity))
        check_sae_window(self.capture_cfg, self.runner_cfg)
        self.resume = self._prepare_run_dir(run_dir, overwrite, resume, seed, run_config)
        """Whether this run continues the one in run_dir (``resume="auto"`` decided)."""
        self.log_to_wandb = log_to_wandb
        self.label_column = label_column
        self.record_rollouts = bool(record_rollouts)
        self.save_model = save_model
        self.seed = seed
        self.run_config = dict(run_config or {})
        self.logger = logger
        self.meta = dict(meta or {})
        self.parts: Pipeline | None = None
        self.capture: DeltaCapture | None = None
        self.rollouts: TRLRollouts | None = None
        self.summary: dict[str, Any] | None = None
        """The run's summary (also ``summary.json``), once training ended."""
        self._metas: dict[int, StepMeta] = {}
        self._rows: dict[int, dict] = {}  # the current step's rollouts row (per-event metadata)
        self._rewards: dict[int, float] = {}  # rl step -> mean reward of its rollouts
        self._fvu: list[float] = []
        self._tied = TiedRewardsWatch()
        self._t0 = math.nan
        self._wall_before = 0.0  # training time of the processes this one resumed from
        self.stop_signal: int | None = None
        """Set by ``request_stop``: the run ends after the current step, checkpointed."""
        self.ending = False
        """The run's end is being written (``on_train_end``): a stop request changes nothing."""
        self._stopped = False  # the run is ending early at this step (decided at on_step_end)
        self.last_checkpoint: Path | None = None
        self._resumable_step: int | None = None  # the newest step written with its resume file
        self._began = False  # a training began with this callback (one per instance)
        self._initial_dir: str | None = None  # where theta_0 is, when the policy came from a dir
        self._initial_adapter = False  # a LoRA adapter that did not start at zero was saved
        self._run_id: str | None = None  # the run's identity (setup: config.json's, or new)
        self._versions: dict[str, Any] | None = None  # the software that started the run
        self._resumed_under: list[dict[str, Any]] = []  # resumes under other versions
        # a resumed run's launch and distribution as config.json recorded them when it began
        # (kept: a resume refused after setup wrote config.json must not have replaced them)
        self._launched: dict[str, Any] | None = None
        self._dataset: dict[str, Any] | None = None  # a script's dataset_record, read once
        self._fingerprint: dict[str, str] | None = None  # its weight files' hashes
        self._event_log: rundir.JsonLines | None = None  # per-event runs' events.jsonl
        self._writer = BackgroundWriter()  # the step checkpoint being written, if any
        self._signals = SignalGuard(self) if handle_signals else None

    def _prepare_run_dir(self, run_dir: str | Path, overwrite: bool, resume: bool | str,
                         seed: int, run_config: Mapping[str, Any] | None) -> bool:
        """Create and lock ``run_dir`` (``rundir.prepare_run_dir``: under ``overwrite`` the
        earlier run is removed, under ``resume`` it must be there and started with these
        settings; ``resume="auto"`` takes both from what ``run_dir`` holds,
        ``rundir.auto_resume``). Other ranks never write into the run directory. Rank 0 holds
        its lock until the run ends (``rundir.lock_run_dir``): a second live writer, e.g.
        orphaned workers, is refused. Returns whether the run resumes."""
        if resume == "auto" and overwrite:
            raise ValueError('ShardCallback(resume="auto", overwrite=True): "auto" itself decides '
                             "whether to continue the run in run_dir or to replace one that "
                             "stopped before its first checkpoint; leave overwrite out")
        if resume and overwrite:
            raise ValueError("ShardCallback(resume=True, overwrite=True) contradict each other: "
                             "resume continues the run in run_dir, overwrite deletes it; choose "
                             "one")
        self._auto = resume == "auto"  # said in the messages on how the script continues
        if self._auto:  # every rank decides alike: rank 0 writes nothing before it trains
            try:
                resume, overwrite = rundir.auto_resume(run_dir)
            except FileExistsError as e:  # finished
                raise FileExistsError(f'resume="auto": {e} (to replace it, resume=False and '
                                      "overwrite=True)") from None
            if distributed.is_main():
                log.warning('resume="auto": %s', "continuing the run in %s" % run_dir if resume
                            else "replacing the run in %s, which has no complete checkpoint to "
                            "resume from" % run_dir if overwrite else
                            "starting a new run in %s" % run_dir)
        try:
            self.run_dir = (rundir.prepare_run_dir(run_dir, overwrite, resume)
                            if distributed.is_main() else Path(run_dir))
            self._holds_lock = distributed.is_main()  # one hold, let go once (_let_go)
        except (FileExistsError, FileNotFoundError) as e:
            if run_config:  # sae-shards train: its messages speak the CLI's overrides
                raise
            raise type(e)(in_script_terms(str(e), self._auto)) from None
        if resume and distributed.is_main():
            try:
                rundir.check_resume_config(self.run_dir, {
                    "capture": dataclasses.asdict(self.capture_cfg),
                    "runner": dataclasses.asdict(self.runner_cfg), "sae": self.sae_cfg.to_dict(),
                    "seed": seed}, "Pass ShardCallback the settings the run started with, or "
                    "start a new run_dir.")
            except BaseException:
                self._let_go()
                raise
        return resume

    @property
    def _said_level(self) -> int:
        """The level of what a run tells its user as it goes: a script configures no logging,
        so there WARNING, which Python shows by default; ``sae-shards train`` logs INFO."""
        return logging.INFO if self.run_config else logging.WARNING

    # ---- setup -------------------------------------------------------------------------------

    def setup(self, model: torch.nn.Module, trainer: Any | None = None) -> None:
        """Resolve targets, allocate the buffer and build the SAE (``on_train_begin`` calls it;
        call it earlier to get setup errors before training starts). ``trainer`` gives the
        rollouts (TRL GRPO/RLOO); None skips ``rollouts.jsonl``."""
        if self.parts is not None:
            return
        device = next(model.parameters()).device
        self._build_parts(model, trainer, device)
        config = rundir.read_config(self.run_dir) if self.resume else {}
        moved = self._find_initial_model(model, rundir.section(config, "model"))
        if self.resume:
            self._launched = {"launch": config.get("launch"),
                              "distribution": config.get("distribution")}
        self._versions, self._resumed_under = self._run_versions(
            trainer, config, getattr(getattr(trainer, "args", None), "device", device))
        if not self.run_config:  # config.json records it (its rows are read three times)
            self._dataset = dataset_record(getattr(trainer, "train_dataset", None))
        # the run's identity, in config.json and its shards checkpoints and resume files: a
        # resume refuses a part copied in from another run (resume._check_same_run). A resumed
        # run whose config.json records none (an earlier version's, or rewritten by one) takes
        # its resume file's, or a new one, once restored (_restore)
        saved_id = config.get("run_id")
        self._run_id = saved_id if isinstance(saved_id, str) else (
            None if self.resume else uuid.uuid4().hex)
        cap = self.capture_cfg
        self.meta = {"source": sample_source(cap.granularity, cap.source, cap.precondition,
                                             cap.normalize), "model_id": model_id(model),
                     "run_dir": str(self.run_dir), "lora": self._is_lora(), **self.meta,
                     "run_id": self._run_id}
        if self.resume:
            check_same_world(self.run_dir, trainer)
            if not self.run_config and trainer is not None:  # a user's script: its trainer
                self._check_script_resume(model, trainer, config, moved)
        self._rollout_log = rundir.JsonLines(self.run_dir / rundir.ROLLOUTS)
        self._metric_log = rundir.JsonLines(self.run_dir / rundir.METRICS)
        rundir.write_json(self.run_dir / rundir.CONFIG, self._config_json(model, trainer))
        if not self.run_config and trainer is not None:  # (sae-shards train saves it all)
            warn_model_only_checkpoints(trainer.args, resuming=self.resume)
        if not self.resume and not self.run_config and trainer is not None:
            warn_earlier_trl_checkpoints(getattr(trainer.args, "output_dir", None))
            warn_no_trl_checkpoints(trainer.args, self.runner_cfg.checkpoint_every,
                                     getattr(getattr(trainer, "state", None),
                                             "num_train_epochs", None))
        self._say_what_is_captured(trainer)

    def _build_parts(self, model: torch.nn.Module, trainer: Any | None,
                     device: torch.device) -> None:
        """The buffer, the SAE and its runner (``parts``), sized against the memory left on
        ``device``; the capture of the run's granularity; the rollouts reader."""
        pending = pending_policy_memory(model, trainer, device)
        if pending.total:
            log.info("sizing the buffer and the SAE against free memory less what the "
                     "policy's first training step will allocate: %s", pending.describe())
        self.parts = build_pipeline(model, self.capture_cfg, self.sae_cfg, self.runner_cfg, device,
                                    self.seed, pending,
                                    writes_checkpoints(self.runner_cfg, trainer))
        if self.capture_cfg.granularity == "step":
            self.capture = self._step_capture(self.parts.targets, self.parts.buffer)
        else:
            self.capture = EventCapture(
                self.parts.targets, self.parts.specs, self.parts.buffer, self.capture_cfg,
                trainer, meta_fn=self._metas.pop, rows_fn=lambda step: self._rows.get(step),
                on_push=self.parts.runner.on_push,
                room=self.parts.loop.room(self.runner_cfg.concurrency == "thread"))
            self._event_log = rundir.JsonLines(self.run_dir / rundir.EVENTS)
        self.rollouts = (TRLRollouts(trainer, self.label_column)
                         if trainer is not None and self.record_rollouts else None)

    def _find_initial_model(self, model: torch.nn.Module,
                            saved: Mapping[str, Any]) -> str | None:
        """theta_0's directory (``_initial_dir``): decided when the run starts (a resumed trainer
        already holds the checkpoint's weights) and kept in config.json from then on, whose
        ``model`` section is ``saved``. Returns where a resumed script's initial model moved to
        (the same files at a new place), else None."""
        if self.run_config:
            self._initial_dir = None
            return None
        if not self.resume:
            self._initial_dir = initial_model.loaded_from(model)
            return None
        moved = initial_model.moved_to(saved, model_id(model))
        self._initial_dir = moved or (saved.get("path") if "name_or_path" in saved else None)
        self._fingerprint = saved.get("fingerprint")  # as the run started
        self._initial_adapter = bool(saved.get("initial_adapter"))
        return moved

    def _check_script_resume(self, model: torch.nn.Module, trainer: Any,
                             config: Mapping[str, Any], moved: str | None) -> None:
        """A user's script resumes with the trainer settings, dataset and reward functions its
        run started with (``config``, the run's config.json); rows changed under the same
        fields are warned of. ``moved``: see ``_find_initial_model``."""
        saved = rundir.section(config, "model")
        mine = self._config_json(model, trainer)
        if moved:  # compared as the run recorded it; config.json then records moved
            mine["model"].update(path=saved["path"], name_or_path=saved.get("name_or_path"))
        if "name_or_path" not in saved:  # config.json of an earlier version
            mine["model"] = {"path": model_id(model), "lora": mine["model"]["lora"]}
        recorded = rundir.section(config, "rl").get("dataset")
        changed_rows = rows_changed(mine["rl"]["dataset"], recorded)
        mine["rl"]["dataset"] = without_digest(mine["rl"]["dataset"])
        ran = rundir.section(config, "rl").get("max_steps")
        if isinstance(ran, int) and ran <= 0:  # an epoch-based run's TRL -1, recorded
            mine["rl"]["max_steps"] = ran  # unresolved by an earlier version: no check
        rundir.check_resume_config(self.run_dir, mine,
                                   "Resume with the trainer settings, dataset and reward "
                                   "functions the run started with, or start a new run_dir.")
        self._check_trl_output(trainer, rundir.section(config, "rl").get("output_dir"))
        if changed_rows:
            self._warn_other_rows(trainer, changed_rows)

    def _check_trl_output(self, trainer: Any, recorded: Any) -> None:
        """A script relaunched with another ``output_dir`` (one named after a job id) whose
        trainer finds none of the run's TRL checkpoints there, while the ``output_dir`` the run
        recorded (``recorded``) holds them: refused naming both, before config.json would record
        the new one (the resume was refused later, told to pass resume_from_checkpoint=True,
        which cannot work there, and analysis then looked for the policies in the new place).
        A run moved with its TRL checkpoints finds them in the new place: not refused."""
        now = getattr(getattr(trainer, "args", None), "output_dir", None)
        if not (isinstance(recorded, str) and now) or Path(now).resolve() == Path(recorded).resolve():
            return
        have = sorted(set(rundir.saved_steps(self.run_dir / rundir.RESUME))
                      & set(rundir.saved_steps(self.run_dir / rundir.CHECKPOINTS)))
        if any(rundir.trl_finished(Path(now), s) for s in have) or not any(
                rundir.trl_finished(Path(recorded), s) for s in have):
            return
        raise CheckpointError(
            f"{self.run_dir}: the trainer's output_dir {now} holds none of this run's TRL "
            f"checkpoints, which are in {recorded} (config.json's rl.output_dir): give the "
            f"trainer output_dir={recorded!r}, or move them to {now}; nothing was changed")

    def _say_what_is_captured(self, trainer: Any | None) -> None:
        """Log what is captured, its sizes (``sizes``) and the SAE's window, and warn of
        settings that waste memory or repeat samples."""
        sae = self.parts.sae
        stacked = [t for t in self.parts.buffer.targets if t.is_stacked]
        self.sizes = {"n_targets": len(self.parts.buffer.targets),
                      "delta_numel": sum(t.numel for t in self.parts.specs),
                      "sae_factored_params": sae.factored_param_count(),
                      "dense_sae_params": sae.dense_param_count(),
                      "buffer_bytes": self.parts.buffer.memory_bytes}
        log.log(self._said_level,
                "sae-shards captures %d tensors (%s)%s, %d entries%s; SAE %d factored weights vs "
                "%d dense; buffer %.1f MiB; %d process(es)", self.sizes["n_targets"],
                few_names(self.parts.targets, 3),
                f", {len(stacked)} of them stacked experts (the SAE factors each of their "
                f"{sum(t.shape[0] for t in stacked)} expert matrices)" if stacked else "",
                self.sizes["delta_numel"],
                self._lora_phrase(), self.sizes["sae_factored_params"],
                self.sizes["dense_sae_params"], self.sizes["buffer_bytes"] / 2**20,
                distributed.world_size())
        self._say_window(trainer)
        oversized = oversized_ranks(self.parts.buffer.targets)
        if oversized:
            log.warning("%s", oversized_rank_text(self.sae_cfg.rank, oversized,
                                                  len(self.parts.buffer.targets)))
        if self.sae_cfg.batch_size > self.capture_cfg.capacity:
            log.warning(
                "sae.batch_size=%d exceeds capture.capacity=%d: a batch is drawn with replacement "
                "from the buffer, so each one repeats samples; an SAE step costs %d samples but "
                "sees %d distinct ones at most, and sae.dead_after counts drawn samples; raise "
                "capture.capacity or lower sae.batch_size", self.sae_cfg.batch_size,
                self.capture_cfg.capacity, self.sae_cfg.batch_size, self.capture_cfg.capacity)


    def _step_capture(self, targets: dict, buffer) -> DeltaCapture:
        """The per-step capture for ``targets``: ``ShardedDeltaCapture`` when they are FSDP2
        DTensors, ``Zero3DeltaCapture`` when they are DeepSpeed ZeRO-3 parameters (both on every
        rank; ``buffer`` None but on rank 0), else ``DeltaCapture``."""
        cls = (ShardedDeltaCapture if sharded_targets(targets)
               else Zero3DeltaCapture if zero3_targets(targets) else DeltaCapture)
        on_push = self.parts.runner.on_push if buffer is not None else None
        return cls(targets, buffer, self.capture_cfg.source, meta_fn=self._metas.pop,
                   on_push=on_push, outlier_ratio=self.capture_cfg.outlier_ratio)

    def _follow_sharding(self, model: torch.nn.Module) -> None:
        """Rank 0, per-step capture set up before the trainer sharded the model (FSDP2 replaces
        the parameters at ``accelerator.prepare``): capture the sharded parameters instead."""
        if self.capture_cfg.granularity != "step" or self.capture.sharded:
            return
        targets = resolve_targets(model, self.capture_cfg.targets, self.capture_cfg.granularity)
        if sharded_targets(targets) or zero3_targets(targets):
            self.capture = self._step_capture(targets, self.parts.buffer)

    def _gathers_initial(self, model: torch.nn.Module | None) -> bool:
        """Whether every rank joins in gathering the initial policy at the start of training:
        a script's sharded policy (ZeRO-3, FSDP2) not loaded from a local directory, which
        ``_save_initial_model`` saves. Every rank asks it, and answers it the same way. A LoRA
        policy is not gathered (its base, which analysis needs, is saved from a directory)."""
        if not (not self.resume and not self.run_config and self.save_model
                and model is not None and initial_model.is_sharded(model)
                and not hasattr(model, "peft_config")):
            return False  # the same on every rank: none of it reads a node's disk
        # whether the named directory holds the weights is read on each node's own disk:
        # every rank gathers when any rank would (rank 0 then saves only if it lacks it)
        return bool(distributed.max_over_ranks(int(initial_model.loaded_from(model) is None)))

    def _save_initial_model(self, model: torch.nn.Module, trainer: Any | None,
                            gathered: dict[str, torch.Tensor] | None = None) -> None:
        """A user's script whose policy does not hold the weights of a local directory (a Hub
        id, a model built in the script, ``from_config``): save its initial weights and
        tokenizer to ``run_dir/model`` before the first step, so analysis has theta_0 for the
        logit lens and the interventions (``sae-shards train`` builds or names its own).
        ``gathered``: a sharded policy's whole weights (``_gathers_initial``)."""
        if self.run_config or not self.save_model or self._initial_dir is not None:
            return
        out = self.run_dir / rundir.MODEL
        if initial_model.is_sharded(model) and gathered is None:
            log.warning("the initial policy is not saved to %s: its parameters are sharded "
                        "over the processes (FSDP2 / ZeRO-3) and it is a LoRA policy, whose "
                        "base is not gathered; load the base from a local directory", out)
            return
        named = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
        if named and Path(named).expanduser().is_dir():
            log.info("the policy does not hold exactly the weights of %s (changed after loading, "
                     "or in another dtype, or no safetensors there): its initial weights are "
                     "saved to %s", named, out)
        # a LoRA policy: its base model (the adapter starts at B = 0), which analysis merges
        # the final adapter into
        initial_model.save_policy(model, getattr(trainer, "processing_class", None), out,
                                  base_only=self._is_lora(), state_dict=gathered)
        # recorded as a model.path's is, so that analysis tells a model/ replaced since
        self._fingerprint = initial_model.fingerprint(out)
        rundir.write_json(self.run_dir / rundir.CONFIG, self._config_json(model, trainer))

    def _warn_no_tokenizer(self, trainer: Any | None) -> None:
        """A trainer without a ``processing_class`` saves no tokenizer with the policy; if the
        initial model's directory has none either, analysis could not read a token: say so
        before the first step."""
        if self.run_config or trainer is None or getattr(trainer, "processing_class", None):
            return
        initial = Path(self._initial_dir) if self._initial_dir else self.run_dir / rundir.MODEL
        if not rundir.has_tokenizer(initial):
            log.warning("the trainer has no processing_class and %s holds no tokenizer: the "
                        "run will train, but analysis (the logit lens, the interventions) "
                        "needs one; pass the trainer processing_class=tokenizer, or save the "
                        "tokenizer into %s", initial, initial)

    def _save_initial_adapter(self, model: torch.nn.Module) -> None:
        """A LoRA policy whose adapter does not start at zero (one trained before and loaded
        with ``is_trainable=True``, a PiSSA-like initialisation, ``modules_to_save`` copies
        already trained): theta_0 is its base with that adapter merged in, so the adapter as
        it starts is saved to ``run_dir/initial_adapter`` (small; saved even with
        ``save_model=False``, since without it analysis would take the base for theta_0)."""
        if not self._is_lora():
            return
        out = self.run_dir / rundir.INITIAL_ADAPTER
        if initial_model.is_sharded(model):
            log.warning("the LoRA adapter's parameters are sharded over the processes (FSDP2 / "
                        "ZeRO-3): whether it starts at zero is not checked, and analysis takes "
                        "the base model for theta_0 (right for a new adapter, B = 0); a trained "
                        "adapter should be merged into the base before the run")
            return
        if initial_model.starts_at_base(model):
            return
        log.warning("the LoRA adapter does not start at zero (trained before, or initialised "
                    "away from B = 0): the run starts from the base with it merged in; it is "
                    "saved to %s for analysis", out)
        initial_model.save_policy(model, None, out)
        self._initial_adapter = True  # recorded, so analysis refuses a run that lost it
        rundir.write_json(self.run_dir / rundir.CONFIG,
                          self._config_json(model, calling_trainer()))

    def _is_lora(self) -> bool:
        return any(isinstance(t, LoraTarget) for t in self.parts.targets.values())

    def _lora_phrase(self) -> str:
        """What a LoRA run's captured tensors are, for the start line: the adapters' effective
        weight updates, and apart from them the weights trained whole (``modules_to_save``)."""
        n_lora = sum(isinstance(t, LoraTarget) for t in self.parts.targets.values())
        if not n_lora:
            return ""
        what = ("the LoRA adapters' effective weight updates s (B1 A1 - B0 A0)"
                if self.capture_cfg.granularity == "step" else
                "each event's gradient of the LoRA-adapted effective weights W0 + s B A")
        whole = len(self.parts.targets) - n_lora
        return (f", {what}" if not whole else
                f", {n_lora} of them {what}, {whole} weight{'s' if whole > 1 else ''} trained "
                "whole (modules_to_save)")

    def _config_json(self, model: torch.nn.Module, trainer: Any | None) -> dict[str, Any]:
        """The JobConfig-shaped ``config.json`` analysis reads (model path, task, capture...)."""
        own = {"capture": dataclasses.asdict(self.capture_cfg),
               "runner": dataclasses.asdict(self.runner_cfg), "sae": self.sae_cfg.to_dict(),
               "run_dir": str(self.run_dir), "seed": self.seed,
               "world_size": distributed.world_size(),
               # how it was launched, and the format of TRL's checkpoints (a resume must
               # train the same way): as the run began
               "launch": distributed.launcher(distributed.world_size()),
               "distribution": (None if trainer is None else
                                distributed.distribution(trainer, distributed.world_size())),
               **{k: v for k, v in (self._launched or {}).items()
                  if v is not None or k == "distribution"},
               "versions": self._versions, "run_id": self._run_id,
               **({"resumed_under": self._resumed_under} if self._resumed_under else {})}
        if self.run_config:
            return {**self.run_config, **own}
        args = getattr(trainer, "args", None)
        return {**own, "task": None,
                "model": {"path": self._initial_dir, "name_or_path": model_id(model),
                          "lora": lora_settings(model) if self._is_lora() else
                          {"enabled": False},
                          # theta_0 includes run_dir/initial_adapter: analysis needs it
                          **({"initial_adapter": True} if self._initial_adapter else {}),
                          # theta_0 outside the run, or the copy saved in it
                          # (run_dir/model): analysis checks it is unchanged
                          **({"fingerprint": self._initial_fingerprint()}
                             if self._initial_dir else
                             {"fingerprint": self._fingerprint} if self._fingerprint else {})},
                "rl": {"algorithm": type(trainer).__name__ if trainer is not None else None,
                       # resolved for an epoch-based run: a resume over other epochs is
                       # refused, and analysis scores rewards at the end of training
                       "max_steps": trained_steps(trainer, args),
                       # where TRL saves its checkpoints (the policy of a step, for analysis)
                       "output_dir": (str(Path(args.output_dir).resolve())
                                      if getattr(args, "output_dir", None) else None),
                       # how TRL sampled completions: analysis samples its rollouts the same way
                       **{key: getattr(args, key, None) for key in SAMPLING_ARGS},
                       # what sizes and moves each step: a resume must keep them
                       **step_settings(args),
                       # how many completions each reward call got (one process's generation
                       # batch); analysis calls the user's reward functions on batches as large
                       "reward_batch": reward_batch(args),
                       # how the rewards were summed: analysis scores a RewardTask against it
                       "reward_weights": reward_weights(trainer),
                       # what RL was trained on and for: a resume with other reward functions
                       # or a dataset of another length or columns is refused, other rows said
                       "reward_names": reward_names(trainer), "dataset": self._dataset}}

    def _run_versions(self, trainer: Any | None, saved: dict[str, Any],
                      device: torch.device) -> tuple[dict[str, Any] | None, list[dict]]:
        """The versions, ``device`` (the trainer's: its parameters may be offloaded) and fp32
        matmul precision (``run/versions.py``) the run
        started under (this process's for a new run; ``saved``'s, the run's ``config.json``, on
        resume, None for a run of an earlier sae-shards) and the resumes under other ones
        (``resumed_under``), this one added, and warned about, when any of them differ."""
        now = versions.run_versions(device)
        if not self.resume:
            return now, []
        started, history = saved.get("versions"), list(saved.get("resumed_under") or [])
        changed = versions.changed_versions(started, now)
        if changed:  # the step it resumes from: the trainer's, once TRL loaded its state (a
            # script's callback is set up in train()); sae-shards train sets up before: 0
            step = getattr(getattr(trainer, "state", None), "global_step", None) or \
                resume_state.latest_complete(self.run_dir, quiet=True, trl=trl_dir(
                    trainer.args) if getattr(trainer, "args", None) is not None else None)
            log.warning("resuming %s under other versions than it started with (%s): the steps "
                        "after RL step %s are not made by the code (or on the device) that made "
                        "the earlier ones, and need not match an uninterrupted run's; "
                        "config.json records it "
                        "(resumed_under)", self.run_dir, versions.describe(changed), step)
            history.append({"rl_step": step, **{k: new for k, (_, new) in changed.items()}})
        return started, history

    def _warn_other_rows(self, trainer: Any, changed: str) -> None:
        """A script resumed on a dataset of the run's length and columns whose rows differ
        (``rows_changed``): said, and recorded in ``config.json``'s ``resumed_under``."""
        step = getattr(getattr(trainer, "state", None), "global_step", None)
        log.warning("resuming %s on other dataset rows than the run started with (%s; %s "
                    "records it, resumed_under): the steps after RL step %s train on these. "
                    "Meant (the same prompts rendered anew, e.g. a chat template that writes "
                    "today's date)? Nothing to do. If not (an unseeded shuffle, another file), "
                    "kill it before its next checkpoint (kill -9, or Ctrl-C twice: one Ctrl-C or "
                    "SIGTERM checkpoints these steps) and resume from RL step %s's checkpoint "
                    "with the run's own dataset", self.run_dir, changed, rundir.CONFIG, step, step)
        self._resumed_under.append({"rl_step": step, "dataset": f"with other rows ({changed})"})

    def _initial_fingerprint(self) -> dict[str, str]:
        """The initial directory's weight hashes: taken at the run's start; on resume the run's
        record, which a resume from a directory whose weights changed cannot match (refused by
        the config check), and which a directory moved since keeps (analysis then finds it
        with --initial-model)."""
        now = initial_model.fingerprint(self._initial_dir)
        return now if (self._fingerprint is None or now) else self._fingerprint

    def _save_step(self, step: int, trl_dir: Path | None, resumable: bool = True) -> None:
        """A checkpoint of the SAE side at RL step ``step`` (the worker made idle): resumable
        (with its resume file) when TRL checkpoints that step, else the shards only.
        ``trl_dir``: the trainer's ``output_dir`` (the resume file of its newest checkpoint's
        step is kept)."""
        self.parts.runner.wait_idle()
        self.parts.loop.flush_activations()
        self._flush_sae_records()
        logs = {log.path.name: log.rows() for log in self._step_logs()}  # a resume checks them
        last = {log.path.name: log.last_digest() for log in self._step_logs()}
        snap = resume_state.snapshot_step(step, self.parts, self.capture, self.meta,
                                          time.perf_counter() - self._t0, resumable, logs, last)
        self._writer.submit(resume_state.write_step, self.run_dir, snap,
                            self.runner_cfg.keep_checkpoints, trl_dir)
        self.last_checkpoint = resume_state.checkpoint_dir(self.run_dir, step)
        if resumable:
            self._resumable_step = step

    def _step_logs(self) -> list[rundir.JsonLines]:
        """The logs a resume checks against a checkpoint's record of them
        (``resume.STEP_LOGS``): rollouts, metrics, and a per-event run's events."""
        return [log for log in (self._rollout_log, self._metric_log, self._event_log)
                if log is not None]

    def _restore(self, step: int, last: bool = False, trl_output: str | None = None,
                 trl_log: list[dict] | None = None) -> None:
        """Continue from the checkpoint of RL step ``step`` (``last``: the run's last step):
        SAE, buffer, logs, counters. ``trl_log``: the resumed TRL checkpoint's log history
        (checked to be this run's)."""
        self._wall_before = resume_state.restore(  # sae-shards train checked the logs first
            self.run_dir, step, self.parts, self.capture, last, trl_output,
            logs_checked=bool(self.run_config), trl_log=trl_log)
        self._t0 -= self._wall_before  # wall_s: the whole run's, up to the checkpoint and after
        if self._run_id is None:  # config.json recorded none: the checkpoint's, else a new one
            self._run_id = resume_state.recorded_run_id(self.run_dir, step) or uuid.uuid4().hex
            self.meta["run_id"] = self._run_id
            config = rundir.read_config(self.run_dir)
            rundir.write_json(self.run_dir / rundir.CONFIG, {**config, "run_id": self._run_id})
        rundir.remove_derived(self.run_dir, ending=True, level=self._said_level)
        for _, _, row in rundir.iter_jsonl(self.run_dir / rundir.ROLLOUTS):
            self._rewards[row["step"]] = scored_mean(row["rewards"])
        self._fvu = [row["fvu"] for _, _, row in rundir.iter_jsonl(self.run_dir / rundir.METRICS)
                     if row.get("kind") == "sae"]
        if last:  # training had finished: _end_at_resume says so
            return
        log.log(self._said_level,
                "resumed from RL step %d (SAE step %d); training continues from there (anything "
                "logged after that step is replaced)", step, self.parts.trainer.n_steps)

    def request_stop(self, signum: int = 0) -> None:
        """End the run after the current optimizer step, with a checkpoint TRL and sae-shards
        can resume from (thread-safe: a signal handler may call it). ``signum``: the signal
        that asked, 0 (the default) for a request from code; the log names it."""
        # an int or a signal.Signals, never a bool; a negative one is lost in the ranks' vote
        if isinstance(signum, bool) or not isinstance(signum, int) or signum < 0:
            raise ValueError(f"request_stop(signum={signum!r}): give a signal number (a "
                             "non-negative int), or nothing for a request from code")
        self.stop_signal = signum

    def resume_from(self, trainer: Any) -> str | None:
        """The TRL checkpoint to resume ``trainer`` from: the newest step both sides finished
        (a sae-shards checkpoint with its resume file, and TRL's ``checkpoint-N`` with a
        ``trainer_state.json`` that parses, in the trainer's ``output_dir``), as a path for
        ``trainer.train(resume_from_checkpoint=...)``; None when there is none (start anew).
        A kill while TRL wrote a later checkpoint leaves it without ``trainer_state.json``;
        ``resume_from_checkpoint=True`` would pick it and transformers would stop: this passes
        over it, and warns naming it (delete it)."""
        output = trl_dir(trainer.args)
        with self._free_if_refused():
            # before its collectives: a callback on rank 0 alone would pair them with DDP's
            distributed.check_callback_on_every_rank("was asked resume_from")
            distributed.check_same_run_dir(self.run_dir)  # every rank decides from one run
            check_same_output(output)
            if output is None:
                return None
            step = resume_state.latest_complete(self.run_dir, quiet=True, trl=output)
            # a node-local output_dir of one path: each node sees its own files (audit 135)
            distributed.check_same("the checkpoint to resume from", str(step),
                                   "every process must see the run directory and the "
                                   "trainer's output_dir on one shared filesystem, where rank 0 "
                                   "saved the checkpoints")
            if step is None and self.resume:  # the precise refusal first: another output_dir
                self._check_trl_output(trainer, rundir.section(
                    rundir.read_config(self.run_dir), "rl").get("output_dir"))
                raise CheckpointError(self._nothing_complete(output))
        later = [s for s in trl_checkpoint_steps(str(output)) if step is None or s > step]
        if later:
            log.warning("the trainer's output_dir %s holds checkpoints that are not complete on "
                        "both sides (%s: killed while one side wrote it, or an earlier run's); "
                        "resuming from %s instead: delete them", output,
                        ", ".join(f"checkpoint-{s}" for s in later),
                        f"checkpoint-{step}" if step is not None else "the start")
        return None if step is None else str(output / f"checkpoint-{step}")

    def _nothing_complete(self, output: Path) -> str:
        """Why a run resumed in a script has no step to resume from: the trainer's output_dir
        holds no TRL checkpoint of a step sae-shards checkpointed (audit 135 F3: it was said to
        be continued, then told to pass resume_from_checkpoint=True, which cannot work)."""
        parts = resume_state.partial_checkpoints(self.run_dir, trl=output) or "no checkpoint"
        return (f"{self.run_dir}: the run is resumed, but no step of it is complete on both "
                f"sides ({parts}): the trainer's output_dir {output} holds no TRL checkpoint-N "
                "of a step sae-shards checkpointed (deleted, on scratch space wiped between "
                "launches, or not the output_dir the run used). Restore TRL's checkpoint there, "
                "give the trainer the run's output_dir, or start the run anew: "
                "ShardCallback(..., resume=False, overwrite=True)")

    @contextlib.contextmanager
    def _free_if_refused(self) -> Iterator[None]:
        """A refusal in the block (``ValueError``, ``CheckpointError``) lets go of the run
        directory before it is raised: it is free for the launch that corrects it."""
        try:
            yield
        except (ValueError, CheckpointError):
            self._let_go()
            raise

    # ---- events ------------------------------------------------------------------------------

    def setup_rank(self, model: torch.nn.Module, trainer: Any) -> None:
        """A rank other than 0: with per-event capture, an ``EventCapture`` that records this
        rank's events and sends them to rank 0; under FSDP2 a ``ShardedDeltaCapture`` that joins
        the delta's all-gather; otherwise nothing (rank 0 captures alone)."""
        if self.capture is not None:
            return
        targets = resolve_targets(model, self.capture_cfg.targets, self.capture_cfg.granularity)
        if self.capture_cfg.granularity == "step":
            if sharded_targets(targets) or zero3_targets(targets):
                self.capture = self._step_capture(targets, None)
            return
        specs = make_targets(target_shapes(targets), rank=self.sae_cfg.rank)
        self.capture = EventCapture(targets, specs, None, self.capture_cfg, trainer)

    @script_worded
    def on_init_end(self, args, state, control, **kwargs):
        """A script's resume (``ShardCallback(..., resume=True)`` in the trainer's
        ``callbacks=``) is checked against the run's process count and distribution as the
        trainer is built, on every rank: ``trainer.train(resume_from_checkpoint=...)`` loads
        TRL's checkpoint, whose format the distribution sets, before ``on_train_begin``, and
        under another one it failed there, or quietly started a fresh optimizer (a ZeRO run's
        16-bit weights resumed without DeepSpeed). ``sae-shards train`` checks before it builds
        the trainer (``job``); a callback added later (``add_callback``) is checked at
        ``on_train_begin``."""
        if not (self.resume and not self.run_config):
            return
        with self._free_if_refused():  # free for the resume with the right launch
            check_same_world(self.run_dir, calling_trainer())

    @script_worded
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        handler = getattr(calling_trainer(), "callback_handler", None)
        peers = getattr(handler, "callbacks", None)
        if peers is not None:
            self._check_sole_writer(peers)
        if self._began:  # one callback is one run: its buffer, SAE, logs and lock are that run's
            raise RuntimeError(
                f"this ShardCallback already trained into {self.run_dir}; a second "
                "trainer.train() with it would write its RL steps into the same run again. To "
                "continue a stopped or crashed run: trainer.remove_callback(callback), "
                "callback.close(), then add a new ShardCallback(run_dir=..., resume=True) and "
                "call trainer.train(resume_from_checkpoint=True); for another run, a new "
                "ShardCallback with a new run_dir")
        with self._free_if_refused():  # before any collective of the callback's, which
            distributed.check_callback_on_every_rank()  # would mismatch
            distributed.check_same_run_dir(self.run_dir)
            check_same_output(trl_dir(args))  # a resume would fail on it (audit 141 F2)
            distributed.check_same_settings(
                self._rank_settings(), "give ShardCallback the same arguments on every process "
                "(settings read per rank, e.g. from a file or the environment, can differ)")
        if not self.run_config:  # sae-shards train checked its rl.max_steps already
            with self._free_if_refused():
                check_output_dir(trl_dir(args), self.run_dir)
                check_learning_rate(kwargs.get("optimizer"), args)
            per_step = trainer_samples_per_step(args, self.capture_cfg.granularity)
            check_sae_window(self.capture_cfg, self.runner_cfg, per_step)
            lost = (deconv_leading_loss(kwargs.get("optimizer"))
                    if self.capture_cfg.source == "deconv" and not self.resume else (0, ""))
            check_sae_trains(self.capture_cfg, self.runner_cfg, state.max_steps,
                             "the trainer's max_steps", per_step, lost)
        self._began = True
        # asked here, not in setup: sae-shards train sets up before accelerate shards the model
        unsharded = distributed.fsdp_not_applied(model is not None
                                                 and initial_model.is_sharded(model),
                                                 distributed.world_size())
        if unsharded and state.is_world_process_zero:
            log.warning("%s", unsharded)
        self._begin(args, state, control, model, **kwargs)
        if self.resume and state.global_step >= state.max_steps:
            self._end_at_resume(args, state, control, model, **kwargs)
            return
        if self._signals is not None:  # set up: SIGTERM / Ctrl-C stop after the step, saved
            self._signals.enter(peers=peers)

    def _rank_settings(self) -> dict[str, Any]:
        """The settings every rank must share (``distributed.check_same_settings``): the
        capture, SAE and runner configs field by field (a rank's torch threads aside), the seed
        and the label column."""
        settings = {f"{prefix}.{k}": v for prefix, cfg in (("capture", self.capture_cfg),
                                                           ("sae", self.sae_cfg),
                                                           ("runner", self.runner_cfg))
                    for k, v in dataclasses.asdict(cfg).items()}
        settings.pop("runner.torch_threads", None)
        return {**settings, "seed": self.seed, "label_column": self.label_column}

    def _say_window(self, trainer: Any | None) -> None:
        """Per event: how many RL steps of events the buffer holds, which the capacity alone
        does not say (16 completions a step: 256 slots are 16 steps), when the trainer says how
        many events a step gives."""
        per_step = (trainer_samples_per_step(getattr(trainer, "args", None),
                                             self.capture_cfg.granularity)
                    if trainer is not None and self.capture_cfg.granularity != "step" else None)
        if per_step:
            log.log(self._said_level,
                    "the buffer's %d slots hold the events of at least the last %d RL step(s), "
                    "at up to %d event(s) a step (capture.granularity=%s): the SAE draws its "
                    "batches from those; capture.capacity sets it", self.capture_cfg.capacity,
                    max(1, self.capture_cfg.capacity // per_step), per_step,
                    self.capture_cfg.granularity)

    def _check_sole_writer(self, peers: Sequence[Any]) -> None:
        """Refuse a trainer in which this run directory has more than one writer: the same
        callback added twice (transformers only warns, then calls it twice per event) or two
        callbacks made with one ``run_dir``. Several callbacks with their own directories are
        fine (``planted.benchmark`` runs two)."""
        mine = Path(self.run_dir).resolve()
        same = [c for c in peers if isinstance(c, ShardCallback)
                and Path(c.run_dir).resolve() == mine]
        if len(same) < 2:
            return
        how = ("the same ShardCallback is added twice" if all(c is self for c in same)
               else f"{len(same)} ShardCallbacks were made with this run_dir")
        raise ValueError(
            f"the trainer has {len(same)} writers of run_dir={self.run_dir} ({how}): they would "
            "write one run's buffer, checkpoints and logs twice over. Keep one (e.g. "
            "trainer.remove_callback(callback)), or give each ShardCallback its own run_dir. "
            "Nothing was trained.")

    def _begin(self, args, state, control, model, **kwargs) -> None:
        # before any step: the weights are theta_0 (a collective: every rank, the same answer)
        initial = gathered_state_dict(model) if self._gathers_initial(model) else None
        notes: list[str] = []  # warnings of every rank, which rank 0 says
        try:  # each rank its own side; then every rank learns whether all got through
            if self.resume and state.global_step > 0:  # every rank: each loaded the checkpoint
                checkpoint = resumed_checkpoint(args, state.global_step)
                if checkpoint is not None:
                    self._restore_converted(model, checkpoint)
                notes = [note] if (note := missing_rng_state(checkpoint, args)) else []
            if state.is_world_process_zero:
                self._begin_main(args, state, model, initial)
            else:
                self.setup_rank(model, calling_trainer())
            # the capture's own checks (the optimizer its source needs, hooks): no collective
            if self.capture is not None:
                self.capture.on_train_begin(args, state, control, model=model, **kwargs)
        except Exception as e:  # the others stop with this rank's reason, not a lost connection
            distributed.begin_together(e, notes)
            raise
        for note in distributed.begin_together(None, notes):
            log.warning("%s", note)

    def _begin_main(self, args, state, model: torch.nn.Module,
                    initial: dict[str, torch.Tensor] | None) -> None:
        """Rank 0's side of the start: the pipeline, the resume or the initial policy, the
        logger and the rollout log."""
        self._t0 = time.perf_counter()
        if self.parts is None:
            self.setup(model, calling_trainer())
        self._follow_sharding(model)
        if self.resume:
            self._restore(state.global_step, last=state.global_step >= state.max_steps,
                          trl_output=None if self.run_config else args.output_dir,
                          trl_log=state.log_history)
            warn_reshuffled_epochs(args, state, self._said_level)
            if not self.run_config:
                warn_later_trl_checkpoints(
                    args.output_dir, state.global_step, resume_state.other_runs_trl_checkpoints(
                        self.run_dir, args.output_dir, state.global_step))
        else:
            self._save_initial_model(model, calling_trainer(), initial)
            self._save_initial_adapter(model)
            self._warn_no_tokenizer(calling_trainer())
        if self.logger is None:
            self.logger = (RunLogger.attach_active() if self.log_to_wandb and "wandb" in
                           (args.report_to or []) else RunLogger())
        if self.rollouts is not None:  # before the event recorder wraps the same method
            self.rollouts.install()

    @staticmethod
    def _restore_converted(model: torch.nn.Module, checkpoint: Path) -> None:
        """Put back what transformers' resume left out (``initial_model.restore_converted``:
        a mixture of experts' stacked experts), saying so."""
        restored = initial_model.restore_converted(model, checkpoint)
        if restored:
            log.warning("transformers resumed the policy from %s without %d of its weights "
                        "(stacked experts it converts on loading, huggingface/transformers"
                        "#48805: they were still the initial ones); sae-shards loaded them "
                        "from the checkpoint: %s", checkpoint, len(restored),
                        few_names(restored, 3))

    def _end_at_resume(self, args, state, control, model, **kwargs) -> None:
        """Resumed from a checkpoint at ``max_steps`` (killed or stopped after its last step,
        before its end was written): write the end now, as of that step, and capture nothing
        more. transformers' loop still runs one optimizer step before it checks ``max_steps``
        (``sae-shards train`` stops it before it begins); in a script that step is left out of
        the run directory, whose ``final_model`` is the policy of the last step."""
        log.log(self._said_level,  # as _restore's
                "resumed at RL step %d = max_steps: training had finished; writing the run's "
                "end as of that step", state.global_step)
        self._end(args, state, control, model, kwargs.pop("processing_class", None), **kwargs)
        self.capture = None  # every later event is a no-op
        self._let_go()

    @script_worded
    @paid
    def on_step_begin(self, args, state, control, **kwargs):
        self._writer.wait()  # the last checkpoint holds views of the buffer this step writes
        if self.capture is not None:
            self.capture.on_step_begin(args, state, control, **kwargs)

    @script_worded
    @paid
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.capture is not None:
            self.capture.on_pre_optimizer_step(args, state, control, **kwargs)

    @script_worded
    @paid
    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.capture is not None:
            self.capture.on_optimizer_step(args, state, control, **kwargs)

    @script_worded
    @paid
    def on_step_end(self, args, state, control, **kwargs):
        # Whether to stop after this step, decided once here: a signal landing later in the
        # step counts at the next one. With several processes every rank must agree (TRL's
        # checkpoint and the end of training are collective): a stop asked on any rank stops all.
        asked = self.stop_signal  # read once: a signal handler may set it meanwhile
        stop = asked is not None
        if args.world_size > 1:
            anywhere = distributed.stop_asked_anywhere(asked)
            stop = anywhere is not None
            if stop and asked is None:  # asked on another rank
                self.stop_signal, where = anywhere
                if state.is_world_process_zero:
                    log.warning("%s by rank %d: finishing this RL step, writing a checkpoint, "
                                "then stopping", stop_words(self.stop_signal), where)
        if stop and state.global_step >= state.max_steps:  # the last step: the run just ends
            log.info("the stop request came during the last RL step: nothing is cut short, the "
                     "run ends as planned and needs no resume")
        elif stop:  # TRL saves its checkpoint of this step, then stops
            control.should_save = control.should_training_stop = True
            self._stopped = True
        if self.capture is not None and not state.is_world_process_zero:
            self.capture.on_step_end(args, state, control, **kwargs)  # FSDP2: joins the gather
        if self.capture is None or not state.is_world_process_zero:
            return
        step = state.global_step
        self._metas[step] = self._step_meta(step)
        self.capture.on_step_end(args, state, control, **kwargs)
        self.parts.loop.reached(step)  # also a step that gave no sample
        self._metas.pop(step, None)  # not consumed when the capture skipped the step
        for record in getattr(self.capture, "last_events", ()):
            self._event_log.append(record)
        self._flush_sae_records()
        every = self.runner_cfg.checkpoint_every
        if control.should_save:  # TRL checkpoints this step (its save_steps, or a stop)
            self._save_step(step, trl_dir(args))
        elif every and step % every == 0:  # nothing could resume here: the shards only
            self._save_step(step, trl_dir(args), resumable=False)
        if step % max(1, state.max_steps // 10) == 0 or step == state.max_steps:
            sae = (f"SAE step {self.parts.trainer.n_steps}  fvu {self._fvu[-1]:.3f}"
                   if self._fvu else "SAE not trained yet (runner.min_samples, sae_start_step)")
            log.info("RL step %d/%d  reward %.3f  |  %s", step, state.max_steps,
                     self._rewards.get(step, math.nan), sae)

    @script_worded
    @paid
    def on_save(self, args, state, control, **kwargs):
        # TRL decided to checkpoint this step after its end (save_strategy "epoch" at an epoch's
        # last step, "best" after an evaluation): its resume file is written now, after TRL's
        # checkpoint; the step's end already wrote it when should_save was known there.
        if self.capture is None or not state.is_world_process_zero:
            return
        if self._resumable_step != state.global_step:
            self._save_step(state.global_step, trl_dir(args))

    @script_worded
    @paid
    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.capture is None or not state.is_world_process_zero:
            return
        numeric = {k: float(v) for k, v in (logs or {}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.logger.log_rl(numeric, state.global_step)
        self._metric_log.append({"kind": "rl", "rl_step": state.global_step, **numeric})
        self._tied.observe(numeric.get(TIED_METRIC), state.global_step)

    @script_worded
    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        try:
            self._end(args, state, control, model, processing_class, **kwargs)
        finally:
            if self._signals is not None:
                self._signals.exit()
            self._let_go()

    def _let_go(self) -> None:
        """Release this callback's hold of the run directory's lock, and on a rank other than 0
        give sae-shards' log records below ERROR back to the process (once)."""
        self._speak_again()  # once: later calls do nothing
        if self._holds_lock:
            self._holds_lock = False
            rundir.release_run_dir(self.run_dir)

    def _end(self, args, state, control, model, processing_class, **kwargs) -> None:
        if not state.is_world_process_zero:  # rank 0 writes the run's summary; every rank can
            self.summary = {"interrupted": self._stopped,  # tell how the run ended
                            "stop_signal": self.stop_signal if self._stopped else None,
                            # transformers' step past max_steps, which rank 0 leaves out
                            "rl_steps": min(state.global_step, state.max_steps),
                            "rank": distributed.rank(),
                            "world_size": distributed.world_size(),
                            "summary_json": str(self.run_dir / rundir.SUMMARY)}
        if self.capture is None:
            return
        self.ending = True
        try:
            gathered = None
            if self.save_model and not self._stopped and self._sharded(model):
                # every rank: a collective; of a peft policy only the adapter, which it saves
                gathered = gathered_state_dict(model, trainable_only=hasattr(model,
                                                                             "peft_config"))
            if state.is_world_process_zero:
                self._write_end(model, processing_class, gathered,
                                getattr(args, "max_grad_norm", None))
        finally:
            self.capture.on_train_end(args, state, control, **kwargs)  # hooks off, every rank
            if self.rollouts is not None:  # after the recorder's: it wrapped over this one
                self.rollouts.remove()

    def _sharded(self, model) -> bool:
        """Whether no process holds the whole policy (ZeRO-3, FSDP2): saving it gathers it."""
        return bool(getattr(self.capture, "sharded", False)
                    or (model is not None and initial_model.is_sharded(model)))

    def _write_end(self, model, processing_class, gathered=None,
                   max_grad_norm: float | None = None) -> None:
        """Rank 0's end of the run; ``gathered``: a sharded policy's whole state dict;
        ``max_grad_norm``: the trainer's clipping, for a per-event run's summary."""
        self._writer.wait()
        self.parts.runner.finish()
        self.parts.loop.flush_activations()
        self._flush_sae_records()
        final_model = None  # its weight files' hashes: analysis pairs no other policy
        if self.save_model and not self._stopped:
            out = self.run_dir / rundir.FINAL_MODEL
            initial_model.save_policy(model, processing_class, out, state_dict=gathered)
            final_model = initial_model.fingerprint(out)
        self.summary = self._finish(self.parts.loop.last_rl_step, max_grad_norm, final_model)

    def close(self) -> None:
        """Stop the SAE worker after a failed ``train()`` (its own error is not re-raised), end
        the W&B run it opened as failed, and let go of the run directory."""
        if self.capture is not None and self.summary is None:  # a failed train(): hooks off
            self.capture.on_train_end(None, None, None)
        if self.parts is not None and self.summary is None:
            try:
                self._writer.wait()
            except Exception as e:  # the training error that brought us here is the one to see
                log.warning("the checkpoint write also failed while stopping: %s", e)
            if not self.parts.runner.stop():
                log.warning("the SAE worker did not finish its step within %.0f s of the "
                            "failure; the process may end abruptly", STOP_GRACE_S)
        if self.logger is not None and self.summary is None:  # failed: the W&B run says so
            self.logger.finish(exit_code=1)
        if self._signals is not None:
            self._signals.exit()
        self._let_go()

    # ---- per step ----------------------------------------------------------------------------

    def _step_meta(self, step: int) -> StepMeta:
        """Write the step's rollouts; its StepMeta (held out every ``runner.heldout_every``)."""
        every = self.runner_cfg.heldout_every
        heldout = bool(every) and step % every == 0
        got = self.rollouts.read(step) if self.rollouts is not None else None
        if got is None:
            return StepMeta(step, heldout=heldout)
        self._rollout_log.append(got.row)
        self._rows = {step: got.row}
        self._rewards[step] = got.reward_mean
        return StepMeta(step, got.reward_mean, got.reward_std, got.labels, heldout)

    def _flush_sae_records(self) -> None:
        for rec in self.parts.loop.pop_records():
            m = dict(rec.metrics.__dict__)
            self._fvu.append(m["fvu"])
            self.logger.log_sae({**m, "rl_step": rec.rl_step}, rec.sae_step)  # sae/rl_step
            self._metric_log.append({"kind": "sae", "sae_step": rec.sae_step,
                                     "rl_step": rec.rl_step, **m})

    # ---- the end -----------------------------------------------------------------------------

    def _finish(self, rl_step: int, max_grad_norm: float | None = None,
                final_model: dict[str, str] | None = None) -> dict[str, Any]:
        """Final checkpoint (an interrupted run keeps its last step checkpoint instead),
        activations, samples, summary and artifact; ``final_model``: the fingerprint of the
        policy saved in ``final_model/`` (None when none was)."""
        parts = self.parts
        # a report written while the run went on is stale
        rundir.remove_derived(self.run_dir, level=self._said_level)
        if not self._stopped:
            final = self.run_dir / rundir.CHECKPOINTS / "final"
            with rundir.writing(final):
                save_checkpoint(final, parts.sae, parts.trainer.stats.as_tensors(),
                                resume_state.checkpoint_meta(self.meta, rl_step, parts.trainer))
        else:
            final = self.last_checkpoint
        rundir.save_activations(self.run_dir / rundir.ACTIVATIONS,
                                {**parts.loop.activations.tensors("online"),
                                 **final_activations(parts).tensors("final")},
                                float(parts.sae.input_scale), final.name if final else None)
        slots = parts.buffer.chronological_slots()
        metas = [parts.buffer.metadata(s) for s in slots.tolist()]
        if self.runner_cfg.save_samples:  # per-event factors are written materialised
            chunks = [ev.materialize_all(parts.buffer.gather(c), parts.specs)
                      if parts.buffer.event_rank else parts.buffer.gather(c)
                      for c in slots.split(256)]
            rundir.save_samples(self.run_dir / rundir.SAMPLES,
                                {t.name: torch.cat([c[t.name] for c in chunks]) for t in parts.specs},
                                [m.global_step for m in metas], [m.heldout for m in metas],
                                [list(m.task_labels) for m in metas])
        fvu_heldout, n_heldout = heldout_fvu(parts)
        rewards = [self._rewards[s] for s in sorted(self._rewards)]
        summary = run_summary(parts, self.capture, self.runner_cfg, rewards, self._fvu, extra={
            "interrupted": self._stopped,
            "stop_signal": self.stop_signal if self._stopped else None,
            "final_checkpoint": rundir.inside_name(self.run_dir, final),
            "fvu_heldout": fvu_heldout,
            "heldout_samples": n_heldout, "wall_s": time.perf_counter() - self._t0,
            "wall_s_resumed_from": self._wall_before,
            "world_size": distributed.world_size(), "final_model_fingerprint": final_model,
            **(clip_figures((row for _, _, row in rundir.iter_jsonl(self.run_dir /
                                                                     rundir.METRICS)),
                            max_grad_norm)
               if isinstance(self.capture, EventCapture) else {}),
            **self.sizes})
        rundir.write_json(self.run_dir / rundir.SUMMARY, summary)
        self.logger.summary(summary)
        self.logger.log_artifact(final, f"shards-{self.run_dir.name}", {"rl_step": rl_step})
        self.logger.finish()
        if self._stopped and not self.run_config:  # sae-shards train prints its own command
            n = distributed.world_size()
            log.warning("stopped after RL step %d with a checkpoint of both sides (%s); to "
                        "continue, run the script again%s %s", rl_step, final,
                        f" under the same launch ({distributed.launcher(n)} your_script.py ...)"
                        if n > 1 else "",
                        "as it is: its resume=\"auto\" continues the run" if self._auto else
                        f"with {SCRIPT_RESUME}")
        return summary
