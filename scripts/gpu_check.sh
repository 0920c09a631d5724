#!/usr/bin/env bash
# The GPU check (issue 14): run it from the repo root on a machine with a CUDA GPU.
#
#   bash scripts/gpu_check.sh              # the tests marked gpu (CPU and CUDA cases) and the
#                                          # Qwen2.5-0.5B-shaped overhead benchmark on the GPU
#   bash scripts/gpu_check.sh --cpu-smoke  # CPU only (any machine): the CPU cases and the
#                                          # --tiny benchmark
#   OUT=report.md bash scripts/gpu_check.sh
#
# On a GPU it also runs `sae-shards train` under `accelerate launch --use_fsdp --fsdp_version 2`
# (one process): TRL's FSDP2 path, which accelerate does not run on CPUs; and under
# `--use_deepspeed --zero_stage 3` (one process; 2 CPU processes run in tests/test_distributed.py).
#
# Writes one markdown file ($OUT, default gpu_check.md; a relative path is taken from the
# directory it is started in, not the repo's): the date, the GPU, torch/CUDA versions,
# the pytest summary line and the benchmark table (what goes into docs/benchmarks.md). Without
# --cpu-smoke it stops at once, non-zero, when no CUDA device is usable. It exits non-zero when a
# test or the benchmark fails, after writing the file. Assumes a CUDA build of torch is
# installed; installs the project (pip install -e ".[dev]") only when sae_shards, pytest or
# pytest-xdist cannot be imported. Meant to finish in under 8 minutes on one H200-class GPU (not
# yet timed on one): the benchmark is stopped after $BENCH_TIMEOUT seconds (default 420).
#
# Environment: PYTHON (default python), OUT, BENCH_TIMEOUT, PYTEST_ARGS (default "-m gpu tests/";
# e.g. "-m gpu tests/test_gpu.py -k buffer" to rerun a part), BENCH_ARGS (extra arguments and
# Hydra overrides for scripts/bench_gpu_overhead.py, e.g. "--steps 40").
set -euo pipefail
CALLER_DIR="$PWD"
cd "$(dirname "$0")/.."

die() { echo "gpu_check: $*" >&2; exit 1; }

SMOKE=0
case "${1:-}" in
    "") ;;
    --cpu-smoke) SMOKE=1 ;;
    *) die "unknown argument '$1'; usage: bash scripts/gpu_check.sh [--cpu-smoke]" ;;
