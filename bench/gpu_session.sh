#!/usr/bin/env bash
# One lease on the GPU machine, as few calls as possible (device time is scarce): the
# GPU tests, the real-model matrix and the model tables, logs and results under $OUT.
#
#   bash bench/gpu_session.sh check            # tests + matrix (parallel), then BERT table
#   bash bench/gpu_session.sh matrix [M [SYS]] # all GPU tests beside the full matrix, then M
#   bash bench/gpu_session.sh models M [SYS]   # the model table for model M
#   bash bench/gpu_session.sh floor [MODELS]   # the host's floor (bench/floor.py), then
#                                              # the GPU tests
#   bash bench/gpu_session.sh warm [MODELS]    # warm restart (bench/warm_restart.py);
#                                              # BASELINE=DIR: also another checkout's
#
#   bash bench/gpu_session.sh stalls [MODEL]   # bench/stalls.py cold, then warm on its
#                                              # store: who ran during each slow call
#   bash bench/gpu_session.sh streams [MODELS] # bench/validation_streams.py: serving
#                                              # beside validations, per stream
#   bash bench/gpu_session.sh generate         # tests/integration/test_generate.py
#   bash bench/gpu_session.sh gaps [MODEL]     # bench/call_gaps.py cold, then warm: the
#                                              # time between calls no call timer sees
#
# SIZES, ITERS, MIN_WARMUP_S, SETTLE_S and BUDGET_S (seconds for the call) shorten a run;
# STALL_MS, SECONDS_PER_RUN, WARM_SECONDS and WARM_RUNS set stalls' threshold, lengths
# and warm starts; STALL_ARGS adds arguments (--no-cudnn-sdp), STALL_TAG names the logs,
# STALL_STORE keeps the store for another call of stalls; MODELS_ARGS adds arguments to
# bench/models.py (--no-cudnn-sdp), GAPS_ARGS to bench/call_gaps.py (--profile-load 30).
# Needs: the machine's python3 (torch + CUDA, transformers), wheels for what it lacks
# in .whl/ (watchdog, pytest-timeout; see bench/README.md). Every step is bounded by
# `timeout` so that a call ends inside the device's 600 s limit with its logs.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD"
start=$(date +%s)
left() { echo $(( ${BUDGET_S:-570} - ($(date +%s) - start) )); }

# The machine's Python runs with PYTHONDONTWRITEBYTECODE: every process would compile
# torch's source on import (warm restarts of 4.9 s instead of 1.9 s on 2026-12-04), and
# a background import's compile() holds the GIL for a whole module (a cold BERT start
# on 2026-12-05: the loader's set-up compiled setuptools' modules under serving calls);
# a deployment has its bytecode, so it is compiled once first (~11 s on 16 cores), and
# every bench that times serving calls runs after it.
compile_bytecode() {
    unset PYTHONDONTWRITEBYTECODE
    for m in torch triton transformers sympy setuptools; do
        d=$(python3 -c "import $m, os; print(os.path.dirname($m.__file__))") &&
            python3 -m compileall -q -j 0 "$d" >/dev/null 2>&1
    done
    python3 -m compileall -q -j 0 /tmp/site pwdaemon ${BASELINE:-} >/dev/null 2>&1
}

models_table() {  # model, systems
    timeout "$(left)" python3 bench/models.py --device cuda --dtype fp16 --preset issue \
        --models "$1" --systems "$2" --sizes "${SIZES:-1,4,16,64}" --iters "${ITERS:-50}" \
        --min-warmup "${MIN_WARMUP_S:-20}" --settle-timeout "${SETTLE_S:-240}" \
        --run-timeout 300 --jsonl "$OUT/models.jsonl" --out "$OUT/results" ${MODELS_ARGS:-} \
        2>&1 | tee -a "$OUT/models.log"
}

