#!/usr/bin/env bash
# The whole study in one command: LP, FT, LP-FT, LoRA, LP-LoRA (and on demand BitFit, EH-FT's LoRA-FT and BitFit-FT);
# calibration; NTK; norm scaling; report.
#
#   bash run_all.sh                                  # default study: embedded model, CB and SST-2, 2-core CPU
#   bash run_all.sh --paper --model roberta-base     # the paper's full study (13 datasets, 5 seeds; a GPU)
#   bash run_all.sh --lr_grid "1e-5 5e-5 1e-4"       # every method and seed at every learning rate
#   bash run_all.sh --kernel_study                   # Malladi et al.'s question: k-shot FT against its kernels
#   bash run_all.sh --print_jobs > jobs.txt          # independent jobs, one per line (GNU parallel / Slurm array)
#   xargs -P 2 -I{} bash -c {} < jobs.txt && bash run_all.sh --report_only   # ... run them, then calibrate + report
#
# Resumable: every script skips finished work and resumes interrupted training; --force redoes everything.
# Printed jobs may run in any order and at once: a job that needs an LP head fits it first, or waits for the
# process fitting it; so does one that needs EH-FT's source run (LoRA, BitFit); each run directory has one writer at a
# time. They are printed in phase order (LP, then EH-FT's sources, then the rest), so a runner that starts them in
# order rarely has one wait.
# Options: --tasks "cb rte" --methods "lp ft lp_ft lora lp_lora" (also bitfit, lora_ft, bitfit_ft: EH-FT, its source
#          run, LoRA or BitFit at its default lr, in the phase before) --seeds "1001 2002" --model NAME
#          --data_dir DIR --out DIR (runs) --epochs N --max_steps N --max_train_samples N --max_eval_samples N
#          --ntk_tasks "cb" --ntk_n N --ntk_method func|structured --scale_tasks "cb" --scales "0.1 10"
#          --no_ntk --no_scale
#          --lr_grid "..." and per method --lr_grid_ft --lr_grid_lpft --lr_grid_lora --lr_grid_lplora --lr_grid_bitfit
#          --lr_grid_lora_ft --lr_grid_bitfit_ft
#          --patience N --batching random|length (default: ft.py's, length; random with --paper)
#          --force --print_jobs --report_only (only calibrate the runs under --out and report)
#          --jobs N (jobs at once, each with its share of the cores; default 2 on a CPU study, 1 with --paper)
#          --kernel_study [--k_shots "16 64" --data_seeds "13 21 42 87 100" --kernels "asym_signgd"
#          --kernel_test N]: for each task (default "sst2 mrpc"), K and data seed, --methods (default "ft lp_ft")
#          fine-tuned on the k-shot data and the kernel of the same start (LP-FT's: the LP head fit on the same
#          k-shot train set), one kernel per method and --kernels kind, its solvers' settings chosen on the k-shot
#          val split; on --kernel_test test examples (default the whole k-shot test set: SST-2 872, MRPC 408; FT
#          is compared on the same ones; --out runs_kernel)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}

paper=0 force=0 print_jobs=0 no_ntk=0 no_scale=0 report_only=0 kernel_study=0
k_shots="16 64" data_seeds="13 21 42 87 100" kernels="asym_signgd" kernel_test=""
tasks="" methods="" seeds="" model="" data_dir="" out=""
epochs="" max_steps="" max_train="" max_eval="" ntk_tasks="" ntk_n="" ntk_method="" scale_tasks="" scales=""
patience="" par="" batching=""
lr_grid=""
declare -A grid=()
die() { echo "error: $*" >&2; exit 2; }
has() { [[ " $2 " == *" $1 "* ]]; }
VALUED="--tasks --methods --seeds --model --data_dir --out --output_root --epochs --max_steps --max_train_samples
  --max_eval_samples --ntk_tasks --ntk_n --ntk_method --scale_tasks --scales --patience --batching --jobs --lr_grid --lr_grid_ft
  --lr_grid_lpft --lr_grid_lp_ft --lr_grid_lora --lr_grid_lplora --lr_grid_lp_lora --lr_grid_bitfit --lr_grid_loraft
  --lr_grid_lora_ft --lr_grid_bitfitft --lr_grid_bitfit_ft --k_shots --data_seeds --kernels --kernel_test"
