#!/usr/bin/env bash
# Prepares `.whl/`: the wheels the GPU kit (`benchmarks/gpu_check.py`, `make gpu-check`) installs on a GPU machine
# without network access. Such a machine (x86_64, glibc) is expected to have torch (CUDA), Triton, transformers,
# accelerate, peft and datasets' own dependencies (pandas, pyarrow, xxhash, fsspec, huggingface_hub, jinja2, psutil,
# pyyaml); it may lack TRL, datasets (and two of datasets' own dependencies, dill and multiprocess) and liger-kernel.
# Only those are carried, at the versions this checkout's venv has (what the tests ran with), as wheels for the GPU
# machine's Python (GPU_PYTHON_VERSION, default 3.12) on manylinux x86_64. dgpo-trl itself is not a wheel: the kit runs
# from the copied working tree (PYTHONPATH).
#
#     bash benchmarks/gpu_wheels.sh            # or: make gpu-wheels (GPU_PYTHON_VERSION=3.11 make gpu-wheels, ...)
# Then copy the working tree with `.whl/` to the GPU machine and run `make gpu-check` there. The script fails if the
# wheels exceed WHEEL_BUDGET_MIB (default 16; the five are ~2.6 MiB): more means an unintended package came along.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=${DEST:-.whl}
WHEEL_BUDGET_MIB=${WHEEL_BUDGET_MIB:-16}
GPU_PYTHON_VERSION=${GPU_PYTHON_VERSION:-3.12}

version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

# name==version of each package to carry: the local venv's versions (liger-kernel, which the venv may lack: pinned)
specs=()
for name in trl datasets dill multiprocess; do
    specs+=("$name==$(version "$name")")
done
specs+=("liger-kernel==$(version liger-kernel 2>/dev/null || echo 0.8.5)")

rm -rf "$DEST"
mkdir -p "$DEST"
# One pip call per package (with --no-deps each resolves alone); the manylinux tags an x86_64 glibc machine accepts
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
for spec in "${specs[@]}"; do
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$GPU_PYTHON_VERSION" \
        --implementation cp "${platforms[@]}" -d "$DEST" "$spec"
done

# One version of each distribution (two would stop the install there), and the size budget
"$PY" - "$DEST" "$WHEEL_BUDGET_MIB" <<'EOF'
import collections, pathlib, sys
dest, budget = pathlib.Path(sys.argv[1]), float(sys.argv[2])
wheels = sorted(dest.glob("*.whl"))
names = collections.Counter(w.name.split("-")[0].lower().replace("_", "-") for w in wheels)
twice = [n for n, c in names.items() if c > 1]
if twice:
    sys.exit(f"two versions of {twice} in {dest}")
total = sum(w.stat().st_size for w in wheels) / 2**20
for w in wheels:
    print(f"{w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
print(f"{total:7.2f} MiB  in {len(wheels)} wheels ({dest}/)")
if total > budget:
    sys.exit(f"{total:.1f} MiB of wheels > {budget} MiB budget")
EOF
