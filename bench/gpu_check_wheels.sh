#!/bin/sh
# The Python packages maisi needs that the lent GPU machines' image lacks (the device README's KINDS.md lists what
# it holds: torch, numpy, scipy, typer, rich, einops, pillow, matplotlib, huggingface-hub are there), downloaded as
# wheels for its Python 3.12 into build/gpu-wheels (ignored by git): name that folder in the device call's `carry`
# (bench/gpu_check.py's docstring has the call). The versions are those of the development environment.
set -e
cd "$(dirname "$0")/.."
mkdir -p build/gpu-wheels
python=${PYTHON:-.venv/bin/python}
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d build/gpu-wheels \
    monai==1.6.1 nibabel==5.4.2 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
    typing-inspection==0.4.5 typing-extensions==4.16.0 pynrrd==1.1.3 isal==1.9.1
ls -l build/gpu-wheels
du -sh build/gpu-wheels