while [ $# -gt 0 ]; do
  if has "$1" "$(echo $VALUED)" && [ $# -lt 2 ]; then die "$1 needs a value (see bash run_all.sh --help)"; fi
  case $1 in
    --paper) paper=1 ;;
    --force) force=1 ;;
    --print_jobs) print_jobs=1 ;;
    --report_only) report_only=1 ;;
    --no_ntk) no_ntk=1 ;;
    --no_scale) no_scale=1 ;;
    --kernel_study) kernel_study=1 ;;
    --k_shots) k_shots=$2; shift ;;
    --data_seeds) data_seeds=$2; shift ;;
    --kernels) kernels=$2; shift ;;
    --kernel_test) kernel_test=$2; shift ;;
    --tasks) tasks=$2; shift ;;
    --methods) methods=$2; shift ;;
    --seeds) seeds=$2; shift ;;
    --model) model=$2; shift ;;
    --data_dir) data_dir=$2; shift ;;
    --out|--output_root) out=$2; shift ;;
    --epochs) epochs=$2; shift ;;
    --max_steps) max_steps=$2; shift ;;
    --max_train_samples) max_train=$2; shift ;;
    --max_eval_samples) max_eval=$2; shift ;;
    --ntk_tasks) ntk_tasks=$2; shift ;;
    --ntk_n) ntk_n=$2; shift ;;
    --ntk_method) ntk_method=$2; shift ;;
    --scale_tasks) scale_tasks=$2; shift ;;
    --scales) scales=$2; shift ;;
    --patience) patience=$2; shift ;;
    --batching) batching=$2; shift ;;
    --jobs) par=$2; shift ;;
    --lr_grid) lr_grid=$2; shift ;;
    --lr_grid_ft) grid[ft]=$2; shift ;;
    --lr_grid_lpft|--lr_grid_lp_ft) grid[lp_ft]=$2; shift ;;
    --lr_grid_lora) grid[lora]=$2; shift ;;
    --lr_grid_lplora|--lr_grid_lp_lora) grid[lp_lora]=$2; shift ;;
    --lr_grid_bitfit) grid[bitfit]=$2; shift ;;
    --lr_grid_loraft|--lr_grid_lora_ft) grid[lora_ft]=$2; shift ;;
    --lr_grid_bitfitft|--lr_grid_bitfit_ft) grid[bitfit_ft]=$2; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 0 ;;
    *) die "unknown option $1 (see bash run_all.sh --help)" ;;
  esac
  shift
done

if [ $kernel_study = 1 ]; then  # Malladi et al.'s protocol on the embedded model (docs/kernel_view.md)
  [ $paper = 0 ] || die "--kernel_study and --paper are two studies; run them one at a time"
  tasks=${tasks:-"sst2 mrpc"}  # MRPC: the pair task with the shortest inputs, shipped in data/ (docs/kernel_view.md)
  methods=${methods:-"ft lp_ft"}  # the fresh head's kernel and the LP head's, as Malladi et al.'s from_linearhead
  # kernel_test: empty, every test example (the kernel's test side is computed in blocks: its cost is linear in them)
  epochs=${epochs:-10}
  out=${out:-runs_kernel}
  seeds=${seeds:-$data_seeds}  # the training seed is the data seed, as theirs
  ntk_method=structured
elif [ $paper = 1 ]; then
  tasks=${tasks:-"boolq cb rte wic wsc cola sst2 mrpc amazon pubmed"}
  seeds=${seeds:-"1001 2002 3003 4004 5005"}
  epochs=${epochs:-10}
  ntk_tasks=${ntk_tasks:-"cb rte boolq wic"} ntk_n=${ntk_n:-250} ntk_method=${ntk_method:-func}
  scale_tasks=${scale_tasks:-"cb rte amazon"} scales=${scales:-"0.1 0.5 2 5 10 50 100"}
else  # default study, sized by measurement for <= 30 minutes on a 2-core CPU (docs/results.md)
  tasks=${tasks:-"cb sst2"}
  seeds=${seeds:-"1001 2002 3003"}
  epochs=${epochs:-3}
  max_eval=${max_eval:-300}
  ntk_tasks=${ntk_tasks:-$tasks} ntk_n=${ntk_n:-32} ntk_method=${ntk_method:-structured}  # 2x func on CPU
  scale_tasks=${scale_tasks:-$tasks} scales=${scales:-"10"}
