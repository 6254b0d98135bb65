#!/usr/bin/env bash
# hirelc on an NVIDIA GPU: installs the gpu extra, then a tiny train -> lower -> export -> verify on ort-cpu,
# ort-cuda and ort-tensorrt (a few minutes), and prints the per-target table twice: the second verify takes the
# TensorRT engines from RUN_DIR/trt_cache instead of building them.
#
#   bash benchmarks/gpu_check.sh [RUN_DIR]          (default /tmp/hirelc-gpu-check)
#   HIRELC_GPU_SKIP_INSTALL=1 bash benchmarks/gpu_check.sh   (packages already installed, e.g. offline)
set -euo pipefail
cd "$(dirname "$0")/.."
RD="${1:-/tmp/hirelc-gpu-check}"

command -v nvidia-smi >/dev/null && nvidia-smi -L || { echo "gpu_check: no NVIDIA GPU here (nvidia-smi)"; exit 2; }

if [ "${HIRELC_GPU_SKIP_INSTALL:-0}" != "1" ]; then
  pip install -q torch==2.13.0
  pip install -q -e ".[dev]"
  # onnxruntime-gpu provides the same `onnxruntime` module as onnxruntime: the CPU build must go first
  pip uninstall -q -y onnxruntime
  pip install -q "onnxruntime-gpu[cuda,cudnn]>=1.31,<1.33" "tensorrt-cu13-libs>=10.13,<11"
fi
python - <<'PY'
import onnxruntime as ort
if hasattr(ort, "preload_dlls"):
    ort.preload_dlls()
print("onnxruntime", ort.__version__, ort.get_available_providers())
PY

start=$(date +%s)
rm -rf "$RD"
hirelc train -m test_resnet -r "$RD" --epochs 1
# signed int8 activations with zero point 0: the explicit quantization TensorRT takes
hirelc lower -r "$RD" --policy w4 --act-int8 --epochs 0.2
hirelc export -r "$RD"
hirelc export -r "$RD" --fp32
hirelc baseline ort-int8 -r "$RD" --act-int8
for pass in 1 2; do
  echo "== verify, pass $pass"
  hirelc verify -r "$RD" --target ort-cpu --target ort-cuda --target ort-tensorrt --no-memory --runs 50 \
    --gate-target ort-tensorrt
done
python - "$RD" <<'PY'
import json, sys
r = json.load(open(f"{sys.argv[1]}/report.json"))
for t, m in r["targets"].items():
    for k, a in m["artifacts"].items():
        w = a["what_ran"]
        print(t, k, f"top1 {a['top1']:.2f}", {b: round(v["median_ms"], 3) for b, v in a["latency"].items()},
              f"share on {w.get('provider')}: {w.get('share')}", "int8 engine:" if "int8_engine" in w else "",
              w.get("int8_engine", ""))
PY
echo "gpu_check: $(( $(date +%s) - start )) s"
