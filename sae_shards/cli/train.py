"""``sae-shards train [overrides] [-m]``: Hydra composes the job (or each job of a sweep), the
run directory is checked, the RL run with capture and the SAE runs (``run.job``), and the
closing lines give its figures, its files and the next command. Exit code: 0; 128 + the signal
for a run a signal stopped (with a checkpoint); 1 when a job raised an unforeseen error; 2 when
one was refused (a config error, a run directory it cannot use) or stopped otherwise.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import shutil
import signal
import sys
from pathlib import Path
from typing import Sequence

from sae_shards.capture.signals import EndAtOnce
from sae_shards.cli.hydra_config import (CONFIG_DIR, ConfigError, SHOW_FLAGS, check_overrides,
                                         hydra_files, override_mask, job_config_from_hydra,
                                         job_dirname, open_map_args, override_args,
                                         refuse_other_primary_config, register_resolvers)
from sae_shards.cli.processes import (end_process_group, main_process, several_processes,
                                      speak_as_rank, this_rank)
from sae_shards.cli.rerun import (auto_resume_args, how_to_continue, recorded_group,
                                  rerun_command, resume_args, resume_command)
from sae_shards.cli.shared import quiet_third_party
from sae_shards.cli.train_checks import check_run_dir_arg, check_sweep_jobs, is_sweep, new_run_dir


def _drop_file_handlers(directory: Path) -> None:
    """Close and remove the root logger's file handlers writing under ``directory`` (Hydra's
    ``cli.log`` of a refused run, opened on its first record): once the directory is removed,
    a later record in this process (``main`` called again, from Python) would fail to open it."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        name = getattr(handler, "baseFilename", None)
        if name is not None and Path(name).is_relative_to(directory.resolve()):
            root.removeHandler(handler)
            handler.close()


def _warn_unused_lora(overrides: Sequence[str], enabled: bool) -> None:
    """Warn when ``model.lora.*`` settings were given on the command line while LoRA is off: no
    adapter uses them, and the run trains the full weights (a preset's own values, such as
    ``model=tiny_lora model.lora.enabled=false``'s rank, are not the user's)."""
    typed = [o.lstrip("+") for o in overrides if not o.startswith("~")]  # not a deletion
    unused = [o for o in typed if o.startswith(("model.lora.", "model.lora="))
              and not o.startswith("model.lora.enabled")]
    if unused and not enabled and main_process():
        logging.getLogger("sae_shards.cli").warning(
            "%s given, but model.lora.enabled=false: no adapter is trained, RL changes the full "
            "weights; add model.lora.enabled=true to train one", ", ".join(unused))


def closing_lines(summary: dict, run_dir: Path) -> list[str]:
    """The end of a run: figures, the files written, and the next command."""
    fig = lambda k: _figure(summary, k)  # noqa: E731
    share = lambda k: "n/a" if summary.get(k) is None else f"{summary[k]:.0%}"  # noqa: E731
    lines = [f"run finished: {summary['rl_steps']} RL steps, {summary['sae_steps']} SAE steps, "
             f"{summary['wall_s']:.0f} s",
             f"  reward {fig('reward_first')} -> {fig('reward_last')} (mean over the first -> "
             f"last fifth of the RL steps)  |  fvu {fig('fvu_first')} -> {fig('fvu_last')} "
             "(first -> last tenth of the SAE steps)",
             f"  dead latents {share('dead_frac')}"
             + (" (the SAE saw fewer than sae.dead_after samples)"
                if summary.get("dead_frac") is None and summary.get("sae_steps") else "")
             + f"  |  never fired in training {share('never_fired_frac')}"]
    if summary.get("events") is not None:
        lines.append(_events_line(summary))
    if summary.get("warning"):
        lines.append(f"  warning: {summary['warning']}")
    if summary.get("interrupted"):
        lines[0] = lines[0].replace("run finished", "run interrupted")
        at = summary.get("final_checkpoint")  # relative to the run since 2026-12-07
        stopped_at = run_dir / at if isinstance(at, str) else "no checkpoint"
        lines.append(f"  the run stopped early, checkpointed at {stopped_at}; "
                     f"continue it with: {resume_command(run_dir)}")
    files = sorted(p.name + ("/" if p.is_dir() else "") for p in run_dir.iterdir()
                   if not p.name.startswith("."))
    quoted = shlex.quote(str(run_dir))  # a directory with spaces: one word to paste
    lines += [f"  run directory {run_dir}: {', '.join(files)}",
              f"  next: sae-shards analyze {quoted}"]
    if "samples.safetensors" in files and _evaluable(run_dir):
        lines[-1] += f"  |  sae-shards evaluate {quoted} (shards against the tasks)"
    return lines


