#!/usr/bin/env bash
# Everything that needs a GPU, in one prepared run under a time budget (a lent GPU is scarce: one call).
#
#   OUT=/tmp/gpu bash scripts/gpu_session.sh            # on the GPU machine, from the repository root
#   OUT=/tmp/cpu DEVICE=cpu LLAMA=pythia-14m PHI=pythia-14m DEMO_STEPS=20 bash scripts/gpu_session.sh  # a dry run
#
# Phases, each under its own timeout and skipped when the budget (BUDGET seconds) is spent, most wanted first:
#   1. the fused kernels on the GPU: tests/test_kernels.py and tests/test_cuda.py (both paths), the GPU to
#      themselves; they decide whether LITGPT_ETHER_KERNELS=auto may choose the kernels on CUDA;
#   2. training step time and peak memory (scripts/benchmark.py time), Llama-2-7B 4 x 512, the kernels' path and
#      the torch path interleaved, 3 repeats (medians and ranges); a profile of one step of LoRA, ETHER and ETHER+
#      with the kernels (the kernels a step launches);
#   3. Phi-1.5 4 x 256 likewise; serve's decoding throughput with the kernels, Llama-2-7B, the paper's ETHER and
#      ETHER+ adapters (q and v, n = 32), K = 1 and 64; the nf4 base against QLoRA; compiled blocks, LoRA and ETHER;
#   4. the rest of the test suite with CUDA visible in the background (8 workers), while the foreground runs a
#      real-size finetune / resume / merge check (scripts/finetune_check.py) and times the demo's pretraining
#      on the GPU (scripts/make_demo.py); with END_TO_END=0 (once those have run) the suite runs alone.
# The timings have the GPU and the CPU to themselves: eager decoding and small steps are bound by
# the CPU issuing kernels, so a busy CPU would slow them.
# Offline machines: wheels in .whl/ (litgpt and what the image lacks) are installed to /tmp/site first.
# Writes $OUT/log.txt (everything, in order) and $OUT/pytest.txt.
set -u
OUT=${OUT:?set OUT to a directory for the logs}
BUDGET=${BUDGET:-560}
DEVICE=${DEVICE:-cuda}
LLAMA=${LLAMA:-Llama-2-7b-hf}
PHI=${PHI:-phi-1_5}
DEMO_STEPS=${DEMO_STEPS:-3000}
START=$(date +%s)
LOG=$OUT/log.txt
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

left() { echo $((BUDGET - ($(date +%s) - START))); }

# phase NAME SECONDS CMD...: run CMD with a timeout of SECONDS (less if the budget is nearly spent)
phase() {
    local name=$1 want=$2
    shift 2
    local have
    have=$(($(left) - 5))
    ((want < have)) || want=$have
    if ((want < 10)); then
        echo "=== $name: skipped, budget spent" | tee -a "$LOG"
        return
    fi
    echo "=== $name (t=$(($(date +%s) - START)) s, timeout $want s): $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout -k 5 "$want" "$@" >>"$LOG" 2>&1
    echo "=== $name: exit $?, $((SECONDS - t0)) s" | tee -a "$LOG"
}

rm -rf /tmp/site
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >>"$LOG" 2>&1 || { echo "wheel install failed" | tee -a "$LOG"; exit 1; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p /tmp/bin && printf '#!/bin/sh\nexec python3 -m litgpt_ether "$@"\n' >/tmp/bin/litgpt_ether && chmod +x /tmp/bin/litgpt_ether
export PATH=/tmp/bin:$PATH
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    python3 -c "import torch; from importlib.metadata import version as v; print('torch', torch.__version__, \
'cuda', torch.version.cuda, *[f'{p} {v(p)}' for p in ('litgpt', 'lightning', 'bitsandbytes', 'tokenizers')])"
    nproc
} >>"$LOG" 2>&1

