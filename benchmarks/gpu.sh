#!/usr/bin/env bash
# One prepared run on a GPU machine, at most BUDGET_S seconds (default 500): first which
# command-buffer settings run the seed step fastest; then, with the fastest, the whole 50-epoch seed
# recipe through train.py, the GPU tests (exact resume included), BatchNorm's custom derivative
# against autodiff, speed at other batch sizes and in bfloat16, a profile of one step, the presets,
# and the PyTorch peer (TORCH_PEER=1; measured on an H200 already, so off by default).
#
#     bash benchmarks/gpu.sh [OUT_DIR]          # default OUT_DIR: benchmarks/results
#     DRY_RUN=1 bash benchmarks/gpu.sh          # its figures go to a temporary folder, not results
#
# Every figure is one JSON line in OUT_DIR/gpu.jsonl (fields what, device_kind, dtype, batch_size
# and the figure); logs go beside it; a short table is printed last. Each part has its own time
# limit, cut to what is left of BUDGET_S; a part that would get under 20 s is skipped, so the script
# ends in time whatever hangs. Needs no TensorFlow: the data is a CIFAR-shaped synthetic archive
# written here (timing does not depend on the pixels).
set -u
DEFAULT_OUT=benchmarks/results
[ "${DRY_RUN:-0}" = 1 ] && DEFAULT_OUT=$(mktemp -d)/results  # a CPU's figures never join the GPU's
OUT=$(realpath -m "${1:-$DEFAULT_OUT}")
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
R=$OUT/gpu.jsonl
DATA=$(mktemp -d)/cifar
T0=$(date +%s)
BUDGET=${BUDGET_S:-500}
PY=${PYTHON:-python3}
TORCH_PY=${TORCH_PYTHON:-$PY}
# DRY_RUN=1: the same script, shrunk to check it on a CPU (tiny model, 2 epochs, few steps).
if [ "${DRY_RUN:-0}" = 1 ]; then
  N_TRAIN=2000; N_TEST=500; SPEED="--num_filters 4 --stage_sizes 1,1,1 --steps 20 --steps_per_call 10"
  SEED="--epochs 2 --num_filters 4 --stage_sizes 1,1,1"
  TORCH="--device cpu --mode eager --steps 5 --warmup 2 --repeats 1 --n_train 2000"
  KERAS="--limit 320"
  MANY="--num_filters 4 --stage_sizes 1,1,1 --k 1,2 --steps_per_call 5 --calls 2"
  OOM="--num_filters 4 --stage_sizes 1,1,1 --batch_size 1000"  # no OOM on a CPU: checks the part runs
else
  N_TRAIN=50000; N_TEST=10000; SPEED="--steps 400"
  SEED=""; TORCH=""; KERAS=""
  MANY="--k 1,2,4,8,16"
  OOM="--batch_size 32768 --num_filters 128 --stage_sizes 3,3,3"  # far past the card's memory
fi
# Command-buffer settings tried on top of resnet_jax.tuning's GPU flags (tag:flags). A batch-32
# step is about 330 small kernels (experiments/gpu_kernels/gpu_hlo.py), each using a sliver of the GPU. The
# defaults let independent kernels of a step run at once (CONCURRENT: 1.39x XLA's LHS on an H200,
# 2026-11-30); "lhs" is XLA's own scheduling, "unroll" unrolls the 100-step loop into one graph.
# CONCURRENT_REGIONS failed there ("Concurrent region ids are not monotonic", jax 0.11.2).
VARIANTS=(
  "default:"
  "lhs:--xla_gpu_command_buffer_scheduling_mode=LHS"
  "unroll:--xla_gpu_command_buffer_unroll_loops=true"
)
BEST=""

part() { echo "=== $1 ($(( $(date +%s) - T0 )) s)"; }
# PARTS="seed50 second tests" runs only those parts, in the script's order (default: all but
# warmup_control and keras50): sweep seed50 start many oom warmup_control second tests bn speed
# profile presets keras50 torch.
# (Part bodies are not indented: their heredocs and python -c programs must start in column 1.)
want() {
  local parts=" ${PARTS:-all} "
  if [[ $parts == *" $1 "* ]]; then return 0; fi
  [[ $parts == *" all "* && $1 != warmup_control && $1 != keras50 ]]
}
record() { echo "$1" >> "$R"; echo "$1"; }
# limit N: N seconds, or what is left of the budget if less; fails (skip the part) under 20 s left.
limit() {
  local left=$(( BUDGET - ($(date +%s) - T0) ))
  if [ "$left" -lt 20 ]; then echo "    (skipped: ${left} s of the budget left)" >&2; return 1; fi
  echo $(( left < $1 ? left : $1 ))
}

