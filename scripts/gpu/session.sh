#!/usr/bin/env bash
# GPU lease driver (run from the repo root on the device machine). usage: bash scripts/gpu/session.sh STAGE [ARGS]
#   unpack            move carried .gpu pieces aside; unpack vLLM once all are there (scripts/gpu/unpack-on-gpu)
#   setup             wheels from .whl into /tmp/site2, the 0.5B-shaped model into /tmp/qwen05b-rand, versions
#   bench ARGS...     scripts/bench_grpo_gpu.py --model /tmp/qwen05b-rand ARGS...
#   verify NAME ARGS  rlswift verify-resume on the GPU (workdir /tmp/verify-NAME; logs back in $OUT/verify-NAME.tgz)
#   run CMD...        any command in the prepared environment
# Every stage writes what it prints to $OUT/<stage>.log too.
set -u
stage=${1:?stage}; shift
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
M=/tmp/qwen05b-rand
env_up() { source scripts/gpu/env.sh; }
case $stage in
  unpack) bash scripts/gpu/unpack-on-gpu .gpu 2>&1 | tee -a "$OUT/unpack.log" ;;
  setup)
    env_up
    [ -d /tmp/site2/trl ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site2 .whl/*.whl 2>&1 | tail -3
    python3 -m pip list 2>/dev/null | grep -i -E "^(pyarrow|transformers|torch|peft|accelerate|vllm|trl|datasets|numpy) " | tee "$OUT/versions.txt"
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv | tee -a "$OUT/versions.txt"
    [ -f $M/config.json ] || python3 scripts/gpu/trl_anchor/build_model.py $M --tokenizer-from scripts/gpu/trl_anchor > "$OUT/build.log" 2>&1
    grep -E "^model params|^saved" "$OUT/build.log" | cut -c1-200
    python3 -c "import vllm, rlswift, trl; print('vllm', vllm.__version__, 'trl', trl.__version__)" 2>&1 | tail -1 ;;
  bench)  # results and logs (not checkpoints) come back as $OUT/bench.tgz
    env_up; python3 scripts/bench_grpo_gpu.py --model $M --out /tmp/bench "$@" 2>&1 | tee -a "$OUT/bench.log"
    tar czf "$OUT/bench.tgz" -C /tmp/bench --exclude='checkpoint-*' --exclude=anchor_prompts.jsonl . ;;
  verify)  # NAME ARGS...: workdir /tmp/verify-NAME; logs and run files (not checkpoints) in $OUT/verify-NAME.tgz
    name=$1; shift; env_up
    python3 -m rlswift verify-resume --workdir /tmp/verify-$name "$@" 2>&1 | tee -a "$OUT/verify.log"
    tar czf "$OUT/verify-$name.tgz" -C /tmp --exclude='checkpoint-*' verify-$name ;;
  run) env_up; "$@" 2>&1 | tee -a "$OUT/run.log" ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