case "${1:-check}" in
check)
    { nvidia-smi -L; python3 -c 'import torch, transformers, triton;
print(torch.__version__, torch.version.cuda, transformers.__version__, triton.__version__)'
    nproc; } 2>&1 | tee "$OUT/env.txt"
    timeout 330 python3 -m pytest tests/integration/test_cudagraph.py -v -s -p no:cacheprovider \
        -o addopts="--strict-markers" >"$OUT/gpu_tests.log" 2>&1 &
    timeout 330 python3 bench/matrix.py --device cuda --dtype fp16 --preset issue \
        --timeout 200 >"$OUT/matrix.log" 2>&1 &
    wait
    tail -5 "$OUT/gpu_tests.log"
    tail -9 "$OUT/matrix.log"
    models_table bert "${2:-eager,static,whole_graph,pwdaemon}"
    ;;
diag)  # the GPU tests with stacks on timeout and the engine's log, beside the matrix
    timeout 280 python3 -m pytest tests/integration/test_cudagraph.py -v -s -rA --tb=short \
        -p no:cacheprovider -o addopts="--strict-markers" --timeout "${TEST_TIMEOUT:-80}" \
        -o log_cli=true --log-cli-level=INFO -k "${TESTS:-not padding}" \
        >"$OUT/gpu_tests.log" 2>&1 &
    timeout 280 python3 bench/matrix.py --device cuda --dtype fp16 --preset issue \
        --models "${MATRIX:-sequential,bert}" --timeout 150 >"$OUT/matrix.log" 2>&1 &
    wait
    grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/gpu_tests.log" | tail -12
    tail -6 "$OUT/matrix.log"
    [ -n "${2:-}" ] && models_table "$2" "${3:-pwdaemon}"
    ;;
final)  # the model tables for BERT and Llama, with the GPU tests beside them
    timeout "$(left)" python3 -m pytest tests/integration/test_cudagraph.py -v -s -rA \
        --tb=short -p no:cacheprovider -o addopts="--strict-markers" --timeout 100 \
        >"$OUT/gpu_tests.log" 2>&1 &
    models_table bert,llama "${2:-eager,static,pwdaemon}"
    wait
    grep -E "PASSED|FAILED|ERROR|passed|failed|capture pauses|graph memory" \
        "$OUT/gpu_tests.log" | tail -14
    ;;
matrix)  # every GPU test (transformers ones included) beside the full model matrix
    timeout 500 python3 -m pytest tests/integration/test_cudagraph.py -v -s -rA --tb=short \
        -p no:cacheprovider -o addopts="--strict-markers" --timeout "${TEST_TIMEOUT:-240}" \
        >"$OUT/gpu_tests.log" 2>&1 &
    OMP_NUM_THREADS=2 timeout 520 python3 bench/matrix.py --device cuda --dtype fp16 \
        --preset issue --models "${MATRIX:-sequential,transformer_encoder,bert,gpt2,llama}" \
        --jobs 5 --timeout 200 >"$OUT/matrix.log" 2>&1 &
    MHA_FASTPATH=off OMP_NUM_THREADS=2 timeout 520 python3 bench/matrix.py --device cuda \
        --dtype fp16 --preset issue --models transformer_encoder --timeout 200 \
        >"$OUT/matrix_te_no_fastpath.log" 2>&1 &
    wait
    tail -2 "$OUT/matrix_te_no_fastpath.log"
    grep -E "PASSED|FAILED|ERROR|passed|failed|capture pauses|graph memory" \
        "$OUT/gpu_tests.log" | tail -14
    tail -9 "$OUT/matrix.log"
    [ -n "${2:-}" ] && models_table "$2" "${3:-eager,static,pwdaemon}"
    ;;
models)
    compile_bytecode
    models_table "$2" "${3:-eager,dynamic,static,whole_graph,pwdaemon,pwdaemon_warm}"
    ;;
