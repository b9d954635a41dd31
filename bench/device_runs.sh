#!/usr/bin/env bash
# The GPU benchmark runs, as made on the device after the kit is staged (../shared/device/README.md). Each
# part fits one device call (<= 10 minutes); results go to $OUT.
#
#   bash bench/device_runs.sh recipe NAME... # shipped recipes at their real shape -> bench/results/recipes.json
#   bash bench/device_runs.sh setup      # opencv wheel, the 3B-size model, 512 image prompts
#   bash bench/device_runs.sh profile    # where training time goes: train-profile variants, 1 and 2 GPUs
#   bash bench/device_runs.sh steps      # GRPO steps: vlrl on GPU 0 and TRL on GPU 1, side by side
#   bash bench/device_runs.sh two        # GRPO steps on 2 GPUs (2 ranks)
#   bash bench/device_runs.sh rollout    # vllm vs hf rollout throughput, weight sync
#   bash bench/device_runs.sh scale 1|2  # the GRPO step on one and on two GPUs of nvidia-h200-x2, ZeRO-1
#   bash bench/device_runs.sh families sizes  # released sizes of the newer families at a recipe's shape
#        (SIZES="RECIPE:HUB_ID ...", LORA=64; carry .device-kit/fla from bench/kit_fla.sh for Qwen3.5)
#   bash bench/device_runs.sh generate   # vLLM alone at a GRPO step's shape (32 prompts x 8 x 256)
#   bash bench/device_runs.sh packprof   # packed vs padded micro-batches (GROUP=8: GRPO groups; PROFILE=1;
#        NOSHARE=1: every copy of a repeated image encoded)
#   bash bench/device_runs.sh trl        # TRL's GRPO step alone on one GPU (the side-by-side comparison)
#   bash bench/device_runs.sh zero3      # vlrl's GRPO step under ZeRO-3 alone on one GPU (TRL's setting)
#   bash bench/device_runs.sh mfu a|b    # the training micro-batch (ZeRO-1, 8 x 541 tokens): eager vs compiled
#        blocks, with and without recompute, micro-batch 16, LoRA rank 64 (train-profile, side by side)
#        SIZE=qwen3_vl_2b ... mfu a: the same on another released size; SIZE=qwen2_5_vl_7b ... mfu long: LoRA
#        rank 64 on long answers (4 x ~2,300 tokens, recompute), with its profiler table
#   bash bench/device_runs.sh fit full3b|lora3b|lora7b   # one H100: 3B full fine-tune without offload,
#        3B LoRA rank 64 on the same batch, 7B LoRA rank 64 (then: gpu_perf.py fit --dir $OUT); env ZERO, MB,
#        COMPILE=1, NOCKPT=1 (no recompute), FP32ACC=1 (trainer.grad_accum_fp32, with ZERO=1)
# NO_FA4=1 (any command): vLLM as it runs without FlashAttention 4 (bench/no_fa4): the kit lacks the CUTLASS
#   DSL wheels FA4 needs, and Gemma 4 E2B/E4B (two head sizes) would otherwise pick FA4 and fail
set -uo pipefail
. /tmp/kit/env.sh
[ -z "${NO_FA4:-}" ] || export PYTHONPATH=$(pwd)/bench/no_fa4:$PYTHONPATH
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 VLLM_USE_FLASHINFER_SAMPLER=0
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# GRPO_STEPS: the bench steps of the 3B step runs; recipe and families read STEPS themselves (default 2)
M=/tmp/q3b D=/tmp/bd/train.parquet GRPO_STEPS=${STEPS:-4} TRL_STEPS=${TRL_STEPS:-3}
P="python3 bench/gpu_perf.py"

case "$1" in
recipe)
  # shipped recipes at their real shape (random weights of their model's released size), two steps each with
  # the prompts per step cut to PROMPTS; GPU_GB caps each run at an 80 GB GPU's memory. Geometry3K's sample
  # travels in bench/.work/geometry3k-sample (cp -r ../shared/data/geometry3k-sample bench/.work/; carry it).
  #   bash bench/device_runs.sh recipe geometry3k-7b-lora maze2d ...   ->  $OUT/recipe_NAME.json (+ .log)
  # Rows and logs go to $RESULTS (default $OUT); a device call brings back at most 8 files, so the caller
  # may point RESULTS elsewhere and pack them.
  shift
  RESULTS=${RESULTS:-$OUT}
  mkdir -p $RESULTS
  for name in "$@"; do
    python3 bench/recipe_shape.py recipes/$name.yaml --prompts ${PROMPTS:-8} --steps ${STEPS:-2} \
      --gpu-gb ${GPU_GB:-80} --work /tmp/shape --out $RESULTS/recipe_$name.json ${KEEP_MODEL:+--keep-model}
  done
  ;;
