# Nsight Compute cycles of the Gluon engine's kernel, one CTA per query block (--per-tile) against the persistent
# grid (the default), one launch each at Wan 480p. On 2026-12-04 12:46 (commit bdbe007) the same comparison ran with
# the persistent kernel opt-in (`--persistent`, since replaced by `--per-tile`); numbers in benchmarks/results/kernel.md.
# usage, on the device after setup.sh: bash benchmarks/device/ncu_persistent.sh
NCU=$(command -v ncu)
for mask in "window 0.1" "random 0.1" "random 0.3" "random 0.5"; do
  set -- $mask
  for grid in "--per-tile" ""; do
    f=$OUT/ncu_pers_$1$2${grid:+_per_tile}.txt
    timeout 100 $NCU --clock-control none --profile-from-start off -k regex:gluon --metrics sm__cycles_active.avg,gpu__time_duration.sum,sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum python3 -W ignore::UserWarning benchmarks/ncu_attention.py --engine gluon --kind $1 --density $2 $grid > $f 2>&1
    echo "$1 $2 ${grid:-persistent} $(grep -E '^\s+(sm__cycles|gpu__time|sm__pipe|smsp__inst)' $f | awk '{printf "%s ", $NF}')"
  done
done