part "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
$PY - <<'EOF' >> "$R"
import time
t = time.perf_counter()
import ml_dtypes  # 0.7.0 took 1.0 s to import on the CPU machines (pyproject excludes it)
ml_dtypes_s = time.perf_counter() - t
import json, platform, jax, flax, numpy, optax, orbax.checkpoint as ocp
d = jax.devices()[0]
print(json.dumps({"what": "machine", "device_kind": d.device_kind, "platform": d.platform,
                  "devices": jax.device_count(), "python": platform.python_version(),
                  "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
                  "orbax": ocp.__version__, "numpy": numpy.__version__,
                  "ml_dtypes": ml_dtypes.__version__, "ml_dtypes_import_s": round(ml_dtypes_s, 2),
                  "cpu_cores": __import__("os").cpu_count(), "dtype": None, "batch_size": None}))
EOF
tail -1 "$R"

# CIFAR-10 itself (JPEG-75 in class folders, shared/data/README.md) for the 50-epoch run, when it
# travelled with the working tree (or CIFAR_ARCHIVE names it): decoded once here with Pillow into
# resnet_jax's cache, so train.py's timer starts with the arrays ready.
REAL=${CIFAR_ARCHIVE:-}
for c in shared/data/cifar10-jpeg75.tar.gz ../shared/data/cifar10-jpeg75.tar.gz data/cifar10-jpeg75.tar.gz; do
  if [ -z "$REAL" ] && [ -f "$c" ]; then REAL=$(realpath "$c"); fi
done
if [ -n "$REAL" ]; then
  part "decode CIFAR-10 itself ($REAL) into resnet_jax's cache"
  t=$(limit 120) && timeout "$t" $PY -c 'import sys, time, resnet_jax as rj
t = time.time(); d = rj.load_dataset(data_dir=sys.argv[1])
print(f"{len(d.train_images)} + {len(d.test_images)} images {d.image_shape}, {d.num_classes} classes, {time.time() - t:.1f} s")' "$REAL"
  [ "${DRY_RUN:-0}" = 1 ] || DATA=$REAL  # the dry run keeps its small synthetic set for the 50 epochs
fi

# the synthetic set: the data of the 50 epochs when CIFAR-10 itself is not here (and of the dry run)
if [ "$DATA" != "$REAL" ]; then
part "synthetic CIFAR-10 archive ($N_TRAIN + $N_TEST images)"
$PY - "$DATA" $N_TRAIN $N_TEST <<'EOF'
import sys
sys.path.insert(0, "benchmarks")
import resnet_jax as rj
from common import random_cifar
print(rj.data.cifar_archive.write_archive(sys.argv[1], random_cifar(int(sys.argv[2]), int(sys.argv[3])), tar=False))
EOF
fi

if want sweep; then
part "which command-buffer settings run the seed step fastest (batch 32, float32)"
SWEEP=$OUT/flag_sweep.jsonl
: > "$SWEEP"
for v in "${VARIANTS[@]}"; do
  t=$(limit 50) || break
  XLA_FLAGS="${v#*:}" timeout "$t" $PY benchmarks/speed.py --batch_size 32 $SPEED --out "$SWEEP" \
    --tag "flags_${v%%:*}" | cut -c1-200
done
cat "$SWEEP" >> "$R"
BEST=$($PY benchmarks/common.py fastest "$SWEEP" "${VARIANTS[@]}")
export XLA_FLAGS="$BEST"
echo "fastest: XLA_FLAGS='$BEST' on top of resnet_jax.tuning.GPU_XLA_FLAGS; used from here on"
record "{\"what\": \"flags_chosen\", \"xla_flags\": \"$BEST\", \"device_kind\": null, \"dtype\": \"float32\", \"batch_size\": 32}"
fi

if want seed50; then
part "the seed recipe end to end: train.py, 50 epochs ($DATA)"
WORK=$(mktemp -d)/seed50
start=$(date +%s.%N)
t=$(limit 240) && timeout "$t" $PY train.py --workdir "$WORK" --data_dir "$DATA" --verbose 1 $SEED 2>&1 \
  | $PY -c 'import sys, time
t0 = time.time()
for line in sys.stdin:
    print(f"{time.time() - t0:8.2f} {line}", end="", flush=True)' > "$OUT/seed_50_epochs.log"
