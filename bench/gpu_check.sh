#!/usr/bin/env bash
# One-call GPU check of xpdeploy, with a CPU fallback (docs/benchmarks.md, "One-call GPU check").
#
#   bench/gpu_check.sh OUT_DIR
#
# Made for a GPU machine lent for a few minutes (one NVIDIA H200, CUDA and PyTorch, onnxruntime on
# CPU, NO TensorRT, no network, xpdeploy not pip-installed): it runs from a copy of this repository
# with PYTHONPATH=<repo>, under 8 minutes, and writes every result under OUT_DIR. Where torch sees
# no GPU it runs the same parts on the CPU with smaller sizes (under 5 minutes on 2 cores).
#
# Parts (each under its own `timeout`; every part runs even when an earlier one failed):
#   pytest      `pytest -m gpu tests`: what runs without TensorRT (tests that need it skip
#               themselves); junit XML + log. On a CPU every test reports its skip.
#   quickstart  `xpdeploy run pipelines/quickstart.yaml` with `--set train.amp=auto --set
#               learn_masks.amp=auto --set finetune.amp=auto` (bf16 autocast on a GPU that has it;
#               the device is xpdeploy.distributed.device(): cuda:0 when torch sees a GPU). Its
#               top-1 figures, wall time and stage times. CPU: 6 + 2 + 3 epochs (train, masks,
#               fine-tune) instead of 40 + 6 + 20, accuracy floors off.
#   latency     bench/gpu_latency.py: torch latency of a real DeiT-Tiny (224 px, random init) vs
#               the same pruned to 50% of its MACs by xpdeploy's planner and surgery, and of the
#               quickstart's original vs pruned model: CUDA events, interleaved, warm-up, p10/p50/
#               p90 and the speedup; batch 1 and 64 in fp32 and bf16 (CPU: batch 1 and 8, fp32).
#   nccl        `python -m torch.distributed.run --standalone --nproc_per_node=1 -m xpdeploy run`
#               of the torchrun test's pipeline (train, prune, finetune; tests/test_torchrun.py),
#               plus bench/gpu_nccl.py's probe of the backend xpdeploy picks (nccl on a GPU, gloo
#               on a CPU: "CPU fallback: gloo in place of NCCL"). One process under torchrun
#               joins a group of one, so train and finetune take their distributed path (DDP,
#               broadcasts) on NCCL; the probe runs the collectives directly as well.
#
# Output layout (OUT_DIR holds these 8 files and nothing else, flat, so that it can be copied back
# whole from a lent machine; the run folders go to a scratch folder, WORK below):
#   summary.json     machine-readable result (keys below)
#   summary.md       the same for people: device, one row per part, latency table, notes
#   pytest.xml       junit XML of `pytest -m gpu`           pytest.log      its output
#   quickstart.log   `xpdeploy run` output, then `xpdeploy show` of the run folder
#   latency.json     bench/gpu_latency.py's result           latency.log     its output
#   nccl.log         both torchrun commands' output (the probe's line: "gpu_nccl probe: {json}")
#
# summary.json (schema 1; times in seconds):
#   schema, kind ("xpdeploy-gpu-check"), status ("pass" | "fail"), exit_code (0 | 1),
#   started (UTC ISO time), wall_s (the whole check), device ("cuda" | "cpu"), device_name (the
#   GPU, or the CPU model in the fallback), capability, bf16_supported, driver, torch, cuda
#   (torch's CUDA version), tensorrt (null: not installed), python, python_cmd, fallback (true
#   when device is "cpu"), smoke, missing_modules (modules xpdeploy imports that are not there),
#   work_dir (the run folders), notes (list of strings),
#   parts: {pytest, quickstart, latency, nccl}, each:
#     status     "pass" | "fail" | "skip" (skip: not selected, or pytest's every test skipped)
#     wall_s, timeout_s, exit_code, log (file name in OUT_DIR), files (files in OUT_DIR it wrote),
#     note (why it failed or skipped, what the fallback changed; null when nothing to say),
#     numbers    pytest: tests, passed, failed, errors, skipped, skip_reasons, failed_tests;
#                quickstart: top1_original, top1_one_shot, top1_finetuned (%), gmacs_original,
#                  gmacs_pruned, report_status, stage_s {stage: s}, train / finetune {device, amp,
#                  processes, epochs, global_batch}, speedups_cpu (verify's, onnxruntime/torch on
#                  the CPU), overrides, run_dir;
#                latency: device_name, settings, models (plans: heads, mlp, GMACs), rows [{model,
#                  dtype, batch, original_{p10,p50,p90}_ms, pruned_{p10,p50,p90}_ms, speedup,
#                  speedup_spread}];
#                nccl: pipeline_exit, pipeline_passed, pipeline_backend (the group's backend,
#                  "none" if no group was joined), pipeline_processes, train {device, ...},
#                  probe_exit, probe
#                  {backend, device, nccl, ok, init_ms, collectives_ms, group_threads_left, ...}.
# Exit code: 0 when no part failed, 1 when one did (or the summary could not be written),
# 2 on a usage error.
#
# Environment:
#   PYTHON                        the python to run everything with (default python3)
#   XPDEPLOY_GPU_CHECK_WORK       scratch folder for run folders (default: a new mktemp -d folder);
#                                 kept afterwards, named in summary.json's work_dir
#   XPDEPLOY_GPU_CHECK_WHEELS     folder of wheels to install first (pip --no-index --no-deps
#                                 --target WORK/site; default <repo>/.whl when it has any). The H200
#                                 image has no pydantic and no onnxsim: bring pydantic,
#                                 pydantic-core, annotated-types, typing-inspection and onnxsim
#                                 for its Python (3.12), or most parts fail on import.
#   XPDEPLOY_GPU_CHECK_SMOKE=1    shrink every part further (tests/bench/test_gpu_check.py)
#   XPDEPLOY_GPU_CHECK_PARTS      comma-separated parts to run (default all); the others "skip"
#   XPDEPLOY_GPU_CHECK_FAIL       comma-separated parts to fail on purpose (tests of the failure
#                                 path: the part runs `false` instead of its command)
#   CUDA_VISIBLE_DEVICES=         (empty) forces the CPU fallback on a GPU machine
#
# Timeouts (s), GPU / CPU: wheels 30 (only when there are wheels), device probe 20, pytest 75 / 40,
# quickstart 165 / 110, latency 80 / 45, nccl 60 / 70, summary 20 / 10: at most 450 s on the GPU
# machine and 295 s on a CPU even if every part ran into its limit (each killed 10 s after its
# TERM at worst).

