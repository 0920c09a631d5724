"""A failing environment met for real, not simulated: a full disk (a real file-size limit on the
process, RLIMIT_FSIZE, so every write past it fails with EFBIG as a full disk fails with ENOSPC)
and directories the user cannot write. ``sae-shards train`` stops with one line naming the path
and what to run next, never a traceback from torch or Hydra."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

TINY = ["rl.max_steps=4", "runner.checkpoint_every=2", "runner.min_samples=2",
        "runner.sae_steps_per_rl_step=1", "task.n_prompts=32", "logging=disabled"]


def _train_with_file_limit(run: Path, limit_bytes: int, *extra: str) -> subprocess.CompletedProcess:
    def limit() -> None:  # in the child only: no file of its may grow past limit_bytes
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails (EFBIG), as on ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run(  # stdout/stderr are pipes: the limit does not cut the message
        [sys.executable, "-m", "sae_shards.cli", "train", f"run_dir={run}", *TINY, *extra],
        capture_output=True, text=True, timeout=300, preexec_fn=limit)


def test_a_full_disk_in_trls_checkpoint_names_it_instead_of_a_torch_traceback(tmp_path):
    """The tiny model's weights (~370 KB) fit under the limit, TRL's optimizer state (~770 KB,
    torch.save) does not: the failure is inside transformers' _save_checkpoint, where torch
    reports it as ``[enforce fail at inline_container.cc] ... unexpected pos``."""
    run = tmp_path / "run"
    done = _train_with_file_limit(run, 500 * 1024)
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"sae-shards: stopped: could not write {run / 'trl' / 'checkpoint-2'}" in done.stderr
    assert "Traceback" not in done.stderr and "Error executing job" not in done.stderr
    # before its first complete checkpoint there is nothing to resume: start again instead
    assert "nothing can be resumed" in done.stderr and "overwrite=true" in done.stderr


def test_a_full_disk_in_a_scripts_run_says_how_a_script_resumes(tmp_path):
    """In a user's own TRL script the failed write comes out of trainer.train(): its message
    said 'then resume with resume=true', sae-shards train's override, which a script has not."""
    from sae_shards.recipe.models import build_tiny_model

    model = build_tiny_model(tmp_path / "tiny")
    run = tmp_path / "run"

    def limit() -> None:  # TRL's checkpoint (~370 + ~770 KB) fits, sae-shards' resume file not
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (900 * 1024, 900 * 1024))

    example = Path(__file__).parents[1] / "docs" / "examples" / "trl_script.py"
    done = subprocess.run([sys.executable, str(example), "--model", str(model), "--run-dir",
                           str(run), "--steps", "12"], capture_output=True, text=True,
                          timeout=300, preexec_fn=limit)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"sae_shards.run.rundir.RunWriteError: could not write {run}"), last
    assert ("then resume with ShardCallback(..., resume=True) and "
            "trainer.train(resume_from_checkpoint=True)") in last
    assert "resume=true" not in last


def test_every_hook_of_the_callback_words_a_failed_write_for_a_script():
    from sae_shards.capture.callback import ShardCallback

    hooks = {name: fn for name, fn in vars(ShardCallback).items() if name.startswith("on_")}
    assert len(hooks) >= 8 and all(getattr(fn, "in_script_terms", False)
                                   for fn in hooks.values()), hooks


def test_a_full_disk_before_the_first_step_names_the_file_and_the_same_command(tmp_path):
    run = tmp_path / "run"
    done = _train_with_file_limit(run, 1024)  # the .hydra config (~2 KB) does not fit
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"sae-shards: stopped: could not write {run / '.hydra'}" in done.stderr
    assert "File too large" in done.stderr and "run the same command again" in done.stderr
    assert "Traceback" not in done.stderr


