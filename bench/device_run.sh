#!/bin/bash
# One prepared call on a GPU machine: the CUDA checks, the quick study, then the default study twice, each in a
# fresh folder (the first is the machine's first default run), each with its stage table; then the flow's two
# "no digit" targets over three training seeds.
#   bash bench/device_run.sh OUTDIR      # wheels of packages the machine lacks, if any, in .whl/
# Every part has its own time limit, so one that hangs still leaves the others' numbers.
set -u
out=${1:-/tmp/device-out}
work=$(mktemp -d)
mkdir -p "$out"
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
python3 -c "import torch, sklearn, scipy, numpy, graphlearning; print('torch', torch.__version__, torch.cuda.get_device_name(),
  'sklearn', sklearn.__version__, 'scipy', scipy.__version__, 'numpy', numpy.__version__)"
nvidia-smi --query-gpu=name,driver_version,memory.used,clocks.sm --format=csv,noheader
nproc

echo "== CUDA checks"
timeout 35 python3 bench/check_cuda.py

echo "== quick"
if ! timeout 40 python3 bench/run_all.py --device cuda --no-stages --quick --keep "$work/quick"; then
  # a failing stage stops the run: try every stage on its own, so that one bug does not hide the others
  for stage in train-ae train-classifier fewshot train-gan train-cgan train-flow interpolate evaluate report; do
    echo "-- $stage"; timeout 30 python3 -m latentlab "$stage" --run "$work/quick" --device cuda 2>&1 | tail -4
  done
  cp "$work/quick/metrics.json" "$out/quick_metrics.json"
  exit 1
fi
cp "$work/quick/metrics.json" "$out/quick_metrics.json"

for name in first second; do
  echo "== default, $name run"
  timeout "$([ $name = first ] && echo 80 || echo 65)" python3 bench/run_all.py --device cuda --no-stages --keep "$work/$name"
  cp "$work/$name/metrics.json" "$out/${name}_metrics.json" 2>/dev/null
  cp "$work/$name/stages.json" "$out/${name}_stages.json" 2>/dev/null
  cp "$work/$name/figures/timeline.png" "$out/${name}_timeline.png" 2>/dev/null  # where the GPU run's time went
done

# the flow's "no digit" target, both kinds, three training seeds each on the second run's codes (seconds on a GPU)
for target in path own_digit; do
  echo "== flow seeds, no_digit_target=$target"
  timeout 60 python3 bench/bench_flow_seeds.py --run "$work/second" --seeds 1,2,3 --device cuda \
    --set flow.no_digit_target=$target
done
