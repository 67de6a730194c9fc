#!/usr/bin/env bash
# The measurements of one nvidia-h200-x2 lease (2 H200s), run from the repo root on the device machine:
#   #10  GRPO `rlswift verify-resume` on the GPU with deterministic=true (full: SIGKILL, kill during a save;
#        LoRA: SIGTERM) and the step-time cost of deterministic kernels, rlswift vs TRL colocate (one GPU each lane)
#   #11  torchrun + FSDP2 over NCCL: verify-resume 2 -> 2 (rank 1 killed), 2 -> 1 and 1 -> 2 GPUs
#   #14  the remote engine on GPU 1 (weights over NCCL), sync and one-step-async, vs TRL's server mode; async
#        verify-resume on the two GPUs
# usage:
#   bash scripts/gpu/x2_plan.sh prep                 session.sh unpack + setup (pieces, wheels, model), prompts
#   bash scripts/gpu/x2_plan.sh dist [d22 d21 d12]   #11 with the HF engine (needs no vLLM), in the foreground
#   bash scripts/gpu/x2_plan.sh start END_EPOCH [PLAN]  the vLLM jobs in the background (setsid); phases that
#                                                    cannot finish before END_EPOCH are skipped. PLAN: `plan` (the
#                                                    lease of 2026-11-30 morning, default) or `plan2` (the next one:
#                                                    #15's shared-prompt / packing A/B on the GPU, then #11's vLLM
#                                                    per rank across a kill and #14's async split)
#   bash scripts/gpu/x2_plan.sh collect SECONDS      wait up to SECONDS for the background jobs; results -> $OUT/res.tgz
# Every job writes /tmp/res/NAME.log and a line in /tmp/res/summary.txt (exit code, seconds, verdict).
set -u
stage=${1:?stage}; shift
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
R=/tmp/res; mkdir -p $R
M=/tmp/qwen05b-rand P=/tmp/anchor_prompts.jsonl
source scripts/gpu/env.sh

# The 0.5B workload of the GPU bench, shortened for verify runs (64 tokens; a checkpoint every step).
GRPO05=(model=$M dataset=$P "reward_funcs=[bench_rewards.length_reward]" prompts_per_step=8 num_generations=8
        max_completion_length=64 max_prompt_length=128 temperature=1.0 learning_rate=1e-5 beta=0 loss_type=dapo
        precision=bf16-mixed gradient_checkpointing=true vllm.gpu_memory_utilization=0.3 save_steps=1
        deterministic=true)
# The tiny model with the HF engine under torchrun: the NCCL/FSDP2/DCP path without vLLM.
TINY=(model=tiny engine=hf prompts_per_step=4 num_generations=4 max_completion_length=16 save_steps=1)

job() {  # NAME CMD...: run, log, one summary line with the verdict
  local name=$1; shift; local t=$(date +%s)
  echo "[$(date +%T)] start $name" >> $R/summary.txt
  "$@" > $R/$name.log 2>&1; local rc=$?
  local verdict=$(grep -h -E "^verify-resume: (IDENTICAL|DIVERGED|EQUIVALENT)|^FAIL" $R/$name.log | tail -1 | cut -c1-60)
  echo "[$(date +%T)] $name rc=$rc $(( $(date +%s) - t ))s $verdict" >> $R/summary.txt
}
verify() {  # NAME ARGS...: rlswift verify-resume in /tmp/verify-NAME
  local name=$1; shift
  job $name python3 -m rlswift verify-resume --workdir /tmp/verify-$name "$@"
  grep -E "^  (ok  |DIFF)" $R/$name.log | cut -c1-200 >> $R/summary.txt
}
bench() {  # NAME ARGS...: scripts/bench_grpo_gpu.py on the 0.5B model (8 steps), its table in the summary
  local name=$1; shift
  job $name python3 scripts/bench_grpo_gpu.py --model $M --steps 8 --out /tmp/bench-$name --timeout 240 "$@"
  sed -n '/^== GRPO/,$p' $R/$name.log >> $R/summary.txt
}
left() { echo $(( END - $(date +%s) )); }
# The engine on GPU 1 (weights over NCCL), the trainer on GPU 0.
REMOTE="engine=remote remote.cuda_visible_devices=1 device=cuda:0"
remote_bench() {  # NAME SIDES: sync and one-step-async rlswift with the remote engine (+ any other sides)
  bench "$1" --order "$2" --variant remote "$REMOTE" --variant remote_async "$REMOTE async_generation=true"
}
dist_vllm() {  # the 0.5B model under torchrun on both GPUs, one vLLM per rank, both ranks SIGKILLed in step 3
  verify v_dist_vllm --recipe grpo --steps 4 --kill-at 3 --nproc 2 "${GRPO05[@]}" vllm.enforce_eager=true
}

