#!/usr/bin/env bash
# One call on a GPU machine: the kit's CUDA tests, its speed against its goals, and a tiny study end to end.
#
#   bash tools/gpu_check.sh OUT                 # one CUDA GPU: about 5 minutes on an H200
#   bash tools/gpu_check.sh OUT --large         # ... and the 2,000 x 2,000 roberta-base eNTK (about 8 more minutes)
#   bash tools/gpu_check.sh OUT --dry           # a CPU: every part on tiny configs, under 3 minutes (CI runs it)
#
# Parts, each under its own timeout (its cap, or what is left of --budget SECONDS), each writing its file as it
# ends, so a part that runs out of time costs only itself. The untimed parts run side by side, the timed ones alone:
#   env        versions, the device, cores                                      -> env.json
#   tests      tests/test_cuda.py (CUDA against CPU / float64 references)        -> tests.json
#   study      run_all.sh on CB, 2 seeds, every method, eNTK, calibration, report, on a MiniLM-shaped model with
#              random weights (tools/random_model.py)                            -> study.tgz (no weights)
#   bench      bench.py: HF fp32, HF bf16, ft.py's step with and without torch.compile, LoRA, feature extraction,
#              MFU against the bf16 matrix-multiply peak measured in the same run, where a step's time goes
#                                                                                -> bench.json
#   ntk_250    bench_ntk.py: func and structured at N = 250, roberta-base shape  -> ntk_250.json
#   ntk_2000   (--large) bench_ntk.py: structured at N = 2,000                   -> ntk_2000.json
# and summary.json (each part's status and seconds, the goals), log.txt (everything printed): 8 files at most.
# Options: --dry, --large, --budget SECONDS (default 330; 900 with --large), --tokenizer DIR (the study's and the
# tests' tokenizer; default the embedded model's, or $KIT_TOKENIZER), --python PY (default python).
set -uo pipefail
cd "$(dirname "$0")/.."
out="" dry=0 large=0 budget="" PY=${PYTHON:-python}
while [ $# -gt 0 ]; do
  case $1 in
    --dry) dry=1 ;;
    --large) large=1 ;;
    --budget) budget=${2:-}; shift ;;
    --tokenizer) export KIT_TOKENIZER=${2:-}; shift ;;
    --python) PY=${2:-}; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 0 ;;
    -*) echo "error: unknown option $1 (see bash tools/gpu_check.sh --help)" >&2; exit 2 ;;
    *) [ -z "$out" ] || { echo "error: one OUT folder only (got $out and $1)" >&2; exit 2; }; out=$1 ;;
  esac
  shift
done
[ -n "$out" ] || { echo "error: name the folder to write: bash tools/gpu_check.sh OUT [--dry]" >&2; exit 2; }
budget=${budget:-$([ $large = 1 ] && echo 900 || echo 330)}
[[ $budget =~ ^[0-9]+$ ]] && [ "$budget" -ge 60 ] || { echo "error: --budget '$budget': whole seconds >= 60" >&2; exit 2; }
[ -z "${KIT_TOKENIZER-x}" ] && { echo "error: --tokenizer needs a folder" >&2; exit 2; }
command -v "$PY" >/dev/null || { echo "error: --python $PY: no such interpreter" >&2; exit 2; }
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export LPFT_DATA=${LPFT_DATA:-$PWD/data}  # the shipped CB, RTE, SST-2 files
if [ $dry = 1 ]; then export CUDA_VISIBLE_DEVICES="" KIT_TEST_DEVICE=cpu; fi
exec > >(tee "$out/log.txt") 2>&1
start=$SECONDS
: > "$work/parts"

part() {  # name cap command...: run it under min(cap, budget left); one line of its status to $work/parts
  local name=$1 cap=$2 left t0 rc
  shift 2
  left=$(( budget - (SECONDS - start) - 10 ))  # 10 s kept for the summary
  [ "$cap" -lt "$left" ] || cap=$left
  if [ "$cap" -lt 15 ]; then
    echo "== $name: skipped (the budget is spent)"
    echo "$name skipped 0 0" >> "$work/parts"
    return
  fi
  echo "== $name (at most ${cap} s) $(date -u +%H:%M:%S)"
  t0=$SECONDS
  timeout --kill-after=10 "$cap" "$@"
  rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  echo "$name $rc $((SECONDS - t0)) $cap" >> "$work/parts"
}

# ---------------------------------------------------------------- sizes
if [ $dry = 1 ]; then
  shape=tiny n_small=8 n_large=16
  bench_args=(--model tiny --batch_size 4 --max_len 32 --steps 2 --warmup 1 --infer_examples 16
              --compile_backend aot_eager)  # the CPU's Inductor build: 29 of the bench's 38 s
  ntk_args=(--model_config tiny --max_len 16)
  study_args=(--seeds 1001 --methods "lp_ft lp_lora" --max_train_samples 16 --max_eval_samples 16 --epochs 1
              --no_ntk --no_scale --jobs 2)  # lp, ft, lora once, two at a time; run_all's NTK jobs are the
  # suite's tiny study's (tests/conftest.py), ntk.py's engines the ntk_250 and ntk_2000 parts'; they took 40 s here
else  # bench.py and bench_ntk.py default to roberta-base's shape (random init) on CUDA
  shape=minilm n_small=250 n_large=2000 bench_args=() ntk_args=()
  study_args=(--seeds "1001 2002" --max_eval_samples 64 --epochs 2 --ntk_n 16 --jobs 6)
fi