fi
methods=${methods:-"lp ft lp_ft lora lp_lora"}
out=${out:-runs}
first_seed=${seeds%% *}
# Jobs at once: 2 on a CPU study (each with half the cores: measured 1.2-1.4x the throughput of one job with all of
# them, start-up and evaluation overlapping the other's training; docs/speed.md), 1 for the paper's GPU study.
cores=$(nproc 2>/dev/null || echo 1)
if [ -z "$par" ]; then if [ $paper = 1 ] || [ "$cores" -lt 2 ]; then par=1; else par=2; fi; fi

# Every value is checked here, before any job starts: a typo stops the study at once with one line, instead of
# failing inside every job (or, printed with --print_jobs, on some other machine later).
case $ntk_method in func|structured|naive) ;;
  *) die "--ntk_method $ntk_method: use func, structured or naive (see python ntk.py --help)" ;;
esac
TASKS="boolq cb rte wic wsc cola sst2 mrpc amazon pubmed"  # data.TASKS
check_words() {  # flag, allowed words, given words
  local w
  [ -n "${3// /}" ] || die "$1 is empty; pass at least one of: $2"
  for w in $3; do has "$w" "$2" || die "$1: unknown '$w'; choose from: $2"; done
}
check_int() {  # flag, value, least allowed value; empty = not given
  [ -z "$2" ] && return
  [[ $2 =~ ^[0-9]+$ ]] && [ "$2" -ge "$3" ] || die "$1 $2: must be a whole number >= $3"
}
check_num() {  # flag, values: each a number > 0
  local v
  for v in $2; do
    [[ $v =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$ ]] && [[ ! $v =~ ^[0.]+([eE].*)?$ ]] ||
      die "$1: '$v' is not a number > 0"
  done
}
check_words --tasks "$TASKS" "$tasks"
check_words --methods "lp ft lp_ft lora lp_lora bitfit lora_ft bitfit_ft" "$methods"
[ $no_ntk = 1 ] || [ -z "$ntk_tasks" ] || check_words --ntk_tasks "$TASKS" "$ntk_tasks"
[ $no_scale = 1 ] || [ -z "$scale_tasks" ] || check_words --scale_tasks "$TASKS" "$scale_tasks"
for s in $seeds; do check_int --seeds "$s" 0; done
[ -n "${seeds// /}" ] || die "--seeds is empty; pass at least one seed"
check_int --epochs "$epochs" 1
check_int --max_steps "$max_steps" 1
check_int --max_train_samples "$max_train" 1
check_int --max_eval_samples "$max_eval" 1
check_int --ntk_n "$ntk_n" 1
check_int --patience "$patience" 0
[ -z "$batching" ] || [ "$batching" = random ] || [ "$batching" = length ] || \
  die "--batching $batching: random or length (training batches; see ft.py --help)"
check_int --jobs "$par" 1
if [ $kernel_study = 1 ]; then
  for k in $k_shots; do check_int --k_shots "$k" 1; done
  for d in $data_seeds; do check_int --data_seeds "$d" 0; done
  check_int --kernel_test "$kernel_test" 1
  check_words --kernels "sgd signgd asym_signgd" "$kernels"
  check_words --k_shots "$k_shots" "$k_shots" && check_words --data_seeds "$data_seeds" "$data_seeds"
  has lp "$methods" && die "--kernel_study fine-tunes and compares kernels; LP runs inside LP-FT / LP-LoRA: drop lp"
  check_words "--methods (--kernel_study)" "ft lp_ft lora lp_lora" "$methods"
fi
check_num --scales "$scales"
check_num --lr_grid "$lr_grid"
for m in "${!grid[@]}"; do check_num "--lr_grid_${m/_/}" "${grid[$m]}"; done
for v in "$out" "$data_dir" "$model"; do  # jobs are plain command lines (eval, --print_jobs): one word per path
  [[ $v =~ [[:space:]] ]] && die "'$v' has a space; give --out, --data_dir and --model paths without spaces"
done
[ $report_only = 0 ] || [ -d "$out" ] || die "--out $out: no such folder; run the study's jobs first"

train_cap() {  # default study: training subsets per task (the paper: all of it)
  if [ -n "$max_train" ]; then echo "$max_train"; elif [ $paper = 1 ]; then echo ""
  else case $1 in sst2) echo 1000 ;; *) echo "" ;; esac; fi  # CB: all 225
}