def _figure(summary: dict, key: str) -> str:
    """One of ``summary.json``'s figures as the closing lines show it (n/a when null)."""
    return "n/a" if summary.get(key) is None else f"{summary[key]:.3f}"


def _events_line(summary: dict) -> str:
    """A per-event run's closing line: how exactly its samples are the events' gradients (cut to
    ``capture.event_rank``?) and how they relate to the update applied (clipped steps?)."""
    cut = summary.get("truncated_events") or 0
    parts = [f"{summary['events']} captured",
             f"{cut} cut to capture.event_rank (smallest kept energy "
             f"{summary['kept_energy_min']:.3f}; a step's events then sum to its gradient "
             "approximately)" if cut else "none cut to capture.event_rank"]
    if summary.get("clipped_steps"):
        parts.append(f"{summary['clipped_steps']} of the {summary['grad_norm_steps']} steps "
                     f"with a logged grad_norm clipped at max_grad_norm="
                     f"{summary['max_grad_norm']:g} (events are gradients before clipping)")
    return "  events: " + "; ".join(parts)


def _evaluable(run_dir: Path) -> bool:
    """A run of a built-in task with several labels that held out steps: what evaluate scores."""
    from sae_shards.run import rundir
    from sae_shards.run.config import ONE_LABEL_TASKS

    cfg = rundir.read_config(run_dir)
    task, runner = rundir.section(cfg, "task"), rundir.section(cfg, "runner")
    name = task.get("name")
    return name is not None and name not in ONE_LABEL_TASKS and bool(runner.get("heldout_every"))


def run(args: list[str]) -> int:
    # torch, transformers and TRL take seconds to import, in Hydra's setup and each job's: a
    # stop signal then is said and ends the command at once (one process of a launch speaks),
    # where SIGTERM's default ended it without a word; a job's own guards take over in run_job.
    # Armed first, before anything imports torch; the rank read from the launcher's RANK
    early = EndAtOnce(None)
    early.arm()
    if os.environ.get("RANK", "0") == "0":
        early.message = ("sae-shards: stopped by {signal} before the run began: this command "
                         "trained nothing; run the same command again")
    try:
        return _run_command(args, early)
    finally:
        early.disarm()


def _run_command(args: list[str], early: EndAtOnce) -> int:
    import hydra

    try:
        args, changes = _checked_args(args)
    except ConfigError as e:
        if main_process():  # every rank of a launch refuses; one says why
            print(f"sae-shards: config error: {e}", file=sys.stderr)
        return 2
    quiet_third_party()
    command = _Jobs(changes, early)

    @hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)
    def train_main(cfg) -> None:
        command.one_job(cfg)

    register_resolvers()
    fresh = new_run_dir(args)
    command.fresh = fresh.resolve() if fresh is not None else None
    if fresh is not None:  # Hydra makes it as the job starts: left out if empty at a signal
        early.remove_if_empty = [str(command.fresh)]
    flags = [a for a, is_override in zip(args, override_mask(args)) if not is_override]
    sys.argv = ["sae-shards train", *flags, *override_args(args)]
    train_main()
    end_process_group()
    return command.finish(fresh)