def _as_a_plain_user() -> list[str]:
    """A prefix that runs a command without root's power to ignore permission bits."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("root, and no setpriv to drop its capabilities: permissions cannot bite")
    return ["setpriv", "--bounding-set=-all", "--inh-caps=-all"]


def _cli_as_a_plain_user(*calls: list[str]) -> list[tuple[int, str]]:
    """Each of ``calls`` given to ``sae-shards`` in turn, in one subprocess run as a plain user
    (one interpreter start, ~7 s, for them all): each call's exit status and its stderr."""
    script = ("import contextlib, io, json, sys\n"
              "from sae_shards.cli import main\n"
              "said = []\n"
              "for args in json.loads(sys.argv[1]):\n"
              "    err = io.StringIO()\n"
              "    with contextlib.redirect_stderr(err):\n"
              "        said.append([main(args), err.getvalue()])\n"
              "print(json.dumps(said))\n")
    done = subprocess.run([*_as_a_plain_user(), sys.executable, "-c", script, json.dumps(calls)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [(rc, err) for rc, err in json.loads(done.stdout.strip().splitlines()[-1])]


@pytest.mark.parametrize("where", ["parent", "itself"])
def test_an_unwritable_run_dir_is_a_config_error_naming_it(tmp_path, where):
    """A run_dir inside a read-only directory (Hydra's mkdir raised a traceback), or an existing
    read-only run_dir (refused as 'stopped ... resume with resume=true', of a run that never
    started): refused before anything starts, naming the directory."""
    folder = tmp_path / "shared"
    folder.mkdir()
    run = folder / "run" if where == "parent" else folder
    folder.chmod(0o555)
    try:
        done = subprocess.run(
            [*_as_a_plain_user(), sys.executable, "-m", "sae_shards.cli", "train",
             f"run_dir={run}", *TINY], capture_output=True, text=True, timeout=120)
    finally:
        folder.chmod(0o755)
    assert done.returncode == 2, done.stderr[-3000:]
    assert (f"sae-shards: config error: run_dir={run} cannot be written: {folder} is not "
            "writable") in done.stderr
    assert "Traceback" not in done.stderr
    assert list(folder.iterdir()) == []


def test_a_scripts_callback_on_an_unwritable_run_dir_says_so_as_the_cli_does(tmp_path):
    """ShardCallback(run_dir=...) where nothing can be written raised mkdir's bare OSError
    ('[Errno 13] Permission denied', or for a path under /proc '[Errno 2] No such file'); now a
    PermissionError names run_dir and why, as sae-shards train's config error does."""
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(0o555)
    script = ("from sae_shards import ShardCallback\n"
              "try:\n    ShardCallback(run_dir={!r})\n"
              "except PermissionError as e:\n    print(e)\n")
    try:
        done = subprocess.run([*_as_a_plain_user(), sys.executable, "-c",
                               script.format(str(folder / "run"))],
                              capture_output=True, text=True, timeout=120)
    finally:
        folder.chmod(0o755)
    assert (f"run_dir={folder / 'run'} cannot be written: {folder} is not writable by this user"
            ) in done.stdout, done.stdout + done.stderr[-2000:]
    assert list(folder.iterdir()) == []
    from sae_shards import ShardCallback

    with pytest.raises(PermissionError, match=r"run_dir=/proc/no/run cannot be written: "
                                              r"(nothing can be created in /proc \(No such file "
                                              r"or directory\)|/proc is not writable by this "
                                              r"user \(permission denied\)); give a run_dir"):
        ShardCallback(run_dir="/proc/no/run")  # as root, or not


def test_analyze_on_a_read_only_run_says_so_first_and_points_at_out(tmp_path, short_run_dir):
    """A finished run on a read-only shared filesystem: analyze failed only once the whole
    analysis was done, when report.html could not be written, advising 'resume with
    resume=true'. Now it says so before anything is computed, with the way out (--out)."""
    run = tmp_path / "run"
    shutil.copytree(short_run_dir, run)
    for folder in [run, *(p for p in run.rglob("*") if p.is_dir())]:
        folder.chmod(0o555)
    out = tmp_path / "elsewhere" / "report.html"
    try:
        (rc, err), (rc_out, err_out) = _cli_as_a_plain_user(
            ["analyze", str(run), "--no-dose"],
            ["analyze", str(run), "--no-dose", "--out", str(out)])
    finally:
        for folder in [run, *(p for p in run.rglob("*") if p.is_dir())]:
            folder.chmod(0o755)
    assert rc == 2, err[-3000:]
    assert (f"sae-shards: cannot analyze {run}: the report cannot be written to {run}: "
            f"{run} is not writable") in err
    assert "--out DIR/report.html" in err and "resume=true" not in err
    assert rc_out == 0, err_out[-3000:]
    assert out.is_file() and (out.parent / "analysis.json").is_file()


def test_a_file_in_the_way_of_a_run_dir_or_an_out_is_refused_first(tmp_path, short_run_dir,
                                                                    capsys):
    """Audit 130: a run_dir that is a file, or lies under one, ended in Hydra's traceback (exit
    1); analyze --out under a file ran the whole analysis, then failed in a traceback; evaluate
    --out FILE ran the whole evaluation, then advised freeing space. Each is refused before
    anything runs, naming the file, which is left as it was."""
    from sae_shards.cli import main
    from sae_shards.run.rundir import unwritable

    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    for run_dir in (notes, notes / "run"):
        assert main(["train", f"run_dir={run_dir}", *TINY]) == 2
        err = capsys.readouterr().err
        assert (f"config error: run_dir={run_dir} cannot be written: {notes} is a file, not a "
                "directory; give a run_dir where you can write") in err, err
        assert "Traceback" not in err and "permissions" not in err
    # run_dir= given twice: Hydra takes the last, and so do the checks before it (audit 129)
    assert main(["train", f"run_dir={tmp_path / 'fine'}", f"run_dir={notes}", *TINY]) == 2
    assert f"run_dir={notes} cannot be written" in capsys.readouterr().err
    assert main(["analyze", str(short_run_dir), "--no-dose", "--out",
                 str(notes / "report.html")]) == 2
    assert (f"the report cannot be written to {notes}: {notes} is a file, not a directory"
            in capsys.readouterr().err)
    assert main(["evaluate", str(short_run_dir), "--no-steering", "--out", str(notes)]) == 2
    assert (f"its evaluation cannot be written: {notes} is a file, not a directory"
            in capsys.readouterr().err)
    assert notes.read_text() == "mine\n"
    # where nothing can be created although the permission bits allow it (/proc, as root)
    if Path("/proc/self").is_dir():
        assert unwritable(Path("/proc/sae-shards-run/x")) is not None
    assert unwritable(tmp_path / "new" / "run") is None and not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # the probe is gone


def test_evaluate_on_a_read_only_run_says_so_first_and_points_at_out(tmp_path, short_run_dir):
    """The same for evaluate, which had no --out: a read-only run could not be evaluated. With
    --out elsewhere the run is only read; a --null-run, whose evaluation goes into it, must be
    writable too (audit 129)."""
    run, null, writable = tmp_path / "run", tmp_path / "null", tmp_path / "writable"
    for copy_ in (run, null, writable):
        shutil.copytree(short_run_dir, copy_)
    run.chmod(0o555)
    null.chmod(0o555)
    try:
        said = _cli_as_a_plain_user(
            ["evaluate", str(run), "--no-steering"],
            ["evaluate", str(run), "--no-steering", "--out", str(tmp_path / "elsewhere")],
            ["evaluate", str(writable), "--no-steering", "--null-run", str(null)])
    finally:
        run.chmod(0o755)
        null.chmod(0o755)
    (rc, err), (rc_out, err_out), (rc_null, err_null) = said
    assert rc == 2, err[-3000:]
    assert (f"sae-shards: cannot evaluate {run}: its evaluation cannot be written: {run} is not "
            "writable") in err
    assert "write it elsewhere with --out DIR" in err and "Traceback" not in err
    # past the write check to what evaluate says next of this run: it has one task
    assert rc_out == 2 and "cannot be written" not in err_out
    assert "is a task=letters run (one task)" in err_out, err_out[-3000:]
    assert rc_null == 2
    assert f"its evaluation cannot be written: {null} is not writable" in err_null, err_null


def test_a_full_disk_during_analyzes_report_keeps_the_previous_one_and_leaves_no_half(
        tmp_path, short_run_dir):
    """The report is written under a temporary name: a full disk left that half-written
    temporary (.report.html.tmpXXXX) taking space, and advised resuming a finished run."""
    run = tmp_path / "run"
    shutil.copytree(short_run_dir, run)
    (run / "report.html").write_text("the previous report")

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))

    done = subprocess.run([sys.executable, "-m", "sae_shards.cli", "analyze", str(run),
                           "--no-dose"], capture_output=True, text=True, timeout=120,
                          preexec_fn=limit)
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"sae-shards: cannot analyze {run}: could not write {run / 'report.html'}" in done.stderr
    assert "--out DIR/report.html" in done.stderr and "resume=true" not in done.stderr
    assert (run / "report.html").read_text() == "the previous report"
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name]