base() {  # flags every script shares: task, seed, model, data
  local c="--task $1 --seed $2"
  [ -n "$model" ] && c+=" --model $model"
  [ -n "$data_dir" ] && c+=" --data_dir $data_dir"
  [ $paper = 1 ] && c+=" --precision fp32"  # the authors': no bf16 autocast, no TF32, on a GPU too
  echo "$c"
}

common() {  # ... plus the train/eval subsets
  local t=$1 s=$2 c
  c=$(base "$t" "$s")
  [ -n "$(train_cap "$t")" ] && c+=" --max_train_samples $(train_cap "$t")"
  [ -n "$max_eval" ] && c+=" --max_eval_samples $max_eval"
  echo "$c"
}

train_flags() {
  local c="--epochs $epochs"
  [ -n "$max_steps" ] && c+=" --max_steps $max_steps"
  [ -n "$patience" ] && c+=" --patience $patience"
  [ $force = 1 ] && c+=" --overwrite"
  [ -z "$batching" ] && [ $paper = 1 ] && c+=" --batching random"  # the HF Trainer's sampler, the authors'
  [ -n "$batching" ] && c+=" --batching $batching"
  echo "$c"
}

lp_cmd() {  # LP for (task, seed): its head feeds LP-FT, LP-LoRA and the LP NTK
  local d="$out/$1/lp-seed$2" f=""
  [ $force = 1 ] && f=" --overwrite"
  [ $paper = 1 ] && f+=" --binary_head paper --cv_scoring accuracy"  # the authors' head and choice of C
  echo "$PY lp.py $(common "$1" "$2") --output_dir $d --cache_dir $out/cache --norm_curve 100$f"
}

lp_first() {  # "lp.py ... && " before a job that needs the LP head of (task, seed)
  # A sequential run that lists that LP job has already run it: skip a second python start-up.
  # Printed jobs keep it, so each line stands alone (its LP is fit first, or skipped as done).
  if [ $print_jobs = 0 ] && has lp "$methods" && has "$1" "$tasks" && has "$2" "$seeds"; then return; fi
  echo "$(lp_cmd "$1" "$2" | sed 's/ --overwrite//') && "  # never refit a head other jobs may be using
}

declare -A sourced=()  # EH-FT's source runs in the plan: "method task seed"
src_first() {  # "lora.py ... --wait && " before a job that starts from the source run (lora|bitfit task seed)
  # A sequential run has run it in the phase before (as LP's): nothing to add. Printed jobs chain it, so each line
  # stands alone: it is trained first, or found finished (skipped), or --wait waits for the process writing it.
  if [ $print_jobs = 0 ] && [ -n "${sourced[$1 $2 $3]:-}" ]; then return; fi
  echo "$(method_cmd "$1" "$2" "$3" | sed 's/ --overwrite//') --wait && "  # never redo a source others start from
}

method_cmd() {  # method task seed lr(optional) scale(optional)
  local m=$1 t=$2 s=$3 lr=${4:-} sc=${5:-} script=ft.py name=$1 c
  case $m in lora|lp_lora|bitfit) script=lora.py ;; esac
  [ -n "$lr" ] && name+="-lr$lr"
  [ -n "$sc" ] && name+="-scale$sc"
  c="$PY $script $(common "$t" "$s") $(train_flags) --output_dir $out/$t/$name-seed$s"
  [ -n "$lr" ] && c+=" --lr $lr"
  [ -z "$lr" ] && [ $paper = 1 ] && c+=" --lr_table table6"  # the paper's learning rates, whatever the model
  [ -n "$sc" ] && c+=" --head_scale $sc"
  [ "$m" = bitfit ] && c+=" --bitfit"
  case $m in lp_ft|lp_lora) c="$(lp_first "$t" "$s")$c --init $out/$t/lp-seed$s/lp_head.pt" ;; esac
  case $m in lora_ft|bitfit_ft) c="$(src_first "${m%_ft}" "$t" "$s")$c --init $out/$t/${m%_ft}-seed$s" ;; esac
  echo "$c"
}

