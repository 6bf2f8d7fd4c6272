# Source on the GPU machine (no registry there): installs the carried wheels (.whl/, see the device notes in
# benchmarks/README or the commit that added this) into /tmp/site and makes sparse_dit importable from this
# checkout without installing it (benchmarks/_setup.py does the same for the benchmark scripts).
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
rm -rf /tmp/sdpkg/sparse_dit && mkdir -p /tmp/sdpkg  # an older layout left a folder of links here on a warm machine
ln -sfn "$PWD/sparse_dit" /tmp/sdpkg/sparse_dit
export PYTHONPATH=/tmp/sdpkg:$PYTHONPATH
(cd /tmp && python3 -c "import torch, diffusers, triton, sparse_dit; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())")
set +e
