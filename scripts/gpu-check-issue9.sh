#!/usr/bin/env bash
# The GPU check of issue 9's library work, in one call on the lent machine (its python3 holds
# torch; the service's packages are not there, so only the library's tests run):
# the CUDA-marked tests, the exact-resume and fidelity tests, then a Table-1 experiment run by
# `python -m jumpout ablation` on CUDA (cnn_small on synthetic images, 3 seeds, 3 epochs).
set -u
export PYTHONPATH="$PWD"
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
timeout 120 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_layer.py tests/test_engine.py \
  tests/test_fidelity_rates.py > "$OUT/cuda-tests.log" 2>&1; echo "cuda-marked tests rc=$?"; tail -4 "$OUT/cuda-tests.log"
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_resume_exact.py \
  > "$OUT/resume.log" 2>&1; echo "resume tests rc=$?"; tail -3 "$OUT/resume.log"
timeout 120 python3 -m jumpout ablation --dataset synthetic --arch cnn_small --epochs 3 --seeds 3 \
  --train-size 512 --test-size 256 --device cuda --format markdown > "$OUT/ablation.md" 2> "$OUT/ablation.err"
echo "ablation rc=$?"; cat "$OUT/ablation.md"; tail -3 "$OUT/ablation.err"