families)
  # the families added last, on the GPU. `families tests`: their GPU tests (vLLM engine vs trainer, weight sync
  # on seen images, check-drift --after-update, packed rows) with figures in $OUT; `families sizes`: shipped
  # recipes' shapes on their released sizes (random weights), rows as `recipe` writes them
  shift
  FAM=${FAMILY_K:-qwen3_5 or qwen3_vl_moe or gemma4}
  if [ "$1" = tests ]; then
    python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py \
      -k "($FAM) and (${TESTS_K:-vllm_engine_end_to_end or packed_rows or check_drift_with_vllm_including or grpo_steps})" \
      2>&1 | tee $OUT/gpu_families.log | tail -n 30
  else
    RESULTS=${RESULTS:-$OUT}
    # LORA=64: LoRA of that rank (what an 80 GB card needs for Gemma 4 E2B's 262k-entry logits and Qwen3.5-4B);
    # Qwen3.5 runs its gated-DeltaNet layers with flash-linear-attention when bench/kit_fla.sh's wheels came along
    [ ! -f .device-kit/fla/install.sh ] || python3 -c "import fla" 2>/dev/null || bash .device-kit/fla/install.sh
    for pair in ${SIZES:-maze2d-qwen3vl:Qwen/Qwen3.5-4B maze2d-qwen3vl:google/gemma-4-e2b-it geometry3k-qwen3vl-8b-lora:Qwen/Qwen3.5-9B}; do
      python3 bench/recipe_shape.py recipes/${pair%%:*}.yaml --prompts ${PROMPTS:-4} --steps ${STEPS:-2} \
        --gpu-gb ${GPU_GB:-80} --work /tmp/shape --set model.path=${pair#*:} ${LORA:+--set model.lora.rank=$LORA} \
        --out $RESULTS/recipe_${pair%%:*}-$(echo ${pair#*:} | tr '/.' '__')${LORA:+-lora$LORA}.json
    done
  fi
  ;;
setup)
  $P build --out $M && $P data --out /tmp/bd --rows 512
  ;;
profile)
  tp() { $P train-profile --model $M --data $D --micro-batches 4 "$@"; }
  # the same micro-batch with transformers' per-window vision attention and with vlrl's grouped one
  (CUDA_VISIBLE_DEVICES=0 tp --attention sdpa --json $OUT/tp_sdpa_m8.json --profile $OUT/tp_sdpa_m8.txt
   CUDA_VISIBLE_DEVICES=0 tp --micro-batch 16 --json $OUT/tp_auto_m16.json) > $OUT/tp_gpu0.log 2>&1 &
  (CUDA_VISIBLE_DEVICES=1 tp --json $OUT/tp_auto_m8.json --profile $OUT/tp_auto_m8.txt
   CUDA_VISIBLE_DEVICES=1 tp --stage 2 --json $OUT/tp_auto_m8_z2.json) > $OUT/tp_gpu1.log 2>&1 &
  wait
  for pt in 100000 0; do
    torchrun --nproc-per-node 2 --master-port 29621 bench/gpu_perf.py train-profile --model $M --data $D \
      --micro-batches 4 --persistence $pt --json $OUT/tp_2gpu_p$pt.json >> $OUT/tp_2gpu.log 2>&1
  done
  tail -n 3 $OUT/tp_*.log; cat $OUT/tp_*.json | grep -h '"micro_batch_seconds"'
  ;;
steps)
  # GPU 0: the trainer's micro-batch with vlrl's defaults (profiled), then GRPO steps under ZeRO-3 and ZeRO-2
  (export CUDA_VISIBLE_DEVICES=0
   $P train-profile --model $M --data $D --micro-batches 4 --json $OUT/tp_default_m8.json --profile $OUT/tp_default_m8.txt
   for z in 3 2; do
     name=step1; [ $z = 2 ] && name=step1_z2
     $P recipe --model $M --data $D --out /tmp/$name.yaml --prompts 32 --tokens 256 --steps $GRPO_STEPS --name $name \
       --run-dir /tmp/runs --zero-stage $z
     python3 -m vlrl_cli train /tmp/$name.yaml > $OUT/$name.log 2>&1
     mkdir -p $OUT/$name && cp /tmp/runs/$name/metrics.jsonl $OUT/$name/
   done) > $OUT/gpu0.log 2>&1 &
  # TRL's process does not exit after training (its result is written first): a time limit ends it
  (CUDA_VISIBLE_DEVICES=1 timeout ${TRL_LIMIT:-540} torchrun --nproc-per-node 1 --master-port 29611 bench/trl_grpo.py --model $M \
     --data $D --steps $TRL_STEPS --json $OUT/trl.json > $OUT/trl.log 2>&1) &
  wait
  tail -n 3 $OUT/gpu0.log $OUT/step1*.log $OUT/trl.log
  ;;
