#!/usr/bin/env bash
# One device session on a CUDA machine (the project's H100 lease): everything this project checks
# and measures on a GPU, in one call, each part under its own time limit so that a slow part never
# takes the later ones' results with it.
#   bash benchmarks/gpu_session.sh OUT [CIFAR10_ARCHIVE] [WHEELS]
# 0. fullgraph compile of a prepared model against eager (alone, its own time limit).
# 1. CUDA tests: Triton and inductor quantizer kernels against the plain ops, the sync-free step,
#    the trainer's CUDA graphs against eager training, the device data loader
#    (tests/test_cuda_kernels.py, tests/test_data.py -k cuda).
# 2. bench_train_step.py on CUDA: float vs mixq (default: Triton kernels; plain ops; inductor) vs
#    PyTorch's learnable fake-quant ops vs Brevitas (installed from WHEELS when given).
# 2c. profile_step.py on CUDA: kernel time, launches, host syncs and the host's Python per eager step.
# 3. NUUQ on CIFAR-10 / ResNet-20 (recipes/cifar10_resnet20_nuuq.toml): k = 4 and 3 levels at
#    b = 8, and the uniform 4-level and ternary grids from the same float model.
# Results land in OUT: env.txt, fullgraph.log, tests.log, kernels.log, train_step_cuda.{json,md},
# bench.log, profile.log, profile_step_cuda.{json,md}, cifar.log, cifar_nuuq.tgz. QUICK=1 makes part 3 a --quick
# smoke run (for trying the script on a CPU).
set -u
OUT=${1:?usage: gpu_session.sh OUT [CIFAR10_ARCHIVE] [WHEELS]}
DATA=${2:-.data/cifar10-jpeg.tar.gz}
WHEELS=${3:-.whl}
T_TESTS=${T_TESTS:-150} T_QUICK=${T_QUICK:-70} T_KERNELS=${T_KERNELS:-30} T_BENCH=${T_BENCH:-195}
T_CIFAR=${T_CIFAR:-280} T_PROFILE=${T_PROFILE:-60} T_FULLGRAPH=${T_FULLGRAPH:-150}
PARTS=${PARTS:-"fullgraph tests quick kernels bench profile cifar"}  # which parts run
BENCH_VARIANTS=${BENCH_VARIANTS:-}  # bench_train_step.py --variants (default: all)
FMNIST=${FMNIST:-.data/fashion-mnist}  # for the quick pipeline runs
FLOAT_CKPT=${FLOAT_CKPT:-}  # a trained float ResNet-20 for part 3 (skips its float training)
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
{ date -u; nvidia-smi; lscpu | head -20
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__, torch.cuda.get_device_name())"; } >"$OUT/env.txt" 2>&1
tail -1 "$OUT/env.txt"

has() { [[ " $PARTS " == *" $1 "* ]]; }
if has fullgraph; then
  # first and alone: torch 2.11's compile gave zero quantizer gradients on 2026-11-27, and the run
  # that would have said whether the guard in _UniformFakeQuant.backward cures it was cut at 55 s
  echo "== 0. fullgraph compile of a prepared model: gradients against eager"
  timeout -k 5 "$T_FULLGRAPH" python3 -m pytest -v --tb=short -p no:cacheprovider \
    tests/test_cuda_kernels.py -k fullgraph >"$OUT/fullgraph.log" 2>&1
  grep -E "PASS|FAIL|^E " "$OUT/fullgraph.log" | head -20
fi
if has tests; then
  echo "== 1. CUDA tests"
  # -v: each test's name and result as it ends, so a run cut by its time limit still says which
  # test failed (the H100 session of 2026-11-27 lost one that way)
  timeout -k 5 "$T_TESTS" python3 -m pytest -v --tb=short -p no:cacheprovider tests/test_cuda_kernels.py \
    tests/test_data.py -k "cuda and not interpreted and not fullgraph" >"$OUT/tests.log" 2>&1
  tail -15 "$OUT/tests.log"