part env 30 "$PY" - "$out/env.json" <<'EOF'
import json, os, platform, subprocess, sys
import numpy, sklearn, torch, transformers
cuda = torch.cuda.is_available()
env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
       "scikit-learn": sklearn.__version__, "numpy": numpy.__version__, "cuda": torch.version.cuda if cuda else None,
       "device": torch.cuda.get_device_name() if cuda else "cpu", "cores": os.cpu_count(),
       "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None}
try:
    env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                        "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError):
    env["nvidia_smi"] = None
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(env)
EOF

# ---------------------------------------------------------------- untimed, side by side: the tests and the study
tests() {  # -v: a line per test as it ends, so a timed-out run still says which passed
  "$PY" -m pytest tests/test_cuda.py -o addopts= -v -rfE -p no:cacheprovider --junitxml="$work/tests.xml" > "$work/tests.log" 2>&1
  local rc=$?
  "$PY" - "$work/tests.xml" "$work/tests.log" "$out/tests.json" <<'EOF'
import json, re, sys, xml.etree.ElementTree as ET
xml_path, log_path, out = sys.argv[1:]
cases = []
try:
    for c in ET.parse(xml_path).getroot().iter("testcase"):
        bad = [s for s in c if s.tag in ("failure", "error", "skipped")]
        cases.append({"test": c.get("name"), "status": bad[0].tag if bad else "passed",
                      "seconds": float(c.get("time", 0)), "message": bad[0].get("message", "")[:2000] if bad else "",
                      "properties": {p.get("name"): p.get("value") for p in c.iter("property")}})
except (OSError, ET.ParseError):  # killed at its timeout: the -v lines of the tests that ended
    for m in re.finditer(r"::(\S+) (PASSED|FAILED|ERROR|SKIPPED)", open(log_path).read()):
        cases.append({"test": m[1], "status": {"FAILED": "failure"}.get(m[2], m[2].lower()), "from": "log"})
count = {s: sum(c["status"] == s for c in cases) for s in ("passed", "failure", "error", "skipped")}
json.dump({"counts": count, "complete": any("from" not in c for c in cases), "cases": cases}, open(out, "w"), indent=1)
print("tests:", count)
EOF
  cat "$work/tests.log"
  return $rc
}
study() {  # a random MiniLM-shaped model, run_all.sh, then the study packed without weights, checkpoints and caches
  "$PY" tools/random_model.py "$work/model" --shape $shape &&
    eval "args=($STUDY_ARGS)" && PYTHON=$PY bash run_all.sh --tasks cb "${args[@]}" --model "$work/model" --out "$work/study" \
      > "$work/study.log" 2>&1
  local rc=$?
  cp "$work/study.log" "$work/study/" 2>/dev/null
  tar -C "$work" -czf "$out/study.tgz" --exclude='*.safetensors' --exclude='ckpt.pt' --exclude='*.npy' \
    --exclude='kernels.npz' --exclude='features.npz' study
  tail -n 40 "$work/study.log"
  return $rc
}
export -f tests study  # timeout runs programs: each part a bash that calls its function
export PY work out shape STUDY_ARGS="${study_args[*]@Q}"
part tests 200 bash -c tests > "$work/tests.out" &
t_pid=$!
part study 240 bash -c study > "$work/study.out" &
wait $t_pid $!  # these two only: a bare wait would also wait for the tee of log.txt
cat "$work/tests.out" "$work/study.out"

# ---------------------------------------------------------------- timed, one at a time
part bench 150 "$PY" bench.py --suite synthetic --compile ft --profile "${bench_args[@]}" --output "$out/bench.json"
part ntk_250 90 "$PY" bench_ntk.py --methods func,structured --n $n_small --paper_n 1 "${ntk_args[@]}" \
  --out "$out/ntk_250.json"
if [ $large = 1 ] || [ $dry = 1 ]; then
  part ntk_2000 600 "$PY" bench_ntk.py --methods structured --n $n_large --paper_n 0 "${ntk_args[@]}" \
    --out "$out/ntk_2000.json"
fi

# ---------------------------------------------------------------- summary.json: each part and the goals
"$PY" - "$out" "$work/parts" "$((SECONDS - start))" "$budget" "$dry" <<'EOF'
import json, sys
from pathlib import Path
out, parts, total, budget, dry = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
rows = {}
for line in open(parts):
    name, rc, secs, cap = line.split()
    rows[name] = {"exit": None if rc == "skipped" else int(rc), "seconds": int(secs), "cap_s": int(cap),
                  "status": "skipped" if rc == "skipped" else "timed out" if rc in ("124", "137") else
                  "ok" if rc == "0" else "failed"}
read = lambda f: json.loads((out / f).read_text()) if (out / f).exists() else {}
goals = dict(read("bench.json").get("goals", {}))  # bench.py's own: ft.py's best step against HF bf16
for f, n, target in (("ntk_250.json", 250, 60), ("ntk_2000.json", 2000, 300)):
    m = read(f).get("methods", {})
    if m:
        fastest = min(m, key=lambda k: m[k]["seconds"])
        goals[f"entk_{n}_seconds"] = {"seconds": m[fastest]["seconds"], "method": fastest, "target": f"< {target}",
                                      "ratio_to_target": m[fastest]["seconds"] / target}
summary = {"dry": dry, "seconds": total, "budget_s": budget, "parts": rows, "tests": read("tests.json").get("counts"),
           "goals": goals}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
EOF
echo "gpu_check: $((SECONDS - start)) s; $(ls "$out" | wc -l) files in $out"
awk '$2 != "0" {bad = 1} END {exit bad}' "$work/parts"  # exit 0 only when every part ran and passed