set -u

usage() {
    echo "usage: bench/gpu_check.sh OUT_DIR  (one GPU check; see the header of this script)" >&2
}

# ---------------------------------------------------------------------------------------------
# Parts: each runs as `bash gpu_check.sh __part NAME` under `timeout`, output to its log, with
# OUT, WORK, PY, REPO, SMOKE and DEVICE exported by the main script.
# ---------------------------------------------------------------------------------------------

part_pytest() {
    local files=(tests)
    if [[ $SMOKE == 1 ]]; then  # only the files that hold gpu tests: collection takes seconds
        mapfile -t files < <(grep -rl --include='*.py' 'pytest.mark.gpu' tests | sort)
    fi
    echo "+ $PY -m pytest -m gpu ${files[*]}"
    exec "$PY" -m pytest -m gpu -p no:cacheprovider -q --continue-on-collection-errors \
        --junitxml="$OUT/pytest.xml" "${files[@]}"
}

part_quickstart() {
    local args=(--set train.amp=auto --set learn_masks.amp=auto --set finetune.amp=auto)
    # Fewer epochs train a model below the published floors (95% top-1): floors off there.
    local floors_off=(--set verify.gates.min_top1=null --set verify.pruned_gates.min_top1=null
                      --set verify.pruned_gates.max_top1_drop=null)
    if [[ $SMOKE == 1 ]]; then  # seconds per stage: the pipeline's plumbing, not its accuracy
        args+=(--set train.epochs=2 --set train.max_images=512 --set learn_masks.epochs=1
               --set learn_masks.max_images=256 --set finetune.epochs=1
               --set finetune.max_images=512 --set load.evaluate=false
               --set "verify.batch_sizes=[1]" --set verify.warmup=1 --set verify.iters=3
               --set verify.rounds=1 --set report.plots=false "${floors_off[@]}")
    elif [[ $DEVICE != cuda ]]; then  # 2 CPU cores: ~50 s (the full run: ~2 min)
        args+=(--set train.epochs=6 --set learn_masks.epochs=2 --set finetune.epochs=3
               "${floors_off[@]}")
    fi
    printf '%s\n' "${args[@]}" > "$WORK/quickstart.args"
    echo "+ $PY -m xpdeploy run pipelines/quickstart.yaml --run-dir $WORK/quickstart --force ${args[*]}"
    "$PY" -m xpdeploy run pipelines/quickstart.yaml --run-dir "$WORK/quickstart" --force "${args[@]}"
    local rc=$?
    echo "== xpdeploy run exit code: $rc"
    echo "+ $PY -m xpdeploy show $WORK/quickstart"
    "$PY" -m xpdeploy show "$WORK/quickstart"
    return $rc
}

