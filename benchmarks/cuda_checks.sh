#!/usr/bin/env bash
# The checks that need a CUDA GPU (the README's "On CUDA" figures and the quantized tests' CUDA cases),
# as one prepared run for a machine that has one but lacks some of our packages and the network.
#
# Where pip works, once, in the repository root (about 57 MB; the GPU image has no bitsandbytes and
# older transformers / peft):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#     -d .whl transformers==5.24.0 peft==0.21.2 bitsandbytes==0.50.2
# On the GPU machine, with .whl carried along:
#   bash benchmarks/cuda_checks.sh [STEP ...]        STEP: quantize adapters qlora generate road (default: all)
# Each step writes STEP.txt under $OUT (default /tmp/cuda_checks) as it runs, and is stopped at its time
# share below so the others still run; a step stopped so says it at the end of its file. The shares add
# up to 560 s, inside one 600-second device command.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/cuda_checks}"
mkdir -p "$out"
site=/tmp/fxpeft-site
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl || exit 1
fi
# fxpeft itself (passes/ installs as fxpeft.passes, so the checkout alone is not importable as the package;
# python3 -P keeps the checkout's fxpeft/ off the path)
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$site" . || exit 1
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'transformers', transformers.__version__, 'peft', peft.__version__)" | tee "$out/versions.txt"

declare -A seconds=([quantize]=90 [adapters]=150 [qlora]=60 [generate]=170 [road]=90)
declare -A command=(
    [quantize]="python3 -P -m pytest -q -p no:cacheprovider tests/test_quantize.py"
    [adapters]="python3 benchmarks/bench_adapters.py --device cuda --repeats 3"
    [qlora]="python3 benchmarks/bench_qlora.py --device cuda"
    [generate]="python3 benchmarks/bench_generate.py --device cuda --compile --new 128 --repeats 2 --tenants 8"
    [road]="python3 benchmarks/bench_generate.py --device cuda --compile --batch '' --new 64 --repeats 2 --tenants 8 --method road"
)
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(quantize adapters qlora generate road)
for step in "${steps[@]}"; do
    [ -n "${command[$step]:-}" ] || { echo "unknown step '$step' (steps: ${!command[*]})"; exit 2; }
    echo "== $step: ${command[$step]}" | tee "$out/$step.txt"
    timeout "${seconds[$step]}" bash -c "${command[$step]}" >>"$out/$step.txt" 2>&1
    status=$?
    [ $status -eq 124 ] && echo "(stopped after ${seconds[$step]} s)" >>"$out/$step.txt"
    echo "== $step: exit $status" | tee -a "$out/$step.txt"
    tail -n 25 "$out/$step.txt"
done