ntk_cmd() {
  local m=$1 t=$2 s=$3 c
  c="$PY ntk.py $(base "$t" "$s") --n $ntk_n --method $ntk_method --output_dir $out/$t/ntk-$m-seed$s"
  [ $paper = 1 ] && c+=" --ridge 0"  # the authors' kernel_regularization: their solvers fit the raw kernel
  [ $force = 1 ] && c+=" --overwrite"
  case $m in lora|lp_lora) c+=" --lora" ;; esac
  case $m in lp_ft|lp_lora) c="$(lp_first "$t" "$s")$c --init $out/$t/lp-seed$s/lp_head.pt" ;; esac
  case $m in lora_ft|bitfit_ft) c="$(src_first "${m%_ft}" "$t" "$s")$c --init $out/$t/${m%_ft}-seed$s" ;; esac
  echo "$c"
}

# ---------------------------------------------------------------- the kernel study (--kernel_study)
# Learning rates: the MiniLM grid's SST-2 choices (ft.MINILM_LR, lora.MINILM_LR) for every task and K: not tuned for
# k-shot data (docs/kernel_view.md). Batch 8 as LM-BFF / Malladi et al.'s k-shot fine-tuning.
declare -A KS_LR=([ft]=1e-4 [lp_ft]=3e-5 [lora]=3e-3 [lp_lora]=3e-3)
two_classes() { case $1 in cb|amazon|pubmed) return 1 ;; esac; }  # data.TASKS with two labels
ks_base() { echo "$(base "$1" "$3") --k_shot $2 --data_seed $3"; }  # task K S (training seed = data seed)
ks_name() { echo "k$2-data$3-seed$3"; }  # data.run_name's suffix
ks_lp() {  # "lp.py ... && " for the LP head of (task, K, S)
  echo "$PY lp.py $(ks_base "$@") --output_dir $out/$1/lp-$(ks_name "$@") --cache_dir $out/cache && "
}
ks_method_cmd() {  # method task K S
  local m=$1 script=ft.py c
  shift
  case $m in lora|lp_lora) script=lora.py ;; esac
  c="$PY $script $(ks_base "$@") $(train_flags) --batch_size 8 --lr ${KS_LR[$m]} --output_dir $out/$1/$m-$(ks_name "$@")"
  case $m in lp_ft|lp_lora) c="$(ks_lp "$@")$c --init $out/$1/lp-$(ks_name "$@")/lp_head.pt" ;; esac
  echo "$c"
}
ks_ntk_cmd() {  # method kind task K S: the kernel of that method's start (head and trainable parameters)
  local m=$1 kind=$2 c
  shift 2
  c="$PY ntk.py $(ks_base "$@") --kernel $kind --output_dir $out/$1/ntk-$m-$kind-$(ks_name "$@")"
  [ -n "$kernel_test" ] && c+=" --n_test $kernel_test"  # the kernel's test examples (report: FT on the same ones)
  if [ "$kind" = sgd ]; then c+=" --method structured"; else c+=" --method func --max_memory_gb 3"; fi  # two jobs at once fit in 24 GB
  two_classes "$1" && c+=" --binary_logit"  # their single-logit kernels: every solver applies
  [ $force = 1 ] && c+=" --overwrite"
  case $m in lora|lp_lora) c+=" --lora" ;; esac
  case $m in lp_ft|lp_lora) c="$(ks_lp "$@")$c --init $out/$1/lp-$(ks_name "$@")/lp_head.pt" ;; esac
  echo "$c"
}

job_kind() { case $1 in lora|lp_lora|bitfit) echo lora ;; *) echo train ;; esac; }
jobs=() names=() kinds=()
add() {  # name command [kind task n]: kind and size feed the time-left estimate (estimate_left below)
  names+=("$1"); jobs+=("$2"); kinds+=("${3:-train} ${4:--} ${5:-0}")
}
add_source() {  # method task seed: EH-FT's source run (LoRA, BitFit at its default lr), once, in its own phase
  [ -n "${sourced[$1 $2 $3]:-}" ] && return
  sourced[$1 $2 $3]=1
  add "source $1 $2 seed $3" "$(method_cmd "$1" "$2" "$3")" "$(job_kind "$1")" "$2"
}
if [ $kernel_study = 1 ]; then
  for t in $tasks; do for k in $k_shots; do for s in $data_seeds; do
    for m in $methods; do
      add "$m $t k$k data $s" "$(ks_method_cmd "$m" "$t" "$k" "$s")" "$(job_kind "$m")" "$t" "$k"
      for kind in $kernels; do
        add "kernel $kind $m $t k$k data $s" "$(ks_ntk_cmd "$m" "$kind" "$t" "$k" "$s")" ntk "$t" "$k"
      done
    done
  done; done; done
  no_ntk=1 no_scale=1 methods_loop=""