case $stage in
  prep)  # session.sh's unpack + setup (each call may carry one more vLLM piece), then the verify runs' prompts
    bash scripts/gpu/session.sh unpack && bash scripts/gpu/session.sh setup
    [ -f $P ] || python3 -c "import json, bench_rewards as b; open('$P', 'w').writelines(json.dumps(r) + '\n' for r in b.anchor_prompts())"
    python3 -c "import torch, rlswift; print('torch', torch.__version__, 'gpus', torch.cuda.device_count())" ;;
  dist)  # [NAME...] (default all): 4 steps each; the tiny model keeps each run to seconds
    for d in ${@:-d22 d21 d12}; do case $d in
      d22) verify d22 --recipe grpo --steps 4 --kill-at 3 --nproc 2 --rank 1 "${TINY[@]}" ;;
      d21) verify d21 --recipe grpo --steps 4 --kill-at 3 --nproc 2 --resume-nproc 1 "${TINY[@]}" ;;
      d12) verify d12 --recipe grpo --steps 4 --kill-at 3 --nproc 1 --resume-nproc 2 "${TINY[@]}" ;;
    esac; done
    cat $R/summary.txt ;;
  start)
    END=${1:?END_EPOCH}
    echo "[$(date +%T)] plan start; $(left)s left" >> $R/summary.txt
    # From a copy: the next calls re-send the working tree, and bash reads a script while it runs it.
    rm -rf /tmp/repo && mkdir /tmp/repo && cp -a rlswift rollout recipes scripts tests pyproject.toml /tmp/repo/
    (cd /tmp/repo && setsid nohup bash scripts/gpu/x2_plan.sh "${2:-plan}" "$END" > $R/plan.log 2>&1 < /dev/null &)
    echo "background plan started" ;;
  plan)  # (the background part) phase A: one lane per GPU
    END=${1:?END_EPOCH}
    ( export CUDA_VISIBLE_DEVICES=0
      verify v_full_kill --recipe grpo --steps 4 --kill-at 3 "${GRPO05[@]}"
      verify v_full_save --recipe grpo --steps 4 --kill-at 3 --during-save "${GRPO05[@]}" vllm.enforce_eager=true ) &
    ( export CUDA_VISIBLE_DEVICES=1
      verify v_lora_term --recipe grpo --steps 4 --kill-at 3 --signal TERM "${GRPO05[@]}" lora.rank=16 \
        vllm.enforce_eager=true
      bench b_colocate --order rlswift,nodet,trl --variant nodet "deterministic=false" ) &
    wait
    # phase B: the engine on GPU 1, the trainer on GPU 0; TRL's server mode the same way
    [ $(left) -gt 420 ] && remote_bench b_remote remote,remote_async,trl_server
    # phase C: async verify-resume across the two GPUs; then vLLM under torchrun on both
    [ $(left) -gt 200 ] && verify v_async_kill --recipe grpo --steps 4 --kill-at 3 "${GRPO05[@]}" $REMOTE \
      async_generation=true vllm.enforce_eager=true
    [ $(left) -gt 240 ] && dist_vllm
    echo "[$(date +%T)] plan done" >> $R/summary.txt ;;
  plan2)  # phase A, one lane per GPU: #15's A/B of the shared-prompt forward and packed completions vs TRL colocate
    END=${1:?END_EPOCH}
    ( export CUDA_VISIBLE_DEVICES=0
      bench ab_gc --order rlswift,noshare,nopack,trl --variant noshare "shared_prompt=false" \
        --variant nopack "pack_completions=false" ) &
    ( export CUDA_VISIBLE_DEVICES=1
      bench ab_nogc --no-gc --order rlswift,noshare,trl --variant noshare "shared_prompt=false" ) &
    wait
    # phase B, both GPUs: #11 vLLM per rank under torchrun across a kill, bit for bit; #14 the async split with the
    # server's own generation time (timing.engine_generate)
    [ $(left) -gt 240 ] && dist_vllm
    [ $(left) -gt 300 ] && remote_bench b_remote2 remote,remote_async
    echo "[$(date +%T)] plan done" >> $R/summary.txt ;;
  collect)
    t=$(date +%s)
    while [ $(( $(date +%s) - t )) -lt ${1:?SECONDS} ] && ! grep -q "plan done" $R/summary.txt; do sleep 5; done
    cat $R/summary.txt
    tar czf "$OUT/res.tgz" -C /tmp --exclude='checkpoint-*' --exclude='anchor_prompts.jsonl' \
      --exclude='trajectories.jsonl' res \
      $(cd /tmp && ls -d verify-* bench-* 2>/dev/null) ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
