# Source on the GPU machine (no registry there), after benchmarks/device/setup.sh: installs flash-attn-4 and its
# dependencies from carried wheels into /tmp/fa4site and puts them on PYTHONPATH.
#
#   . benchmarks/device/setup.sh && . benchmarks/device/fa4_setup.sh
#
# Source it as a command of its own: in a pipe (`. fa4_setup.sh | grep ...`) it runs in a subshell and its PYTHONPATH
# is lost (FA4 then looks absent to everything after it). Its own check prints one line and hides the CuTe DSL's
# UserWarnings, so there is nothing to filter.
#
# Wheels (python 3.12, x86_64): flash_attn_4, nvidia_cutlass_dsl (+ _libs_base, _libs_core, _libs_cu13),
# quack_kernels, apache_tvm_ffi, torch_c_dlpack_ext, carried in .whl_fa4/ or any .fa4*/ folder (all are read).
# One call carries at most 64 MiB including the tracked tree (~20 MiB), so the CUDA 13 library wheel (~92 MB)
# comes split: NAME.part-aa, NAME.part-ab, ... (split -b 40M). Each earlier call copies its parts to /tmp/fa4parts/
# (`mkdir -p /tmp/fa4parts && cp .fa4a/*.part-* /tmp/fa4parts/`, calls back to back: an idle machine is returned
# after 30 s); the last call carries the remaining parts and the small wheels and sources this. A part named after
# the wheel (nvidia_cutlass_dsl_libs_cu13-...whl.part-aa) keeps that name; any other stem (cu13.part-aa) becomes
# nvidia_cutlass_dsl_libs_cu13 with the version and tags of the carried _libs_base wheel.
# Two calls instead of three: the wheel's files as an xz tarball (66 MB instead of 92; what `pip install --target`
# would write, dist-info included), split in two, NAME.tar.xz.part-aa in .fa4x1/ (first call: copied to
# /tmp/fa4parts/) and part-ab with the small wheels in .fa4x2/ (second call: sources this); it is unpacked into the
# target after the wheels are installed. Made with:
#   unzip -q nvidia_cutlass_dsl_libs_cu13-*.whl -d w && (cd w && tar -cf - . | xz -T2 -6) > NAME.tar.xz
#   split -b 40M NAME.tar.xz NAME.tar.xz.part-
# Running this twice is harmless (the target is replaced).
set -e
FA4_SITE=/tmp/fa4site
rm -rf /tmp/fa4whl && mkdir -p /tmp/fa4parts /tmp/fa4whl
for d in .whl_fa4 .fa4*; do [ -d "$d" ] && cp "$d"/*.whl /tmp/fa4whl/ 2>/dev/null || true; done
for d in .whl_fa4 .fa4*; do [ -d "$d" ] && cp "$d"/*.part-* /tmp/fa4parts/ 2>/dev/null || true; done
for stem in $(ls /tmp/fa4parts/ 2>/dev/null | grep '\.part-' | sed 's/\.part-[a-z]*$//' | sort -u); do
    case "$stem" in
        *.whl|*.tar.xz) name=$stem ;;
        *) base=$(ls /tmp/fa4whl/nvidia_cutlass_dsl_libs_base-*.whl | head -1); name=$(basename "$base" | sed 's/libs_base/libs_cu13/') ;;
    esac
    cat $(ls /tmp/fa4parts/"$stem".part-* | sort) > "/tmp/fa4whl/$name"
    case "$name" in
        *.tar.xz) check="import sys, tarfile; tarfile.open(sys.argv[1]).getmembers()" ;;  # reads it to the end
        *) check="import sys, zipfile; assert zipfile.ZipFile(sys.argv[1]).testzip() is None" ;;
    esac
    if ! python3 -c "$check" "/tmp/fa4whl/$name"; then
        echo "fa4_setup: joining $(ls /tmp/fa4parts/"$stem".part-* | xargs -n1 basename | tr '\n' ' ')gave a broken archive: a part is missing" >&2
        set +e; return 1 2>/dev/null || exit 1
    fi
done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$FA4_SITE" /tmp/fa4whl/*.whl
for t in /tmp/fa4whl/*.tar.xz; do
    if [ -e "$t" ]; then
        python3 -c "
import sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    t.extractall(sys.argv[2], **({'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}))
" "$t" "$FA4_SITE"
    fi
done
# --target does not process .pth files: add what nvidia-cutlass-dsl's .pth would add
export PYTHONPATH=$FA4_SITE:$FA4_SITE/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}
(cd /tmp && python3 -W ignore::UserWarning -c "
import torch
from flash_attn.cute.interface import flash_attn_func
from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
import sparse_dit.kernels.fa4 as fa4
q = torch.randn(1, 256, 2, 128, device='cuda', dtype=torch.bfloat16)
out = fa4.fa4_dense_attention(q, q, q)
print('flash-attn-4 ok:', fa4.fa4_available(), tuple(out.shape), torch.cuda.get_device_name())
")
set +e