stalls)  # each slow call's tier, the serving thread's CPU, and who else ran; cold, then warm
    compile_bytecode
    store=${STALL_STORE:-$(mktemp -d)}
    mkdir -p "$store"
    # WARM_RUNS warm starts on the one store: their slow calls come and go between runs.
    # A STALL_STORE that holds a cold run's artifacts already: warm starts only.
    runs="$(printf 'warm%s ' $(seq 1 "${WARM_RUNS:-1}"))"
    [ -z "$(ls -A "$store")" ] && runs="cold $runs"
    for run in $runs; do
        seconds=${SECONDS_PER_RUN:-60}
        [ "$run" != cold ] && seconds=${WARM_SECONDS:-$seconds}
        timeout "$(left)" python3 bench/stalls.py --device cuda --dtype fp16 --preset issue \
            --model "${2:-bert}" --seconds "$seconds" \
            --stall-ms "${STALL_MS:-10}" --store "$store" --stacks ${STALL_ARGS:-} \
            2>&1 | tee "$OUT/stalls_$run${STALL_TAG:-}.log"
    done
    ;;
gaps)  # bench/call_gaps.py: cold (to its plan), then WARM_RUNS warm starts on its store
    compile_bytecode
    store=$(mktemp -d)
    runs="cold $(printf 'warm%s ' $(seq 1 "${WARM_RUNS:-2}"))"
    for run in $runs; do
        timeout "$(left)" python3 bench/call_gaps.py --device cuda --dtype fp16 \
            --preset issue --model "${2:-bert}" --store "$store" \
            --seconds "${WARM_SECONDS:-8}" $([ "$run" = cold ] && echo --cold) ${GAPS_ARGS:-} \
            2>&1 | tee "$OUT/gaps_${2:-bert}_$run.log"
    done
    ;;
streams)  # serving calls beside validations: on the engine's stream, on the serving one
    compile_bytecode
    for m in $(echo "${2:-bert,llama}" | tr , " "); do
        timeout "$(left)" python3 bench/validation_streams.py --device cuda --dtype fp16 \
            --preset issue --model "$m" --seconds "${SECONDS_PER_RUN:-10}" \
            --rounds "${ROUNDS:-2}" 2>&1 | tee -a "$OUT/validation_streams.log"
    done
    ;;
generate)  # transformers' generate() on attached GPT-2 and Llama (CPU; this torch), INFO log
    timeout "$(left)" python3 -m pytest tests/integration/test_generate.py -v -rA --tb=short \
        -p no:cacheprovider -o addopts="--strict-markers" -o log_level=INFO \
        >"$OUT/generate.log" 2>&1
    grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/generate.log" | tail -6
    ;;
floor)  # the host's floor (bench/floor.py: pure Python, eager on the GPU), then the GPU tests
    for m in $(echo "${2:-llama,bert}" | tr , " "); do
        timeout "$(left)" python3 bench/floor.py --device cuda --preset issue --dtype fp16 \
            --model "$m" --threads "${THREADS:-1,16}" --repeat "${REPEAT:-1}" \
            2>&1 | tee -a "$OUT/floor.log"
    done
    timeout "$(left)" python3 -m pytest tests/integration/test_cudagraph.py -v -s -rA \
        --tb=short -p no:cacheprovider -o addopts="--strict-markers" --timeout 120 \
        >"$OUT/gpu_tests.log" 2>&1
    grep -E "PASSED|FAILED|ERROR|passed|failed|capture pauses|graph memory" \
        "$OUT/gpu_tests.log" | tail -14
    ;;
warm)  # seconds from attach to every size specialized: cold, warm, warm traced, prewarmed
    compile_bytecode
    timeout "$(left)" python3 bench/warm_restart.py --device cuda \
        --models "${2:-demo,llama,bert}" --repeat "${REPEAT:-2}" --verbose \
        ${BASELINE:+--baseline "$BASELINE"} 2>&1 | tee "$OUT/warm_restart.log"
    ;;
esac
echo "call took $(( $(date +%s) - start )) s"