def test_analyze_of_a_run_another_process_is_writing_says_so(tmp_path, short_run_dir):
    """analyze of a run still training read a checkpoint whose TRL policy the run then rotated
    away (save_total_limit=2), and the report left out the logit lens and dose-response,
    blaming save_model=False or a crash. It now says up front that the run is live."""
    from sae_shards.run import rundir

    run = tmp_path / "run"
    shutil.copytree(short_run_dir, run)
    rundir.lock_run_dir(run)  # this process is the run's writer, as a training job would be
    try:
        done = subprocess.run([sys.executable, "-m", "sae_shards.cli", "analyze", str(run),
                               "--no-dose"], capture_output=True, text=True, timeout=120)
    finally:
        rundir.release_run_dir(run)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"sae-shards: note: {run} is still being written (pid {os.getpid()} on" in done.stderr
    # the report goes into the run, which removes it when it ends (audit 131 F4)
    assert "the run removes this report when it ends (it describes an earlier state): --out " \
        "DIR/report.html elsewhere keeps it" in done.stderr
    rundir.lock_run_dir(run)  # compare says it too (audit 134 F7), of the side that is live
    try:
        done = subprocess.run([sys.executable, "-m", "sae_shards.cli", "compare",
                               str(short_run_dir), str(run), "--top", "1"],
                              capture_output=True, text=True, timeout=120)
    finally:
        rundir.release_run_dir(run)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"sae-shards: note: B, {run}, is still being written (pid {os.getpid()} on" \
        in done.stderr and "note: A," not in done.stderr
    assert rundir.live_writer(run) is None  # released: a finished run gets no note