fi
if has quick; then
  echo "== 1b. quick pipeline runs on CUDA (training and budgets of three recipes)"
  timeout -k 5 "$T_QUICK" bash -c "
    python3 -m mixq train --recipe fmnist_default --quick --data '$FMNIST' --out /tmp/q_default &&
    python3 -m mixq train --recipe fmnist_learned --quick --data '$FMNIST' --out /tmp/q_learned &&
    python3 -m mixq train --recipe cifar10_resnet20_uhlich --quick --data '$DATA' --out /tmp/q_uhlich" \
    >"$OUT/quick.log" 2>&1
  echo "quick runs: exit $?"; grep -E "^\{\"run\"|Error" "$OUT/quick.log" | tail -6
fi

if has kernels; then
  echo "== 2. one quantizer call: plain ops, inductor kernels, Triton kernels"
  timeout -k 5 "$T_KERNELS" python3 benchmarks/bench_kernels.py --device cuda --out kernels_cuda \
    >"$OUT/kernels.log" 2>&1
  tail -12 "$OUT/kernels.log"
  cp benchmarks/results/kernels_cuda.* "$OUT/" 2>/dev/null
fi
if has bench; then
  echo "== 2b. training step"
  timeout -k 5 "$T_BENCH" python3 benchmarks/bench_train_step.py --device cuda --reps 30 --warmup 5 \
    --budget-s $((T_BENCH - 25)) --compile-estimate-s 100 --out train_step_cuda --json \
    ${BENCH_VARIANTS:+--variants $BENCH_VARIANTS} \
    >"$OUT/bench.log" 2>&1
  grep -E "^(model|resnet20|fmnist_cnn|Traceback|[A-Za-z]*Error) " "$OUT/bench.log" | tail -40
  tail -1 "$OUT/bench.log"
  cp benchmarks/results/train_step_cuda.* "$OUT/" 2>/dev/null
fi
if has profile; then
  echo "== 2c. where an eager step's time goes"
  timeout -k 5 "$T_PROFILE" python3 benchmarks/profile_step.py --device cuda \
    --variants float,mixq,mixq_graphed,mixq_plain,torch_lsq --host --out profile_step_cuda >"$OUT/profile.log" 2>&1
  grep -B1 -A6 "^variant " "$OUT/profile.log"
  cp benchmarks/results/profile_step_cuda.* "$OUT/" 2>/dev/null
fi
if has cifar; then
  echo "== 3. NUUQ on CIFAR-10"
  start=$(date +%s)
  float=${FLOAT_CKPT:+--set flexible.float_checkpoint=$FLOAT_CKPT}
  timeout -k 5 "$T_CIFAR" bash -c "
    python3 -m mixq sweep --recipe cifar10_resnet20_nuuq --grid flexible.k=4,3 --data '$DATA' $float \
      --out /tmp/nuuq_swp --no-progress ${QUICK:+--quick} &&
    python3 -m mixq sweep --recipe cifar10_resnet20_nuuq --grid flexible.k=4,3 \
      --set flexible.grid_bits=2 --set flexible.level_init=uniform --set flexible.report_mse=false \
      --set flexible.float_checkpoint=\$(ls /tmp/nuuq_swp/float-*/ckpt/float.pt $FLOAT_CKPT 2>/dev/null | head -1) \
      --data '$DATA' --out /tmp/uni_swp --no-progress ${QUICK:+--quick}" >"$OUT/cifar.log" 2>&1
  echo "cifar part: exit $? after $(( $(date +%s) - start )) s"
  tail -5 "$OUT/cifar.log"
  cat /tmp/nuuq_swp/sweep.md /tmp/uni_swp/sweep.md 2>/dev/null
  tar czf "$OUT/cifar_nuuq.tgz" --exclude='last.pt' --exclude='best_*.pt' --exclude='*.mixq' \
    -C /tmp nuuq_swp uni_swp q_default q_learned q_uhlich 2>/dev/null
fi
ls -la "$OUT"