part_latency() {
    local args=(--out "$OUT/latency.json" --quickstart-run "$WORK/quickstart")
    if [[ $SMOKE == 1 ]]; then
        args+=(--batches 1,2 --warmup 1 --iters 2 --rounds 1)
    fi
    echo "+ $PY bench/gpu_latency.py ${args[*]}"
    exec "$PY" bench/gpu_latency.py "${args[@]}"
}

part_nccl() {
    "$PY" bench/gpu_nccl.py pipeline "$WORK/nccl" || return 1
    local run=("$PY" -m torch.distributed.run --standalone --nproc_per_node=1)
    echo "+ ${run[*]} -m xpdeploy run $WORK/nccl/p.yaml --run-dir $WORK/nccl/run --force"
    "${run[@]}" -m xpdeploy run "$WORK/nccl/p.yaml" --run-dir "$WORK/nccl/run" --force
    local rc1=$?
    echo "== xpdeploy run exit code: $rc1"
    echo "+ ${run[*]} bench/gpu_nccl.py probe --out $WORK/nccl/probe.json"
    "${run[@]}" bench/gpu_nccl.py probe --out "$WORK/nccl/probe.json"
    local rc2=$?
    echo "== probe exit code: $rc2"
    [[ $rc1 == 0 && $rc2 == 0 ]]
}

if [[ ${1:-} == __part ]]; then
    cd "$REPO" || exit 1
    "part_$2"
    exit $?
fi

# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    sed -n '2,/^set -u/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 0
fi
if [[ $# -ne 1 || -z ${1:-} || ${1:-} == -* ]]; then
    usage
    exit 2
fi

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
REPO="$(cd "$(dirname "$SELF")/.." && pwd)"
mkdir -p "$1" || { echo "error: cannot create OUT_DIR $1" >&2; exit 2; }
OUT="$(cd "$1" && pwd)"
PY="${PYTHON:-python3}"
SMOKE="${XPDEPLOY_GPU_CHECK_SMOKE:-0}"
PARTS="${XPDEPLOY_GPU_CHECK_PARTS:-pytest,quickstart,latency,nccl}"
FAIL="${XPDEPLOY_GPU_CHECK_FAIL:-}"
WORK="${XPDEPLOY_GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/xpdeploy-gpu-check.XXXXXX")}"
mkdir -p "$WORK" && WORK="$(cd "$WORK" && pwd)" || { echo "error: cannot create $WORK" >&2; exit 2; }
STARTED="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
now() {  # seconds since the epoch, fractional (bash >= 5; else date), with a decimal point
    local t=${EPOCHREALTIME:-$(date +%s.%N)}
    echo "${t/,/.}"
}
T0=$(now)
cd "$REPO" || exit 2

rm -f "$OUT"/{summary.json,summary.md,pytest.xml,pytest.log,quickstart.log,latency.json,latency.log,nccl.log}
rm -f "$WORK/parts.tsv" "$WORK/env.json" "$WORK/quickstart.args"
: > "$WORK/setup.log"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

seconds_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# Wheels that the machine lacks (pydantic, onnxsim on the H200), installed into WORK/site.
WHEELS="${XPDEPLOY_GPU_CHECK_WHEELS:-$REPO/.whl}"
if compgen -G "$WHEELS/*.whl" > /dev/null; then
    echo "installing the wheels of $WHEELS into $WORK/site"
    if timeout 30 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$WORK/site" "$WHEELS"/*.whl >> "$WORK/setup.log" 2>&1; then
        export PYTHONPATH="$PYTHONPATH:$WORK/site"
    else
        echo "warning: installing the wheels failed (see $WORK/setup.log)"
    fi
fi

DEVICE="$(timeout 20 "$PY" bench/gpu_summary.py env "$WORK/env.json" 2>> "$WORK/setup.log" | tail -n 1)"
if [[ $DEVICE != cuda && $DEVICE != cpu ]]; then
    echo "warning: $PY could not report the device (see $WORK/setup.log); using CPU sizes"
    DEVICE=cpu
fi
if [[ $DEVICE == cuda ]]; then
    declare -A LIMIT=([pytest]=75 [quickstart]=165 [latency]=80 [nccl]=60 [summary]=20)
else
    declare -A LIMIT=([pytest]=40 [quickstart]=110 [latency]=45 [nccl]=70 [summary]=10)
fi
export OUT WORK PY REPO SMOKE DEVICE
echo "xpdeploy GPU check: device $DEVICE, python $PY, smoke $SMOKE, out $OUT, work $WORK"