trl)
  # TRL travels in .trl-kit (bench/trl-kit.sh builds it here; carry it with this run)
  [ -d .trl-kit/site ] && export PYTHONPATH=$PWD/.trl-kit/site:$PYTHONPATH
  python3 -c "import trl; print('trl', trl.__version__)" > $OUT/trl.log 2>&1 || { cat $OUT/trl.log; exit 1; }
  # the TRL side of the comparison alone on an idle one-GPU machine (H200: its peak was 121 GB); TRL's
  # process does not exit after training (its result is written first): a time limit ends it
  timeout ${TRL_LIMIT:-580} torchrun --nproc-per-node 1 --master-port 29611 bench/trl_grpo.py --model $M \
     --data $D --steps $TRL_STEPS --json $OUT/trl.json >> $OUT/trl.log 2>&1
  tail -n 3 $OUT/trl.log
  ;;
zero3)
  # vlrl's side of the TRL comparison alone: the same GRPO steps under ZeRO-3, as TRL runs
  $P recipe --model $M --data $D --out /tmp/step1.yaml --prompts 32 --tokens 256 --steps $GRPO_STEPS --name step1 \
    --run-dir /tmp/runs --zero-stage 3 ${COMPILE:+--compile}
  python3 -m vlrl_cli train /tmp/step1.yaml --overwrite > $OUT/step1.log 2>&1
  mkdir -p $OUT/step1 && cp /tmp/runs/step1/metrics.jsonl $OUT/step1/
  tail -n 3 $OUT/step1.log
  ;;
two)
  for z in 3 2; do
    name=step2; [ $z = 2 ] && name=step2_z2
    $P recipe --model $M --data $D --out /tmp/$name.yaml --prompts 32 --tokens 256 --steps $GRPO_STEPS --name $name \
      --run-dir /tmp/runs --zero-stage $z
    python3 -m vlrl_cli train /tmp/$name.yaml --gpus 2 > $OUT/$name.log 2>&1
    mkdir -p $OUT/$name && cp /tmp/runs/$name/metrics.jsonl $OUT/$name/
    tail -n 3 $OUT/$name.log
  done
  ;;
scale)
  # on nvidia-h200-x2: the same per-GPU batch (32 prompts x 8 x 256 tokens per rank), ZeRO-1,
  # on one GPU (`scale 1`) and on both (`scale 2`); NCCL's transport is logged (NCCL_DEBUG=INFO)
  g=$2 name=scale$2
  $P recipe --model $M --data $D --out /tmp/$name.yaml --prompts 32 --tokens 256 --steps ${STEPS:-4} --name $name \
    --run-dir /tmp/runs --zero-stage ${ZERO:-1}
  nvidia-smi topo -m > $OUT/topo.txt 2>&1
  if [ "$g" = 1 ]; then
    CUDA_VISIBLE_DEVICES=0 python3 -m vlrl_cli train /tmp/$name.yaml --overwrite > $OUT/$name.log 2>&1
  else
    NCCL_DEBUG=INFO python3 -m vlrl_cli train /tmp/$name.yaml --overwrite --gpus 2 > $OUT/$name.log 2>&1
    grep -a -m 8 -E " via |NCCL version|P2P|SHM" $OUT/$name.log > $OUT/nccl_transport.txt
  fi
  mkdir -p $OUT/$name && cp /tmp/runs/$name/metrics.jsonl $OUT/$name/
  tail -n 2 $OUT/$name.log
  ;;
generate)
  # at equal shape: vLLM alone on 32 prompts x 8 samples x 256 tokens (what a GRPO step
  # generates), at the 0.15 memory fraction the fit runs use; then compare with their time_generate_* parts
  $P rollout --model $M --data $D --prompts 32 --n 8 --tokens 256 --gpu-mem 0.15 --repeats ${REPEATS:-5} --json $OUT/rollout_32x8.json \
    > $OUT/rollout_32x8.log 2>&1
  $P rollout --model $M --data $D --prompts 256 --n 1 --tokens 256 --gpu-mem 0.15 --json $OUT/rollout_256x1.json \
    >> $OUT/rollout_32x8.log 2>&1
  tail -n 2 $OUT/rollout_32x8.log; cat $OUT/rollout_*.json
  ;;