end=$(date +%s.%N)
tail -4 "$OUT/seed_50_epochs.log"
$PY - "$WORK" "$start" "$end" "$OUT/seed_50_epochs.log" "$DATA" <<'EOF' >> "$R"
import json, os, sys, jax
work, start, end, log = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
path = f"{work}/metrics.jsonl"
rows = [json.loads(l) for l in open(path)] if os.path.exists(path) else []
text = open(log).read() if os.path.exists(log) else ""
first = next((float(l.split()[0]) for l in text.splitlines() if "Epoch 1/" in l), None)
test = [l.split("Test accuracy:")[1].strip() for l in text.splitlines() if "Test accuracy:" in l]
print(json.dumps({
    "what": "seed_50_epochs", "device_kind": jax.devices()[0].device_kind, "dtype": "float32",
    "batch_size": 32, "seconds": round(end - start, 1), "epochs": len(rows),
    "finished": "Test accuracy" in text, "seconds_before_epoch_1": first,
    "test_accuracy": float(test[-1]) if test else None, "data": sys.argv[5],
    "epoch_seconds_first": round(rows[0]["seconds"], 2) if rows else None,
    "epoch_seconds_median": round(sorted(r["seconds"] for r in rows)[len(rows) // 2], 3) if rows else None,
    "epoch_seconds_sum": round(sum(r["seconds"] for r in rows), 1),
    "xla_flags": os.environ.get("XLA_FLAGS", "")}))
EOF
tail -1 "$R"
fi

if want start; then
part "where train.py's start goes, by phase: cold and warm compile cache, the compile begun early or not"
t=$(limit 120) && timeout "$t" $PY benchmarks/startup.py --repeats 1 --compile_early on,off --out "$R" \
  -- --data_dir "$DATA" $SEED | cut -c1-400
fi

if want many; then
part "K runs in one program: vmap, unrolled, sequential (benchmarks/many_runs.py; issues 30, 31)"
t=$(limit 150) && timeout "$t" $PY benchmarks/many_runs.py $MANY --out "$R" | cut -c1-220
fi

if want oom; then
part "out of memory on the card: a batch too large ends in faults.out_of_memory_as's one line"
WORK4=$(mktemp -d)/oom
t=$(limit 60) && timeout "$t" $PY train.py --workdir "$WORK4" --data_dir "$DATA" --epochs 1 $OOM > "$OUT/oom.log" 2>&1
rc=$?
tail -2 "$OUT/oom.log" | cut -c1-300
$PY - "$OUT/oom.log" $rc <<'EOF2' >> "$R"
import json, sys
lines = [l for l in open(sys.argv[1]).read().splitlines() if l.strip()]
errors = [l for l in lines if l.startswith("error:")]
print(json.dumps({"what": "oom", "exit": int(sys.argv[2]), "one_line": len(errors) == 1 and "Traceback" not in "\n".join(lines),
                  "line": errors[-1][:300] if errors else lines[-1][:300] if lines else "", "device_kind": None,
                  "dtype": "float32", "batch_size": None}))
EOF2
tail -1 "$R"
fi

if want warmup_control; then
part "control: a cached start without process.warm_gpu_libraries (cuDNN first reached in a CUDA graph)"
WORK3=$(mktemp -d)/control
t=$(limit 60) && timeout "$t" $PY -c 'import sys
from resnet_jax import cli, process
process.warm_gpu_libraries = lambda: None
sys.argv[0] = "train.py"
sys.exit(cli.main())' --workdir "$WORK3" --data_dir "$DATA" --verbose 1 $SEED --epochs 1 > "$OUT/warmup_control.log" 2>&1
rc=$?
grep -E "Compiled in|cudnn handle|Test accuracy" "$OUT/warmup_control.log" | head -3 | cut -c1-200
record "{\"what\": \"warmup_control\", \"exit\": $rc, \"cudnn_error\": $(grep -c 'cudnn handle' "$OUT/warmup_control.log"), \"device_kind\": null, \"dtype\": \"float32\", \"batch_size\": 32}"
fi

if want second; then
part "a second start of the same shapes: the compilation cache (time to Epoch 1)"
WORK2=$(mktemp -d)/second
t=$(limit 90) && timeout "$t" $PY train.py --workdir "$WORK2" --data_dir "$DATA" --verbose 1 $SEED --epochs 1 2>&1 \
  | $PY -c 'import sys, time
t0 = time.time()
for line in sys.stdin:
    print(f"{time.time() - t0:8.2f} {line}", end="", flush=True)' > "$OUT/second_start.log"
$PY - "$OUT/second_start.log" "$OUT/seed_50_epochs.log" <<'EOF' >> "$R"
import json, sys
def at(path, text):
    lines = open(path).read().splitlines()
    return next((float(l.split()[0]) for l in lines if text in l), None)
first, second = sys.argv[2], sys.argv[1]
print(json.dumps({"what": "second_start", "device_kind": None, "dtype": "float32", "batch_size": 32,
                  "seconds_before_epoch_1": at(second, "Epoch 1/"),
                  "first_run_seconds_before_epoch_1": at(first, "Epoch 1/"),
                  "compiled_line": next((l for l in open(second) if "Compiled in" in l), "").strip()}))
EOF
tail -1 "$R"
fi

if want tests; then
part "GPU tests"
t=$(limit 150) && timeout "$t" $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
tail -12 "$OUT/gpu_tests.log"
if grep -q "FAILED.*sigkilled" "$OUT/gpu_tests.log"; then
  part "resume exactness again, with XLA's own command-buffer scheduling (LHS)"
  t=$(limit 60) && XLA_FLAGS="$BEST --xla_gpu_command_buffer_scheduling_mode=LHS" timeout "$t" $PY -m pytest -q -m gpu tests/test_gpu.py -k sigkilled \
    -p no:cacheprovider > "$OUT/gpu_tests_default_flags.log" 2>&1
  tail -3 "$OUT/gpu_tests_default_flags.log"
fi
fi

if want bn; then
part "BatchNorm's custom derivative against autodiff (batch 32, float32; the sweep's best is the other half)"
t=$(limit 45) && timeout "$t" $PY benchmarks/speed.py --batch_size 32 $SPEED --batchnorm_derivative autodiff \
  --out "$R" --tag batchnorm_autodiff | cut -c1-200
fi

if want speed; then
part "speed: seed model, float32 at batch 128/512, bfloat16 at 32"
t=$(limit 70) && timeout "$t" $PY benchmarks/speed.py --batch_size 128,512 --dtype float32 $SPEED --out "$R" --tag chosen
t=$(limit 45) && timeout "$t" $PY benchmarks/speed.py --batch_size 32 --dtype bfloat16 $SPEED --out "$R" --tag chosen
fi

if want profile; then
part "where a step's time goes (profile_step.py)"
t=$(limit 60) && timeout "$t" $PY benchmarks/profile_step.py --steps 10 > "$OUT/profile_step.json" 2>&1
tail -c 1500 "$OUT/profile_step.json"
fi

if want presets; then
part "speed: the presets at batch 32 (float32)"
for preset in resnet20v1 resnet56v2 resnet110v1; do
  t=$(limit 45) || break
  timeout "$t" $PY benchmarks/speed.py --preset $preset $SPEED --out "$R" --tag "preset_$preset"
done
fi

if want keras50 && [ -n "$REAL" ]; then
part "Keras 3 (JAX backend) on the same CIFAR-10: the seed rebuilt, KERAS_EPOCHS epochs (issue 22)"
# Needs keras, namex, optree and Keras-Preprocessing as wheels in .whl (carried; see the README of
# benchmarks): installed into /tmp/site. One JSON line per epoch in $OUT/keras_real.jsonl.
# KERAS_FLAGS adds keras_real.py flags, e.g. issue 22's width-8 run for another seed:
# KERAS_EPOCHS=10 KERAS_FLAGS="--num_filters 8 --lr_epochs 8 --lr_factors 0.1 --seed 1".
if [ "${DRY_RUN:-0}" != 1 ] && ls .whl/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
t=$(limit 560) && PYTHONPATH=/tmp/site:$PYTHONPATH timeout "$t" $PY benchmarks/keras_real.py --data_dir "$REAL" \
  --epochs "${KERAS_EPOCHS:-50}" --backend jax $KERAS ${KERAS_FLAGS:-} > "$OUT/keras_real.jsonl" 2> "$OUT/keras_real.err"
echo "exit status $? after $(grep -c . "$OUT/keras_real.jsonl") epochs"; tail -2 "$OUT/keras_real.jsonl" | cut -c1-200
tail -3 "$OUT/keras_real.err" | cut -c1-200
fi

if [ "${TORCH_PEER:-0}" = 1 ] && want torch; then
  part "PyTorch peer: eager, torch.compile, torch.compile reduce-overhead"
  t=$(limit 180) && timeout "$t" $TORCH_PY benchmarks/torch_peer.py $TORCH --out "$R"
fi

part "table"
$PY - "$R" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'what':<18} {'tag':<28} {'dtype':<9} {'batch':>5} {'img/s':>9} {'s/epoch':>8} {'TFLOP/s':>7} {'compile':>7} seconds")
for r in rows:
    if r["what"] == "machine":
        print("machine:", r["device_kind"], "jax", r["jax"], "python", r["python"])
        continue
    if r["what"] == "flags_chosen":
        print("flags chosen:", r["xla_flags"] or "(resnet_jax's defaults)")
        continue
    if r["what"] == "startup":
        print(f"startup: {r['cache']} cache, compile_early {r['compile_early']}: first step at "
              f"{r['to_first_epoch_s']} s (imports {r['imports_s']} s); {r['phases']}")
        continue
    print(f"{r['what']:<18} {r.get('tag', ''):<28} {str(r.get('dtype')):<9} {str(r.get('batch_size')):>5} "
          f"{r.get('train_images_per_s', ''):>9} {r.get('epoch_s', ''):>8} {r.get('tflops', ''):>7} "
          f"{r.get('compile_s', r.get('warmup_s', '')):>7} {r.get('seconds', r.get('error', ''))}")
EOF
part "done"