else
  methods_loop=1
fi
ordered=""  # LP first, whatever the order of --methods: the other methods start from its head
has lp "$methods" && ordered=lp
for m in $methods; do if [ "$m" != lp ]; then ordered+=" $m"; fi; done
for t in ${methods_loop:+$tasks}; do
  for s in $seeds; do
    for m in $ordered; do
      if [ "$m" = lp ]; then add "lp $t seed $s" "$(lp_cmd "$t" "$s")" lp "$t"; continue; fi
      case $m in lora_ft|bitfit_ft) add_source "${m%_ft}" "$t" "$s" ;; esac
      lrs=${grid[$m]:-$lr_grid}
      if [ -z "$lrs" ] && has "${m}_ft" "$methods"; then add_source "$m" "$t" "$s"  # the same run: EH-FT's source
      elif [ -z "$lrs" ]; then add "$m $t seed $s" "$(method_cmd "$m" "$t" "$s")" "$(job_kind "$m")" "$t"
      else
        for lr in $lrs; do add "$m $t seed $s lr $lr" "$(method_cmd "$m" "$t" "$s" "$lr")" "$(job_kind "$m")" "$t"; done
      fi
    done
  done
done
if [ $no_scale = 0 ]; then  # norm scaling: every seed, the head scaled at the start (scale 1 = the runs above)
  for t in $scale_tasks; do
    ms="ft lp_ft"; case $t in cb|rte) ms="ft lp_ft lora lp_lora" ;; esac
    [ $paper = 0 ] && ms="ft"  # default study: FT's fresh head x10 against x1, claim c6 (docs/results.md)
    for s in $seeds; do
      for m in $ms; do
        for sc in $scales; do
          add "norm scaling $m $t seed $s x$sc" "$(method_cmd "$m" "$t" "$s" "" "$sc")" "$(job_kind "$m")" "$t"
        done
      done
    done
  done
fi
if [ $no_ntk = 0 ]; then  # FT, LP-FT (and EH-FT) kernels for every seed (claim c5 is paired by seed); LoRA's for the first
  for t in $ntk_tasks; do
    for s in $seeds; do
      for m in ft lp_ft lora lp_lora lora_ft bitfit_ft; do
        case $m in lora|lp_lora) [ "$s" = "$first_seed" ] || continue ;; esac
        case $m in lora_ft|bitfit_ft) has "$m" "$methods" || continue ;; esac
        add "ntk $m $t seed $s" "$(ntk_cmd "$m" "$t" "$s")" ntk "$t" "$ntk_n"
      done
    done
  done
fi

lps=() srcs=() rest=()  # the phases: LP, all of it (any other job may start from an LP head); EH-FT's sources; the rest
for i in "${!jobs[@]}"; do
  case ${names[$i]} in "lp "*) lps+=("$i") ;; "source "*) srcs+=("$i") ;; *) rest+=("$i") ;; esac
done
if [ $print_jobs = 1 ]; then
  for i in "${lps[@]}" "${srcs[@]}" "${rest[@]}"; do printf '%s\n' "${jobs[$i]}"; done
  exit 0
fi