def _checked_args(args: list[str]) -> tuple[list[str], list[str]]:
    """The command line as Hydra will compose it, checked before Hydra writes anything; with
    ``resume=true``, the run's own overrides first (and the ones given now that are new)."""
    if is_sweep(args) and SHOW_FLAGS & set(args):
        raise ConfigError("-m (a sweep) cannot be combined with --cfg, --info or --help: "
                          "Hydra shows one job's config; drop -m and give one value per key")
    refuse_other_primary_config(args)
    args = auto_resume_args(args)
    check_overrides(args)
    check_run_dir_arg(args)
    args, changes = resume_args(open_map_args(args))
    if is_sweep(args):
        check_sweep_jobs(args)
    return args, changes


class _Jobs:
    """The jobs of one ``train`` command (a sweep's several, or one) as Hydra runs them, and what
    each came to: the failures said at the end, the signal that stopped them, the exit code."""

    def __init__(self, changes: list[str], early: EndAtOnce) -> None:
        self.early = early  # armed while no job's own guard is
        self.fresh: Path | None = None  # the outermost directory Hydra makes for a single run
        # a resumed run's own overrides and the ones given now may not compose: say which
        # were new
        self.resume_hint = (
            f" (resume=true composed the run's own overrides with {' '.join(changes)}; a "
            "resumed run keeps the settings it started with: drop those, or start a new "
            "run_dir)") if changes else ""
        self.failures: list[str] = []
        self.interrupted: list[int] = []  # the signals that stopped jobs
        self.alone: list[BaseException] = []  # failures other processes may not know of
        self.crashed: list[Path] = []  # jobs that raised an unforeseen error (exit 1)
        self.jobs: list[Path] = []  # a sweep's job directories, in the order they ran
        # what this command did with a sweep's job, when it did not run it
        self.outcome: dict[Path, str] = {}

    def one_job(self, cfg) -> None:
        """Hydra's task function: one job, from its composed config to its closing lines."""
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        sweep = hc.mode == RunMode.MULTIRUN
        run_dir = Path(hc.runtime.output_dir)
        label = f"{job_dirname(hc.job.override_dirname) or 'the defaults'}: " if sweep else ""
        if sweep:
            self.jobs.append(run_dir)
        if main_process():  # (armed again after the job before: a sweep's next one)
            self.early.arm(f"sae-shards: {label}stopped by {{signal}} before training began; "
                           + ("continue the sweep with the same command and resume=true"
                              if sweep else how_to_continue(run_dir)))
        else:
            self.early.arm()
        if self.fresh is not None:  # the directories Hydra made for this run, deepest first
            made = run_dir.resolve()
            self.early.remove_if_empty = [str(d) for d in (made, *made.parents)
                                          if d == self.fresh or self.fresh in d.parents]
        said = len(self.failures)
        speak_as_rank()  # Hydra configured this job's logging
        _warn_unused_lora(hc.overrides.task, bool(cfg.model.lora.enabled))
        job = self._job(cfg, hc, run_dir, label, sweep)
        if job is not None:
            self._run(job, cfg, run_dir, label, sweep)
        if self.jobs and len(self.failures) > said:  # refused, stopped or failed: said after
            self.outcome.setdefault(self.jobs[-1], "not run to its end by this command "
                                                   "(see below)")

    def _job(self, cfg, hc, run_dir: Path, label: str, sweep: bool):
        """This job's validated config, or None (said in ``failures`` or printed) when it does
        not run: refused, a sweep stopped, or a sweep's job finished earlier."""
        from sae_shards.run import rundir
        from sae_shards.run.job import check_same_settings

        try:
            job = job_config_from_hydra(cfg)
        except ConfigError as e:
            self.failures.append(f"{label}config error: {e}{self.resume_hint}")
            return None
        job = dataclasses.replace(job, run_dir=str(run_dir))
        if sweep:  # one W&B group per sweep, and each job's run a name of its own
            named = job.logging
            job = dataclasses.replace(job, logging=dataclasses.replace(
                named, group=named.group or Path(hc.sweep.dir).name,
                name=named.name and f"{named.name}-{run_dir.name}"))
        elif job.resume and job.logging.group is None:  # a sweep's job resumed on its own
            job = dataclasses.replace(job, logging=dataclasses.replace(
                job.logging, group=recorded_group(run_dir)))
        if not sweep:
            return job
        if self.interrupted:  # a signal stops the whole sweep, not only its current job
            self.failures.append(f"{run_dir}: not started (the sweep was stopped); continue "
                                 "the sweep with the same command and resume=true")
            return None
        if self.alone:  # a failure the other processes may not know of: they may be
            # inside that job still (or may have failed the same way: not known here)
            self.failures.append(
                f"{run_dir}: not started (a job failed on this process in a way the launch's "
                "other processes may not have learnt of, and they may still be inside it); "
                "continue the sweep with the same command and resume=true")
            return None
        if not job.resume:
            return job
        # resume a sweep: skip finished jobs, start unstarted ones
        done = rundir.finished_steps(run_dir)
        if done is not None:
            try:  # a finished job of these settings, not another job's run in its place
                check_same_settings(job, run_dir, (
                    "A sweep's resume skips a finished job only when its directory holds "
                    "that job's run; give the sweep a new run_dir"))
            except ValueError as e:
                self.failures.append(f"{label}not skipped: {e}")
                return None
            if main_process():  # (every rank skips it)
                print(f"sae-shards: {run_dir} finished ({done} RL steps) earlier: skipped")
            self.outcome[run_dir] = "finished earlier: skipped"
            return None
        # never started, named otherwise, or stopped before its first checkpoint was whole:
        # started from the beginning (what it wrote is replaced: nothing of it resumes)
        resume, overwrite = rundir.auto_resume(run_dir, with_trl=True)
        if not resume:
            if main_process():
                print(f"sae-shards: {run_dir}: no checkpoint of this job in the sweep ("
                      + ("it stopped before its first checkpoint was written whole: what it "
                         "wrote is replaced" if overwrite else "it never started, or the "
                         "earlier command named it otherwise") + "): started from the beginning")
            job = dataclasses.replace(job, resume=False, overwrite=overwrite)
        return job

    def _run(self, job, cfg, run_dir: Path, label: str, sweep: bool) -> None:
        """Run the job; each way it can end short is said in ``failures`` (a signal's stop is
        also kept in ``interrupted``), and rank 0 prints a finished job's closing lines."""
        from sae_shards.capture.distributed import StoppedWithAnotherRank
        from sae_shards.capture.runner import SAEWorkerError
        from sae_shards.capture.signals import StoppedBeforeTraining
        from sae_shards.core.checkpoint import CheckpointError
        from sae_shards.run.job import JobSetupError, RefusedOnRankZero, run_job
        from sae_shards.run.rundir import RunWriteError

        self.early.disarm()  # run_job's own guards from here
        try:
            summary = run_job(job, run_dir, hydra_files=hydra_files(cfg))
        except (RefusedOnRankZero, StoppedWithAnotherRank):  # the rank that refused says why
            self.failures.append("")
            return
        except JobSetupError as e:
            self._failed_alone(e)
            # the run directory's refusals advise overwrite=true: show what the run started as
            again = rerun_command(run_dir) if "overwrite=true" in str(e) else None
            self.failures.append(
                f"{label}cannot {'resume' if job.resume else 'start'}: {e}"
                + (f" (to start it again with its own settings, deleting what it holds: "
                   f"{again})" if again else ""))
            return
        except RunWriteError as e:
            self._failed_alone(e)
            self.failures.append(f"{label}stopped: {e.what}; "
                                 f"{how_to_continue(run_dir, 'free space (or fix permissions)')}")
            return
        except CheckpointError as e:  # a resume's checkpoint, read as training begins
            self._failed_alone(e)
            self.failures.append(f"{label}cannot resume: {e}")
            return
        except SAEWorkerError as e:  # the SAE failed or hung: RL was stopped, not left blocked
            self._failed_alone(e)
            self.failures.append(f"{label}stopped: {e}; {how_to_continue(run_dir)}")
            return
        except StoppedBeforeTraining as e:
            self.failures.append(f"{label}stopped by {signal.Signals(e.signum).name} before "
                                 f"training began; {how_to_continue(run_dir)}")
            self.interrupted.append(e.signum)
            return
        except KeyboardInterrupt as e:  # a second signal (SecondSignal), or Ctrl-C outside
            self.failures.append(f"{label}stopped at once by a second signal; "
                                 f"{how_to_continue(run_dir)}")
            self.interrupted.append(getattr(e, "signum", signal.SIGINT))
            return
        except Exception as e:  # unforeseen: a sweep's other jobs still run, each failure named
            if not sweep:
                raise
            logging.getLogger("sae_shards.cli").exception("the job failed")  # into its cli.log
            if several_processes():  # the other processes may wait in this job's
                # collectives: end this one (Hydra goes on after an Exception, not after
                # SystemExit), so that the launcher ends theirs
                raise SystemExit(1) from e
            self.failures.append(f"{label}failed: {type(e).__name__}: {e} (the traceback is "
                                 f"in {run_dir / 'cli.log'})")
            self.crashed.append(run_dir)
            return
        if summary is None or "rank" in summary:  # a rank other than 0: rank 0 reports
            if summary and summary.get("interrupted"):  # ... but every rank exits as stopped
                self.interrupted.append(summary["stop_signal"] or signal.SIGTERM)
            return
        print("\n".join(closing_lines(summary, run_dir)))
        if summary.get("interrupted"):
            self.interrupted.append(summary["stop_signal"] or signal.SIGTERM)

    def _failed_alone(self, e: BaseException) -> None:
        """Under a launch, a job failure the other processes may not have learnt of (not told
        by ``begin_together`` or rank 0's setup broadcast) ends a sweep after that job:
        the next job's collectives would not match those the other processes are still in."""
        from sae_shards.capture.distributed import every_rank_knows

        if several_processes() and not every_rank_knows(e):
            self.alone.append(e)

    def finish(self, fresh: Path | None) -> int:
        """After the last job: remove the directories Hydra made for nothing, say the sweep's
        table and every failure, and give the exit code."""
        # Hydra made the run's (each job's) directory: one refused at its config, or a job
        # that never started, leaves none (every rank may try: one removal is enough)
        for made in ([fresh] if fresh is not None else []) + self.jobs:
            if made.is_dir() and not any(p.is_file() for p in made.rglob("*")):
                shutil.rmtree(made, ignore_errors=True)
                _drop_file_handlers(made)
        # every rank says its own failures (one rank may fail alone: a model.path missing on
        # one node), each other rank's labelled as its
        said_by = "sae-shards" if main_process() else f"sae-shards (rank {this_rank()})"
        if len(self.jobs) > 1 and main_process():
            print("\n".join(_sweep_lines(self.jobs, self.outcome)))
        for msg in filter(None, self.failures):
            print(f"{said_by}: {msg}", file=sys.stderr)
        if self.interrupted:  # the shell's convention for a process ended by a signal
            return 128 + int(self.interrupted[0])
        return 1 if self.crashed else 2 if self.failures else 0


def _sweep_lines(jobs: list[Path], outcome: dict[Path, str]) -> list[str]:
    """The end of a sweep: each job's directory and how it ended, from its ``summary.json``,
    unless this command did not run it (``outcome``: skipped as finished earlier, or refused,
    stopped or failed, which the messages after say): another run's figures there (a numbered
    directory's) are not this job's."""
    from sae_shards.run import rundir

    lines = [f"sweep of {len(jobs)} jobs in {jobs[0].parent}:"]
    for d in jobs:
        if d in outcome:
            lines.append(f"  {d.name}: {outcome[d]}")
            continue
        s = rundir.read_summary(d)
        how = ("interrupted" if s.get("interrupted") else "finished") if s else \
            "no summary.json (see below)"
        lines.append(f"  {d.name}: {how}" + (
            f", {s.get('rl_steps')} RL steps, reward {_figure(s, 'reward_first')} -> "
            f"{_figure(s, 'reward_last')}, fvu {_figure(s, 'fvu_first')} -> "
            f"{_figure(s, 'fvu_last')}"
            if s else ""))
    return lines