def test_resume_into_a_read_only_checkpoint_folder_names_the_file(tmp_path):
    """Resuming removes the checkpoints written after the step it resumes from; in a folder
    the user cannot write (a run copied from a shared location) that ended in a bare
    PermissionError traceback from deep in the callback. _remove_later is run as a plain user on
    real permission bits."""
    run = tmp_path / "run"
    (run / "resume").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    (run / "resume" / "step_000012.safetensors").write_bytes(b"")
    (run / "resume").chmod(0o555)
    code = ("from pathlib import Path; from sae_shards.capture import resume; "
            "from sae_shards.run.rundir import RunWriteError\n"
            "try:\n"
            f"    resume._remove_later(Path({str(run)!r}), 8)\n"
            "except RunWriteError as e:\n"
            "    print('RunWriteError:', e.what)\n")
    try:
        done = subprocess.run([*_as_a_plain_user(), sys.executable, "-c", code],
                              capture_output=True, text=True, timeout=60)
    finally:
        (run / "resume").chmod(0o755)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (f"RunWriteError: could not write {run / 'resume' / 'step_000012.safetensors'}: "
            "Permission denied") in done.stdout


def test_the_next_write_of_a_report_removes_what_a_killed_writer_left(tmp_path):
    """A ``kill -9`` of analyze while it wrote left ``.report.html.tmpXXXX`` beside the report
    until a train took the run directory. The temporary name now says which process wrote it,
    and the next write of the same file removes a dead writer's; a live writer's, another
    host's and one of an unknown writer stay."""
    import socket

    from sae_shards.run.rundir import leftovers, write_text

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = int(gone.stdout)  # a process that has exited
    host = socket.gethostname()
    left = {name: tmp_path / name for name in (
        f".report.html.tmp-{host}-{dead}-k1ll3d",   # the killed analyze's half
        f".report.html.tmp-{host}-{os.getpid()}-l1ve",  # a live writer's
        f".report.html.tmp-elsewhere-{dead}-n0tme",  # another host's (a shared filesystem)
        ".report.html.tmpx7q2",  # written by an earlier version: whose, unknown
        f".analysis.json.tmp-{host}-{dead}-0th3r")}  # another file's: its own next write
    for path in left.values():
        path.write_text("half")
    assert set(leftovers(tmp_path)) == set(left.values())  # a train's cleanup takes them all
    write_text(tmp_path / "report.html", "<html></html>")
    kept = {p.name for p in tmp_path.iterdir()}
    assert kept == {"report.html", *list(left)[1:]}, kept
    assert (tmp_path / "report.html").read_text() == "<html></html>"