finish() {  # calibrate every run under $out, then the report; a failure is reported and the report still made
  mapfile -t dirs < <(find "$out" -name logits.npz -not -path "*/cache/*" -printf '%h\n' | sort)
  local cal=""
  [ $force = 1 ] && cal="--overwrite"
  [ $paper = 1 ] && cal+=" --optimizer adam"  # the paper's fit of T (Adam, lr 1e-3, patience 10); LBFGS otherwise
  if [ ${#dirs[@]} -gt 0 ]; then
    $PY calibrate.py $cal "${dirs[@]}" || { echo "warning: calibration failed" >&2; failed+=("calibrate.py"); }
  fi
  echo "[report $(( (SECONDS - start) / 60 ))m]"
  $PY report.py --root "$out" || failed+=("report.py --root $out")
}

# ---------------------------------------------------------------- the time-left estimate
# Each job is weighed by its kind (lp, train, lora, ntk) and size in units: token passes (a training example is
# three: forward and backward), plus start-up and per-optimizer-step costs in the same units. Each kind's seconds
# per unit is measured on that kind's finished jobs (before its first, a prior ratio to a measured kind), so the
# estimate is right once one job of each kind has finished and close before: a fine-tuning epoch is not an LP fit.
probe_sizes() {  # one python start before the first job: per task the training examples (after the study's cap),
  local t caps=""  # evaluation examples, mean tokens per training example, test examples, classes
  for t in $(printf '%s\n' $tasks $ntk_tasks $scale_tasks | sort -u); do caps+=" $t:$(train_cap "$t")"; done
  "$PY" - "$model" "$data_dir" "${max_eval:-0}" $caps <<'EOF' 2>/dev/null
import sys

import data

model, data_dir, max_eval, *caps = sys.argv[1:]
try:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(data.resolve_model(model or None))
except Exception:  # no tokenizer here: about 4 characters a token
    tok = None
cap = lambda s, c: min(len(s), int(c)) if c and int(c) > 0 else len(s)
for tc in caps:
    t, c = tc.split(":")
    try:
        sp = data.load_task(t, data_dir or None)
    except BaseException:  # the job itself will say what is wrong
        continue
    texts = sp["train"].texts[:200]
    if tok is not None:
        lens = [len(tok(a, b, truncation=True, max_length=128)["input_ids"]) for a, b in texts]
    else:
        lens = [min(128, (len(a) + len(b or "")) / 4 + 3) for a, b in texts]
    print(t, cap(sp["train"], c), sum(cap(s, max_eval) for k, s in sp.items() if k != "train"),
          round(sum(lens) / max(len(lens), 1), 1), cap(sp["test"], max_eval), len(data.get_task(t).labels))
EOF
}

estimate_left() {  # -> seconds left, from the plan, the sizes and the start/end times of the jobs so far
  awk -v now="$SECONDS" -v par="$par" -v epochs="${epochs:-3}" -v max_steps="${max_steps:-0}" \
      -v ks="$kernel_study" -v n_test="${kernel_test:-0}" -v nrun="$n" '
    BEGIN { S = 40000; P = 250; FIT = 40; Q = 0.2    # start-up, per step, LP fit per example, eNTK pair factor
            prior["lp"] = 1.0; prior["train"] = 1.0; prior["lora"] = 1.0; prior["ntk"] = 1.0 }
    FILENAME ~ /sizes$/ { ntr[$1] = $2; nev[$1] = $3; L[$1] = $4; nte[$1] = $5; C[$1] = $6; next }
    FILENAME ~ /plan$/ { kind[$1] = $2; task[$1] = $3; kn[$1] = $4; next }
    $1 == "start" { st[$2] = $3 }
    $1 == "end" { sec[$2] = $4 }
    $1 == "fail" { gone[$2] = 1 }
    function units(i,   t, tr, ev, l, c, steps, ep, m) {
      t = task[i]; l = (t in L) ? L[t] : 64; ev = (t in nev) ? nev[t] : 600; c = (t in C) ? C[t] : 2
      tr = (ks && kn[i] > 0) ? kn[i] * c : ((t in ntr) ? ntr[t] : 1000)
      if (kind[i] == "lp") return S + (tr + ev) * l + FIT * tr
      if (kind[i] == "ntk") {
        tr = ks ? tr : kn[i]; m = n_test > 0 ? n_test : (ks && t in nte) ? nte[t] : tr
        if (t in nte && nte[t] < m) m = nte[t]
        if (ks) m += tr                                 # the k-shot val split (as many as train) beside the test
        return S + 3 * c * (tr + m) * l + Q * tr * (tr + m) * l
      }
      steps = epochs * int((tr + 15) / 16); ep = epochs
      if (max_steps > 0 && steps > max_steps) { ep = epochs * max_steps / steps; steps = max_steps }
      return S + P * steps + 3 * ep * tr * l + (ep + 1) * ev * l
    }
    END {
      for (i in kind) { u[i] = units(i); if (i in sec) { su[kind[i]] += u[i]; ss[kind[i]] += sec[i] } }
      ref = ("train" in su) ? "train" : ("lora" in su) ? "lora" : ("ntk" in su) ? "ntk" : "lp"
      if (!(ref in su)) { print -1; exit }
      for (k in prior) rate[k] = (k in su) ? ss[k] / su[k] : prior[k] / prior[ref] * ss[ref] / su[ref]
      for (i in kind) if (!(i in sec) && !(i in gone)) {
        p = u[i] * rate[kind[i]]
        if (i in st) { p -= now - st[i]; if (p < 0) p = 0 }  # a running job: what is left of it
        left += p
      }
      print int(left / par + 8 + 0.5 * nrun)                # + calibration and the report (16 s for 18 jobs)
    }' "$logs/sizes" "$logs/plan" "$logs/times"
}

fmt_min() {  # whole minutes from 5 min on (rounding moves them by 10% at most); seconds below, where a minute is a lot
  if [ "$1" -ge 300 ]; then echo "$(( ($1 + 30) / 60 )) min"; elif [ "$1" -ge 120 ]; then echo "$(( ($1 + 5) / 10 * 10 )) s"
  else echo "$1 s"; fi
}

failed=()
run_one() {  # job index: run it; with --jobs > 1 its output goes to a log file, and a line says when it is done
  local i=$1 t0=$SECONDS log k
  echo "[$((i + 1))/$n $(( (SECONDS - start) / 60 ))m] ${names[$i]}"
  echo "start $i $SECONDS" >> "$logs/times"
  log="$logs/$(printf '%02d' $((i + 1)))-${names[$i]// /-}.log"
  if [ "$par" = 1 ]; then eval "${jobs[$i]}"; else eval "${jobs[$i]}" > "$log" 2>&1; fi && {
    echo "$i" >> "$logs/done"
    echo "end $i $SECONDS $((SECONDS - t0))" >> "$logs/times"
    k=$(wc -l < "$logs/done")
    left=$(estimate_left)
    if [ "$par" = 1 ]; then
      [ "$k" -lt "$n" ] && [ "$left" -ge 0 ] && echo "  about $(fmt_min "$left") left (at $((SECONDS - start)) s)"
    else
      echo "  done: ${names[$i]} ($((SECONDS - t0)) s); $k of $n jobs$( [ "$left" -ge 0 ] &&
        echo ", about $(fmt_min "$left") left (at $((SECONDS - start)) s)")"
    fi
    return 0
  }
  echo "fail $i $SECONDS" >> "$logs/times"  # not remaining, and no measure of its kind's pace
  [ "$par" = 1 ] || tail -n 2 "$log" >&2
  echo "warning: job failed: ${names[$i]}${log:+ (log: $log)}" >&2  # a diverged lr, say: the study goes on
  echo "${jobs[$i]}" >> "$logs/failed"  # a file, not an array: with --jobs > 1 this runs in a subshell
}

run_phase() {  # job indices, at most $par at once
  local i
  for i in "$@"; do
    if [ "$par" = 1 ]; then run_one "$i"; continue; fi
    while [ "$(jobs -pr | wc -l)" -ge "$par" ]; do wait -n || true; done
    run_one "$i" &
  done
  wait
}

if [ "$par" -gt 1 ] && [ -z "${OMP_NUM_THREADS:-}" ]; then  # the cores shared out, not oversubscribed
  export OMP_NUM_THREADS=$(( cores / par > 0 ? cores / par : 1 ))
fi
start=$SECONDS
logs=$out/logs
if [ $report_only = 1 ]; then
  mkdir -p "$logs" && rm -f "$logs/failed"
  finish
else
  n=${#jobs[@]}
  mkdir -p "$logs" && rm -f "$logs/failed" "$logs/done" "$logs/times"
  probe_sizes > "$logs/sizes" || true
  for i in "${!jobs[@]}"; do echo "$i ${kinds[$i]}"; done > "$logs/plan"
  echo "run_all: ${n} jobs, $par at a time (tasks: $tasks; methods: $methods; seeds: $seeds; epochs: $epochs)" \
    "-> $out/ (logs: $logs/)"
  run_phase "${lps[@]}"
  run_phase "${srcs[@]}"
  run_phase "${rest[@]}"
  echo "[calibration $(( (SECONDS - start) / 60 ))m]"
  finish
fi
[ -f "$logs/failed" ] && mapfile -t -O ${#failed[@]} failed < "$logs/failed"
echo "done in $(( (SECONDS - start) / 60 )) min: $out/report.md"
if [ ${#failed[@]} -gt 0 ]; then
  printf 'failed jobs (%d), shown as failed in the report:\n' "${#failed[@]}" >&2
  printf '  %s\n' "${failed[@]}" >&2
  exit 1
fi