run_part() {  # NAME LOG: run one part under its timeout and append its line to WORK/parts.tsv
    local name=$1 log=$2 state=ran rc t0
    if [[ ",$PARTS," != *",$name,"* ]]; then
        printf '%s\tskip\t0\t0.0\t%s\t\n' "$name" "${LIMIT[$name]}" >> "$WORK/parts.tsv"
        echo "[$name] skipped (not in XPDEPLOY_GPU_CHECK_PARTS)"
        return
    fi
    echo "[$name] running (timeout ${LIMIT[$name]} s, log $OUT/$log)"
    t0=$(now)
    if [[ ",$FAIL," == *",$name,"* ]]; then
        state=injected
        echo "failure injected (XPDEPLOY_GPU_CHECK_FAIL=$FAIL)" > "$OUT/$log"
        timeout "${LIMIT[$name]}" false
        rc=$?
    else
        timeout --kill-after=10 "${LIMIT[$name]}" bash "$SELF" __part "$name" > "$OUT/$log" 2>&1
        rc=$?
    fi
    local wall
    wall=$(seconds_since "$t0")
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$state" "$rc" "$wall" "${LIMIT[$name]}" "$log" \
        >> "$WORK/parts.tsv"
    echo "[$name] exit $rc in $wall s"
}

run_part pytest pytest.log
run_part quickstart quickstart.log
run_part latency latency.log
run_part nccl nccl.log

json_str() {  # a JSON string literal of $1 (backslashes and quotes escaped)
    local s=${1//\\/\\\\}
    printf '"%s"' "${s//\"/\\\"}"
}

minimal_summary() {  # when the summary writer itself failed: exit codes alone, from the shell
    local first=1 name state rc wall limit log status
    {
        printf '{\n  "schema": 1,\n  "kind": "xpdeploy-gpu-check",\n  "status": "fail",\n'
        printf '  "exit_code": 1,\n  "started": "%s",\n  "wall_s": %s,\n' "$STARTED" "$(seconds_since "$T0")"
        printf '  "device": "unknown",\n  "device_name": null,\n  "capability": null,\n'
        printf '  "bf16_supported": null,\n  "driver": null,\n  "torch": null,\n  "cuda": null,\n'
        printf '  "tensorrt": null,\n  "python": null,\n  "missing_modules": [],\n'
        printf '  "python_cmd": %s,\n  "fallback": %s,\n  "smoke": %s,\n' "$(json_str "$PY")" \
            "$([[ $DEVICE == cuda ]] && echo false || echo true)" \
            "$([[ $SMOKE == 1 ]] && echo true || echo false)"
        printf '  "work_dir": %s,\n' "$(json_str "$WORK")"
        printf '  "notes": [%s],\n' "$(json_str "the summary writer failed (see $WORK/summary.log): this summary comes from exit codes alone")"
        printf '  "parts": {'
        while IFS=$'\t' read -r name state rc wall limit log; do
            status=fail
            [[ $state == skip ]] && status=skip
            [[ $state == ran && $rc == 0 ]] && status=pass
            [[ $first == 1 ]] || printf ','
            first=0
            printf '\n    "%s": {"status": "%s", "wall_s": %s, "timeout_s": %s, "exit_code": %s, ' \
                "$name" "$status" "$wall" "$limit" "$rc"
            if [[ -n $log ]]; then
                printf '"log": "%s", "files": ["%s"], ' "$log" "$log"
            else
                printf '"log": null, "files": [], '
            fi
            printf '"numbers": {}, "note": null}'
        done < "$WORK/parts.tsv"
        printf '\n  }\n}\n'
    } > "$OUT/summary.json"
    {
        echo "# xpdeploy GPU check: FAIL"
        echo
        echo "The summary writer failed (see $WORK/summary.log); exit codes per part:"
        echo
        while IFS=$'\t' read -r name state rc wall limit log; do
            echo "- $name: $state, exit $rc, $wall s, log ${log:--}"
        done < "$WORK/parts.tsv"
    } > "$OUT/summary.md"
}

WALL=$(seconds_since "$T0")
timeout "${LIMIT[summary]}" "$PY" bench/gpu_summary.py write "$OUT" "$WORK" --started "$STARTED" \
    --wall "$WALL" --smoke "$SMOKE" --python "$PY" > "$WORK/summary.log" 2>&1
VERDICT="$(tail -n 1 "$WORK/summary.log")"
if [[ $VERDICT != "status: pass" && $VERDICT != "status: fail" ]]; then
    minimal_summary
    VERDICT="status: fail"
fi
echo
cat "$OUT/summary.md"
echo "summary: $OUT/summary.json ($VERDICT, $(seconds_since "$T0") s)"
[[ $VERDICT == "status: pass" ]]
