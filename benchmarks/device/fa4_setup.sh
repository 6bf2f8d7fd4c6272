# Source on the GPU machine (no registry there), after benchmarks/device/setup.sh: installs flash-attn-4 and its
# dependencies from the wheels carried in .whl_fa4/ into /tmp/fa4site and puts them on PYTHONPATH.
#
#   . benchmarks/device/setup.sh && . benchmarks/device/fa4_setup.sh
#
# .whl_fa4/ holds flash_attn_4, nvidia_cutlass_dsl (+ _libs_base, _libs_core), quack_kernels, apache_tvm_ffi,
# torch_c_dlpack_ext wheels for python 3.12 / x86_64. The CUDA 13 library wheel nvidia_cutlass_dsl_libs_cu13 is
# larger than what one call carries: its halves are *.whl.part-aa and *.whl.part-ab. Part aa is copied to
# /tmp/fa4parts/ by an earlier call (cp .whl_fa4/*.part-aa /tmp/fa4parts/), part ab comes with this checkout.
# Running this twice is harmless (the target is replaced).
set -e
FA4_SITE=/tmp/fa4site
mkdir -p /tmp/fa4parts /tmp/fa4whl
cp .whl_fa4/*.whl /tmp/fa4whl/ 2>/dev/null || true
for ab in .whl_fa4/*.whl.part-ab /tmp/fa4parts/*.whl.part-ab; do
    [ -e "$ab" ] || continue
    name=$(basename "$ab" .part-ab)
    aa=""
    for cand in ".whl_fa4/$name.part-aa" "/tmp/fa4parts/$name.part-aa"; do [ -e "$cand" ] && aa=$cand; done
    if [ -z "$aa" ]; then echo "fa4_setup: $name.part-aa is missing (copy it to /tmp/fa4parts/ first)" >&2; return 1 2>/dev/null || exit 1; fi
    cat "$aa" "$ab" > "/tmp/fa4whl/$name"
    python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).testzip()" "/tmp/fa4whl/$name"  # a bad join fails here
done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$FA4_SITE" /tmp/fa4whl/*.whl
# --target does not process .pth files: add what nvidia-cutlass-dsl's .pth would add
export PYTHONPATH=$FA4_SITE:$FA4_SITE/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}
(cd /tmp && python3 -c "
import torch
from flash_attn.cute.interface import flash_attn_func
from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
import sparse_dit.kernels.fa4 as fa4
q = torch.randn(1, 256, 2, 128, device='cuda', dtype=torch.bfloat16)
out = fa4.fa4_dense_attention(q, q, q)
print('flash-attn-4 ok:', fa4.fa4_available(), tuple(out.shape), torch.cuda.get_device_name())
")
set +e