B="python3 scripts/benchmark.py"
T="--device $DEVICE --steps 5 --warmup 2 --repeats 3 --kernels triton torch"
CUDA_TESTS="tests/test_kernels.py tests/test_cuda.py"
phase "pytest $CUDA_TESTS" 150 python3 -m pytest -q -n 4 -p no:cacheprovider $CUDA_TESTS
phase "time $LLAMA 4x512" 200 $B time $T --model "$LLAMA" --micro_batch_size 4 --seq_len 512 \
    --variants frozen lora-r8 ether-n1 ether-n32 etherplus-n4 etherplus-n32
phase "profile $LLAMA 4x512 (kernels)" 50 env LITGPT_ETHER_KERNELS=triton $B time --device "$DEVICE" --model "$LLAMA" \
    --micro_batch_size 4 --seq_len 512 --steps 2 --warmup 2 --profile 20 --variants lora-r8 ether-n4 etherplus-n4
phase "time $PHI 4x256" 90 $B time $T --model "$PHI" --micro_batch_size 4 --seq_len 256 \
    --variants frozen lora-r8 ether-n1 ether-n32 etherplus-n1 etherplus-n32
phase "serve $LLAMA (kernels)" 150 env LITGPT_ETHER_KERNELS=triton $B serve --device "$DEVICE" --checkpoint_dir "$LLAMA" \
    --adapters 1 64 --repeats 3 --presets config_hub/finetune/llama-2-7b/ether.yaml config_hub/finetune/llama-2-7b/etherplus.yaml
phase "serve --load $LLAMA" 120 $B serve --load --device "$DEVICE" --checkpoint_dir "$LLAMA" --adapters 8 \
    --rates 2 8 --requests 32 --max_batch_size 8
phase "time $LLAMA 1x256 nf4" 90 $B time $T --model "$LLAMA" --micro_batch_size 1 --seq_len 256 --quantize bnb.nf4 \
    --variants lora-r8 ether-n32 etherplus-n32
phase "time $LLAMA 4x512 compiled" 150 $B time --device "$DEVICE" --steps 5 --warmup 3 --kernels triton --compile \
    --model "$LLAMA" --micro_batch_size 4 --seq_len 512 --variants lora-r8 ether-n32 etherplus-n32
phase "pytest tests/test_quantize.py" 60 python3 -m pytest -q -p no:cacheprovider tests/test_quantize.py

# the rest of the suite: in the background of the end-to-end checks, or alone (END_TO_END=0, when those have run)
REST="python3 -m pytest -q -n 8 -p no:cacheprovider tests --ignore=tests/test_cuda.py --ignore=tests/test_quantize.py \
    --ignore=tests/test_kernels.py"
echo "=== pytest, the rest (t=$(($(date +%s) - START)) s)" | tee -a "$LOG"
REST_S=$(($(left) - 5))
((REST_S >= 10)) || REST_S=1  # timeout 0 would mean no limit at all
timeout -k 5 $REST_S $REST >"$OUT/pytest.txt" 2>&1 &
PYTEST=$!
if [ "${END_TO_END:-1}" = 1 ]; then
    ACCEL=$([ "$DEVICE" = cuda ] && echo cuda || echo cpu)
    PREC=$([ "$DEVICE" = cuda ] && echo bf16-true || echo 32-true)
    phase "finetune check $PHI" 150 python3 scripts/finetune_check.py --model "$PHI" --accelerator "$ACCEL" --precision "$PREC"
    phase "make_demo on $DEVICE" 90 python3 scripts/make_demo.py --out_dir /tmp/demo --device "$DEVICE" --steps "$DEMO_STEPS"
fi
wait $PYTEST
echo "=== pytest, the rest: exit $? (t=$(($(date +%s) - START)) s)" | tee -a "$LOG"
grep -E "^(FAILED|ERROR)" "$OUT/pytest.txt" | head -30 | tee -a "$LOG"
tail -3 "$OUT/pytest.txt" | tee -a "$LOG"