esac
[[ $# -le 1 ]] || die "one argument at most; usage: bash scripts/gpu_check.sh [--cpu-smoke]"
[[ $SMOKE == 0 ]] || export CUDA_VISIBLE_DEVICES=""  # CPU only, on any machine
PY="${PYTHON:-python}"
OUT="${OUT:-gpu_check.md}"
[[ $OUT == /* ]] || OUT="$CALLER_DIR/$OUT"  # as the caller named it
BENCH_TIMEOUT="${BENCH_TIMEOUT:-420}"
read -r -a PYTEST_ARGS <<<"${PYTEST_ARGS:--m gpu tests/}"
read -r -a BENCH_ARGS <<<"${BENCH_ARGS:-}"
NO_GPU="this check needs a CUDA GPU; on a machine without one run: bash scripts/gpu_check.sh --cpu-smoke"

# ---- 1. the machine ----------------------------------------------------------------------------
"$PY" -c "import torch" 2>/dev/null \
    || die "'$PY' cannot import torch: install a CUDA build of torch first (pytorch.org), then rerun"
if [[ $SMOKE == 0 ]]; then
    command -v nvidia-smi >/dev/null || die "nvidia-smi not found (no NVIDIA driver): $NO_GPU"
    nvidia-smi -L >/dev/null 2>&1 || die "nvidia-smi finds no GPU: $NO_GPU"
    "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" || die \
        "torch $("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)') \
sees no CUDA device (torch.cuda.is_available() is False): install a CUDA build of torch; $NO_GPU"
fi
"$PY" -c "import sae_shards, pytest, xdist" 2>/dev/null || "$PY" -m pip install -e ".[dev]"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
VERSIONS="$("$PY" - "$SMOKE" <<'EOF'
import platform, sys
import torch
gpu = "none (--cpu-smoke)" if sys.argv[1] == "1" else torch.cuda.get_device_name()
print(f"- GPU: {gpu}")
print(f"- torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}, "
      f"Python {platform.python_version()}")
EOF
)"
DRIVER=""
if [[ $SMOKE == 0 ]]; then
    DRIVER="- nvidia-smi: $(nvidia-smi --query-gpu=name,driver_version,memory.total \
        --format=csv,noheader | head -1)"
fi

# ---- 2. the tests marked gpu ---------------------------------------------------------------------
echo "== $PY -m pytest -q ${PYTEST_ARGS[*]}"
set +e
# -n 0: one process (the suite's default is 2 xdist workers): the tests share the one GPU in turn
# and the summary line counts the deselected tests
"$PY" -m pytest -q -n 0 -p no:cacheprovider "${PYTEST_ARGS[@]}" 2>&1 | tee "$WORK/pytest.log"
TESTS_RC=${PIPESTATUS[0]}
set -e
SUMMARY="$(grep -E '[0-9]+ (passed|failed|error|errors|skipped|xfailed|xpassed|deselected)' \
    "$WORK/pytest.log" | tail -1 | sed -E 's/^=+ //; s/ =+$//' || true)"

# ---- 2b. FSDP2 and DeepSpeed ZeRO-3 through accelerate (TRL's route), one process --------------
# accelerate shards with FSDP only on accelerators, so this is the one place TRL's FSDP2 path runs
# (tests/test_distributed.py covers fully_shard on 2 CPU processes without TRL, and ZeRO-3 with TRL
# on 2 CPU processes); ZeRO-3 runs here on CUDA. Both per step and per prompt group (per-event
# capture under FSDP2 runs nowhere else).
launched_train() {  # launched_train NAME LAUNCH-FLAGS...: sae-shards train, 4 steps, per step and
    local name="$1"; shift  # per prompt group; sets RESULT
    local gran rc=0
    for gran in step group; do
        set +e
        "$PY" -m accelerate.commands.launch "$@" --num_processes 1 --num_machines 1 \
            --mixed_precision no --dynamo_backend no \
            -m sae_shards.cli train rl.max_steps=4 logging=disabled runner.min_samples=2 \
            capture.granularity="$gran" run_dir="$WORK/$name-$gran" >>"$WORK/$name.log" 2>&1 \
            && "$PY" - "$WORK/$name-$gran" "$gran" >>"$WORK/$name.log" 2>&1 <<'EOF'
import json, sys
from pathlib import Path
from sae_shards.core.checkpoint import load_checkpoint
run, granularity = Path(sys.argv[1]), sys.argv[2]
summary = json.loads((run / "summary.json").read_text())
assert summary["rl_steps"] == 4, summary["rl_steps"]
if granularity == "step":
    assert summary["captured"] == 4, summary["captured"]
else:  # one sample per prompt group, every one of them recorded in events.jsonl
    events = (run / "events.jsonl").read_text().splitlines()
    assert summary["captured"] == summary["events"] == len(events) > 0, summary
load_checkpoint(run / "checkpoints" / "final")
print(f"ok ({granularity}): {summary['captured']} samples captured, shards load")
EOF
        rc=$?
        set -e
        [[ $rc == 0 ]] || break
    done
    if [[ $rc == 0 ]]; then
        RESULT="passed (4 GRPO steps each: 4 sharded deltas gathered and captured; per prompt group, every event captured; shards load)"
    else
        RESULT="FAILED ($gran, exit code $rc); last lines:"$'\n\n```\n'"$(tail -30 "$WORK/$name.log")"$'\n```'
    fi
}
FSDP2="skipped (--cpu-smoke: accelerate runs FSDP on GPUs only)"
ZERO3="skipped (--cpu-smoke: tests/test_distributed.py runs ZeRO-3 on CPU processes)"
if [[ $SMOKE == 0 ]]; then
    echo "== sae-shards train under accelerate launch --use_fsdp --fsdp_version 2 (1 process)"
    launched_train fsdp2 --use_fsdp --fsdp_version 2 \
        --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP --fsdp_reshard_after_forward true \
        --fsdp_state_dict_type SHARDED_STATE_DICT
    FSDP2="$RESULT"
    echo "== sae-shards train under accelerate launch --use_deepspeed --zero_stage 3 (1 process)"
    launched_train zero3 --use_deepspeed --zero_stage 3 --zero3_init_flag false \
        --offload_optimizer_device none --offload_param_device none --gradient_clipping 1.0
    ZERO3="$RESULT"
fi

# ---- 3. the overhead benchmark -------------------------------------------------------------------
BENCH=(-m scripts.bench_gpu_overhead)
[[ $SMOKE == 0 ]] || BENCH+=(--tiny)
BENCH+=("${BENCH_ARGS[@]}")
echo "== $PY ${BENCH[*]}  (stopped after ${BENCH_TIMEOUT} s)"
set +e
timeout "$BENCH_TIMEOUT" "$PY" "${BENCH[@]}" --out "$WORK/bench.md" 2>&1 | tee "$WORK/bench.log"
BENCH_RC=${PIPESTATUS[0]}
set -e
if [[ $BENCH_RC == 0 && -s "$WORK/bench.md" ]]; then
    TABLE="$(cat "$WORK/bench.md")"
elif [[ $BENCH_RC == 124 ]]; then
    TABLE="Not measured: the benchmark was stopped after ${BENCH_TIMEOUT} s (BENCH_TIMEOUT)."
else
    TABLE="Not measured: the benchmark failed (exit code $BENCH_RC); its last lines:"$'\n\n```\n'
    TABLE+="$(tail -30 "$WORK/bench.log")"$'\n```'
fi

# ---- 4. the report -------------------------------------------------------------------------------
{
    echo "# GPU check ($([[ $SMOKE == 1 ]] && echo "CPU smoke run" || echo "CUDA"))"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "$VERSIONS"
    [[ -z $DRIVER ]] || echo "$DRIVER"
    echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(
        git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "- tests (\`python -m pytest -q ${PYTEST_ARGS[*]}\`, exit code $TESTS_RC): ${SUMMARY:-no summary line}"
    echo "- benchmark (\`python ${BENCH[*]}\`, exit code $BENCH_RC)"
    echo "- FSDP2 via accelerate (\`sae-shards train\`, per step and per group): $FSDP2"
    echo "- DeepSpeed ZeRO-3 via accelerate (\`sae-shards train\`, per step and per group): $ZERO3"
    echo
    echo "## Overhead benchmark"
    echo
    echo "$TABLE"
    if [[ $TESTS_RC != 0 ]]; then
        echo
        echo "## Test failures (last lines of the pytest log)"
        echo
        echo '```'
        tail -60 "$WORK/pytest.log"
        echo '```'
    fi
} >"$OUT"
echo "gpu_check: wrote $OUT (tests: ${SUMMARY:-no summary}; benchmark exit code $BENCH_RC)"
[[ $TESTS_RC == 0 && $BENCH_RC == 0 && $FSDP2 != FAILED* && $ZERO3 != FAILED* ]] || exit 1
