# Nsight Compute cycles of the Gluon engine's kernel against its persistent variant, one launch each, Wan 480p.
# As run on 2026-12-04 (commit bdbe007, the persistent kernel then opt-in); since then the persistent grid is the
# default and the comparison is "--per-tile" (the same kernel, one CTA per query block) against the default.
# usage, on the device after setup.sh: bash benchmarks/device/ncu_persistent.sh
NCU=$(command -v ncu)
for mask in "window 0.1" "random 0.1" "random 0.3" "random 0.5"; do
  set -- $mask
  for pers in "" "--persistent"; do
    f=$OUT/ncu_pers_$1$2${pers:+_p}.txt
    timeout 100 $NCU --clock-control none --profile-from-start off -k regex:gluon --metrics sm__cycles_active.avg,gpu__time_duration.sum,sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum python3 -W ignore::UserWarning benchmarks/ncu_attention.py --engine gluon --kind $1 --density $2 $pers > $f 2>&1
    echo "$1 $2 ${pers:-default} $(grep -E '^\s+(sm__cycles|gpu__time|sm__pipe|smsp__inst)' $f | awk '{printf "%s ", $NF}')"
  done
done
