# The job machinery every study under scripts/evidence/ shares (sourced, not run). A study sets
#   out     the run folders (checkpoints included), e.g. outputs/<study>
#   keep    where each finished run's small files go (committed), e.g. results/<study>/runs
#   common  the overrides every job of the study takes
# defines jobs_list (one job per line: NAME OVERRIDES...), then calls `run_selected "$@"`: the jobs named on the
# command line (in the order given), or all of them, JOBS_PARALLEL (default 2) side by side, one thread each.
# A finished run (summary.json) is skipped, an unfinished one resumes from its last checkpoint (the runs write
# checkpoints/last.pt every checkpoint.every_n_steps), and a job whose input run (method.ranks_from=, init_from=)
# is not finished yet waits for it.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

wait_for() {  # a run folder (or a file in it) that an earlier job of this study writes; 1 if it will not come
  local dir=${1%/checkpoints/*}
  until [[ -f $dir/summary.json ]]; do
    pgrep -f "hydra.run.dir=$dir( |$)" > /dev/null || sleep 5
    pgrep -f "hydra.run.dir=$dir( |$)" > /dev/null || [[ -f $dir/summary.json ]] || return 1
    sleep 20
  done
}

run_job() {  # NAME OVERRIDES...: train into $out/NAME unless finished, then keep its small files
  local name=$1; shift
  local dir=$out/$name
  if [[ ! -f $dir/summary.json ]]; then
    for arg in "$@"; do
      case $arg in method.ranks_from=*|init_from=*)
        wait_for "${arg#*=}" || { echo "$(date +%T) $name skipped: ${arg#*=} is not finished"; return 0; };; esac
    done
    echo "$(date +%T) start $name"
    python -m tdlrt_cli train $common "$@" hydra.run.dir=$dir >> "$out/$name.log" 2>&1 \
      || { echo "$(date +%T) $name failed: see $out/$name.log"; return 0; }
  fi
  mkdir -p "$keep/$name/.hydra"
  cp "$dir"/summary.json "$dir"/metrics.csv "$dir"/train.log "$keep/$name/"
  for f in ranks.csv ranks_steps.csv start_eval.json sources.json; do
    [[ -f $dir/$f ]] && cp "$dir/$f" "$keep/$name/"
  done
  cp "$dir"/.hydra/config.yaml "$dir"/.hydra/overrides.yaml "$keep/$name/.hydra/"
  echo "$(date +%T) done $name: $(python -c "import json,sys; s=json.load(open(sys.argv[1])); print(f\"test acc {s['test_acc']:.2f}% c.r. {s['compression_rate']:.2f}%\")" "$dir/summary.json")"
}

run_selected() {  # [NAME...]: the named jobs of jobs_list, or all of them
  local selected
  export -f run_job wait_for
  export out keep common
  mkdir -p "$out"
  if [[ $# -gt 0 ]]; then
    selected=$(for name in "$@"; do jobs_list | awk -v n="$name" '$1 == n' | grep . || { echo "no job named $name" >&2; exit 2; }; done)
  else
    selected=$(jobs_list)
  fi
  echo "$selected" | xargs -P "${JOBS_PARALLEL:-2}" -L 1 bash -c 'run_job "$@"' _
}