packprof)
  # packed vs padded at one token budget, with a profiler table of one pass of each
  # GROUP=8: sequences in GRPO groups sharing a prompt image; COMPILE=1: compiled blocks
  tag=${BUDGET:-16384}_g${GROUP:-1}${COMPILE:+_compile}${NOSHARE:+_noshare}
  $P pack --model $M --data $D --budget ${BUDGET:-16384} --group ${GROUP:-1} ${COMPILE:+--compile} ${NOSHARE:+--no-share-images} \
    --json $OUT/pack_$tag.json ${PROFILE:+--profile $OUT/packprof_$tag} >> $OUT/pack.log 2>&1
  tail -n 2 $OUT/pack.log; cat $OUT/pack_*.json
  ;;
mfu)
  # SIZE=qwen3_vl_2b (any tiny.REAL_SIZES name): the same micro-batches on that size, built first; files get _$SIZE
  model=$M tag=""
  [ -f $D ] || $P data --out /tmp/bd --rows 512  # the prompts alone (setup also builds the 3B model)
  if [ -n "${SIZE:-}" ]; then
    model=/tmp/$SIZE tag=_$SIZE
    [ -d $model ] || $P build --out $model --size $SIZE
  fi
  tp() { n=$1$tag; shift; $P train-profile --model $model --data $D --stage 1 --micro-batches 6 --json $OUT/mfu_$n.json "$@" \
           >> $OUT/mfu.log 2>&1; tail -n 1 $OUT/mfu.log | cut -c1-300; }
  if [ "$2" = long ]; then
    # the Geometry3K LoRA regime: long answers (TOKENS, default 2,000), micro-batch 4, recompute on, rank 64
    tp long_lora64 --lora-rank 64 --micro-batch 4 --tokens ${TOKENS:-2000} --profile $OUT/mfu_long_lora64$tag.txt
    tp long_lora64_compile --lora-rank 64 --micro-batch 4 --tokens ${TOKENS:-2000} --compile
  elif [ "$2" = a ]; then
    tp base --profile $OUT/mfu_base.txt
    tp compile --compile --profile $OUT/mfu_compile.txt
    tp compile_m16 --compile --micro-batch 16
    tp compile_nockpt --compile --no-checkpointing
  else
    tp lora64 --lora-rank 64
    tp lora64_compile --lora-rank 64 --compile --profile $OUT/mfu_lora64_compile.txt
  fi
  ;;
fit)
  # 32 prompts x 8 samples x 256 tokens, micro-batch 8, ZeRO-2, vLLM at 0.15 of the GPU (what fits next to
  # a 3B full fine-tune's 60 GB of weights, gradients, master weights and moments: `vlrl train --plan`;
  # at 0.2 the second step's wake-up ran out of memory on an H100)
  name=$2${MB:+_m$MB}${ZERO:+_z$ZERO}${COMPILE:+_compile}${NOCKPT:+_nockpt}${FP32ACC:+_fp32acc}
  case "$2" in
    full3b) model=$M extra="" ;;
    lora3b) model=$M extra="--lora-rank 64" ;;
    lora7b) model=/tmp/q7b extra="--lora-rank 64"
            [ -d /tmp/q7b ] || $P build --out /tmp/q7b --size qwen2_5_vl_7b ;;
  esac
  $P recipe --model $model --data $D --out /tmp/$name.yaml --prompts 32 --tokens 256 --steps ${STEPS:-3} --name $name \
    --run-dir /tmp/runs --zero-stage ${ZERO:-2} --gpu-mem ${GPU_MEM:-0.15} --micro-batch ${MB:-8} $extra \
    ${COMPILE:+--compile} ${NOCKPT:+--no-checkpointing} ${FP32ACC:+--grad-accum-fp32}
  python3 -m vlrl_cli train /tmp/$name.yaml --overwrite > $OUT/$name.log 2>&1
  mkdir -p $OUT/$name && cp /tmp/runs/$name/metrics.jsonl $OUT/$name/
  tail -n 3 $OUT/$name.log
  ;;
rollout)
  CUDA_VISIBLE_DEVICES=0 $P rollout --model $M --data $D --engine vllm --prompts 256 --json $OUT/rollout_vllm.json
  CUDA_VISIBLE_DEVICES=0 $P rollout --model $M --data $D --engine hf --prompts 6 --json $OUT/rollout_hf.json
  CUDA_VISIBLE_DEVICES=0 $P sync --model $M --data $D --json $OUT/sync.json --profile $OUT/sync_profile.txt
  ;;
*) echo "usage: $0 setup|profile|steps|trl|zero3|two|rollout|scale|generate|packprof|mfu|fit" >&2; exit 2 ;;
esac
