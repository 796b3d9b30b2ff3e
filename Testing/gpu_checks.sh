#!/usr/bin/env bash
# The GPU checks, for a machine with a CUDA GPU (CI has none): the CUDA tests and the GPU figures.
#
#   bash Testing/gpu_checks.sh OUT_DIR [figures|tests|3d|all]
#
# Needs MedFM installed (`pip install -e ".[sam,evaluate,test]"`) in the Python that has CUDA's PyTorch.
# `figures` uses random full-size weights only; `tests` needs LiteMedSAM's weights, fetched as `make test` does
# (or MEDFM_TEST_CACHE pointing at a folder whose home/models/litemedsam holds lite_medsam.pth).
# `3d` times nnInteractive and VISTA3D (random full-size weights) and runs their CUDA tests; it needs
# `pip install -e ".[vista3d,nninteractive]"`.
set -u
out=${1:?usage: gpu_checks.sh OUT_DIR [figures|tests|3d|all]}
phase=${2:-all}
python=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MEDFM_HOME=${MEDFM_HOME:-$(mktemp -d)}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$python" -c "import torch; print('torch', torch.__version__, '| CPU cores', __import__('os').cpu_count())"
} | tee "$out/machine.txt"

if [ "$phase" = 3d ] || [ "$phase" = all ]; then
  for model in nninteractive vista3d; do
    medfm bench --model "$model" --random-weights --device cuda --volume-sizes 128,256x256x160 --clicks 5
  done 2>&1 | tee "$out/figures3d.txt"
  "$python" -m pytest -q -rs "$here/engines/test_cuda.py" -k 3d 2>&1 | tee "$out/tests3d.txt"
fi

if [ "$phase" = figures ] || [ "$phase" = all ]; then
  {
    for model in sam_vit_b mobilesam litemedsam; do
      medfm bench --model "$model" --random-weights --device cuda --first-clicks 5 --clicks 20
    done
    medfm bench --model litemedsam --random-weights --device cuda --propagate --slices 60
    # The cvpr25 protocol over the real cases, per case and per step (SAM ViT-B, random weights).
    printf 'image,label\n' >"$out/real.csv"
    for case in brain1 breast1; do
      printf '%s,%s\n' "$here/data/real/${case}_image.nrrd" "$here/data/real/${case}_label.nrrd" >>"$out/real.csv"
    done
    medfm bench --evaluate "$out/real.csv" --model sam_vit_b --random-weights --device cuda
  } 2>&1 | tee "$out/figures.txt"
fi

if [ "$phase" = tests ] || [ "$phase" = all ]; then
  "$python" -m pytest -q -rs "$here/engines/test_cuda.py" 2>&1 | tee "$out/tests.txt"
fi
