# Sourced by the GPU lease drivers (session.sh, x2_plan.sh): the environment every GPU job runs in.
# NVLink multicast stays off (the device tool's rule for shared hosts); vLLM from the unpacked payload (/tmp/site),
# carried wheels (/tmp/site2), the repo and the benchmark's reward module on the path; vLLM in-process.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
[ -f /tmp/gpu-env ] && source /tmp/gpu-env
export PYTHONPATH=/tmp/site2:/tmp/site:$PWD:$PWD/scripts/gpu:$PWD/tests HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  TOKENIZERS_PARALLELISM=false VLLM_ENABLE_V1_MULTIPROCESSING=0 RLSWIFT_CACHE=/tmp/rlswift-cache
