# Nsight Compute A/B of Gluon engine schedule variants (sm__cycles_active is reproducible to ~0.01% between runs;
# do_bench times vary ~5%). One ncu run per variant on one mask of benchmarks/ncu_attention.py.
# usage, on the device after setup.sh: bash benchmarks/device/ncu_gluon_variants.sh KIND DENSITY VARIANTS_FILE
# VARIANTS_FILE: lines "name {json}" with schedule options of the experiment kernel of commit 95ad850 (reverted
# after the 2026-12-04 runs, with ncu_attention.py's --gluon-schedule: check both out first,
# `git checkout 95ad850 -- sparse_dit/kernels/gluon_attention.py benchmarks/ncu_attention.py`).
# Prints per variant: gpu__time_duration (ms), sm__cycles_active.avg, tensor pipe active %, warp stalls per issued
# instruction (barrier, gmma, wait), instructions executed.
NCU=$(command -v ncu)
KIND=$1; DEN=$2; LIST=$3
i=0
while read -r name sched; do
  [ -z "$name" ] && continue
  i=$((i+1))
  f=$OUT/ncu_var_${KIND}${DEN}_${i}.txt
  timeout 100 $NCU --clock-control none --profile-from-start off -k regex:gluon --metrics sm__cycles_active.avg,gpu__time_duration.sum,sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active,smsp__average_warps_issue_stalled_wait_per_issue_active.ratio,smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio,smsp__average_warps_issue_stalled_gmma_per_issue_active.ratio,smsp__inst_executed.sum python3 -W ignore::UserWarning benchmarks/ncu_attention.py --engine gluon --kind $KIND --density $DEN --gluon-schedule "$sched" > $f 2>&1
  echo "$name $(grep -E '^\s+(sm__cycles|gpu__time|sm__pipe|smsp__average|smsp__inst)' $f | awk '{printf "%s ", $NF}')"
done < "$LIST"
