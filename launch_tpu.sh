#!/usr/bin/env bash
# Train cambrian_jax on a Cloud TPU VM slice: create (or reuse) the slice, put this project on every
# worker, install it, and run the same training command on all workers at once.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch_tpu.sh --name NAME --zone ZONE [options] [-- EXTRA TRAINER FLAGS]

Creates the TPU VM slice NAME if it does not exist (reuses it otherwise), copies this checkout (or
clones --repo) to every worker, installs it with jax[tpu] in ~/cambrian_env, then runs
  python -m cambrian_jax.train --config CONFIG --workdir WORKDIR --stage STAGE --distributed=yes EXTRA…
on all workers together. jax.distributed.initialize() finds the other workers by itself; each
worker reads its own rows of every global batch. Re-running the same command resumes training from
the latest checkpoint in WORKDIR (a SIGTERM from a maintenance event saves one first).

Slice:
  --name NAME          TPU VM name (required)
  --zone ZONE          zone (required), e.g. us-central2-b (v4), us-east5-a (v5p)
  --type TYPE          accelerator type, needed to create the slice: v4-64 … v4-512, v5p-128 … v5p-1024
  --version VERSION    TPU software version (default: tpu-ubuntu2204-base for v4, v2-alpha-tpuv5 for v5p)
  --project PROJECT    Google Cloud project (default: gcloud's configured project)
  --spot               create a Spot slice (cheaper; may be preempted: re-run this command to resume)
  --reserved           create the slice from reserved capacity
Code:
  --repo URL           git clone URL for the workers (default: copy this checkout's tracked files)
  --branch REF         branch, tag or commit to check out with --repo (default: the default branch)
  --dir DIR            project directory on the workers (default: cambrian_jax, under the home directory)
Training:
  --config SPEC        the trainer's --config, e.g. 'configs/cambrian_8b.py:data1=/data/a,data2=/data/b'
  --workdir PATH       the trainer's --workdir; on a pod use a bucket every worker sees: gs://BUCKET/run
  --stage 1|2|all      the trainer's --stage (default: all)
  --env KEY=VALUE      environment variable for the trainer on every worker (repeatable)
  --detach             run under nohup (log: ~/cambrian_train.log on each worker) and return
Other:
  --setup-only         create, copy and install, but do not train
  --delete             delete the slice NAME and exit
  --dry-run            print the gcloud commands instead of running them
  -h, --help           this help

Everything after -- goes to the trainer unchanged, e.g. -- --config.log_every=50.

Examples (configs: README.md, "Training"; the data folders are `python -m cambrian_jax.data.prepare` output
copied to every worker, or on a disk or bucket mount they all see):
  # Cambrian-1 8B, both stages, on a v4-512 slice (256 chips, global batch 512 = 2 rows per chip)
  ./launch_tpu.sh --name cambrian-8b --zone us-central2-b --type v4-512 --workdir gs://BUCKET/cambrian-8b \
    --config 'configs/cambrian_8b.py:data1=/data/alignment,data2=/data/cambrian7m,tokenizer=/ckpt/llama3,llm=/ckpt/llama3,towers=/ckpt/towers'
  # Cambrian-1 34B on a v5p-512 slice (256 chips, global batch 1024)
  ./launch_tpu.sh --name cambrian-34b --zone us-east5-a --type v5p-512 --workdir gs://BUCKET/cambrian-34b \
    --config 'configs/cambrian_34b.py:data1=/data/alignment,data2=/data/cambrian7m,tokenizer=/ckpt/yi34b,llm=/ckpt/yi34b,towers=/ckpt/towers'
EOF
}

die() { echo "launch_tpu.sh: $*" >&2; exit 2; }

NAME="" ZONE="" TYPE="" VERSION="" PROJECT="" SPOT=0 RESERVED=0 REPO="" BRANCH="" DIR="cambrian_jax"
CONFIG="" WORKDIR="" STAGE="all" DETACH=0 SETUP_ONLY=0 DELETE=0 DRY_RUN=0
ENVS=() EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --name) NAME="${2:?--name needs a value}"; shift 2 ;;
    --zone) ZONE="${2:?--zone needs a value}"; shift 2 ;;
    --type) TYPE="${2:?--type needs a value}"; shift 2 ;;
    --version) VERSION="${2:?--version needs a value}"; shift 2 ;;
    --project) PROJECT="${2:?--project needs a value}"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --reserved) RESERVED=1; shift ;;
    --repo) REPO="${2:?--repo needs a value}"; shift 2 ;;
    --branch) BRANCH="${2:?--branch needs a value}"; shift 2 ;;
    --dir) DIR="${2:?--dir needs a value}"; shift 2 ;;
    --config) CONFIG="${2:?--config needs a value}"; shift 2 ;;
    --workdir) WORKDIR="${2:?--workdir needs a value}"; shift 2 ;;
    --stage) STAGE="${2:?--stage needs a value}"; shift 2 ;;
    --env) ENVS+=("${2:?--env needs KEY=VALUE}"); shift 2 ;;
    --detach) DETACH=1; shift ;;
    --setup-only) SETUP_ONLY=1; shift ;;
    --delete) DELETE=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

[[ -n "$NAME" ]] || die "--name is required (see --help)"
[[ -n "$ZONE" ]] || die "--zone is required (see --help)"
case "$STAGE" in 1|2|all) ;; *) die "--stage must be 1, 2 or all, not '$STAGE'" ;; esac
for kv in "${ENVS[@]+"${ENVS[@]}"}"; do [[ "$kv" == *=* ]] || die "--env expects KEY=VALUE, got '$kv'"; done

if [[ $DRY_RUN -eq 0 ]] && ! command -v gcloud >/dev/null 2>&1; then
  cat >&2 <<'EOF'
launch_tpu.sh: gcloud not found on PATH.
  Install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install), then run
  `gcloud auth login` and `gcloud config set project PROJECT`, and try again.
  (--dry-run prints the commands without needing gcloud.)
EOF
  exit 127
fi

q() { printf '%q' "$1"; }
run() {  # print (dry run) or execute a command
  if [[ $DRY_RUN -eq 1 ]]; then
    printf '%q ' "$@"; echo
  else
    "$@"
  fi
}

GC=(gcloud compute tpus tpu-vm)
COMMON=(--zone "$ZONE")
[[ -n "$PROJECT" ]] && COMMON+=(--project "$PROJECT")
on_all() { run "${GC[@]}" ssh "$NAME" "${COMMON[@]}" --worker=all --command "$1"; }

if [[ $DELETE -eq 1 ]]; then
  run "${GC[@]}" delete "$NAME" "${COMMON[@]}" --quiet
  exit 0
fi

# ---- 1. the slice
if [[ $DRY_RUN -eq 0 ]] && "${GC[@]}" describe "$NAME" "${COMMON[@]}" >/dev/null 2>&1; then
  echo "launch_tpu.sh: reusing TPU VM $NAME in $ZONE"
else
  [[ -n "$TYPE" ]] || die "TPU VM $NAME does not exist; give --type (e.g. v4-512 or v5p-512) to create it"
  if [[ -z "$VERSION" ]]; then
    case "$TYPE" in
      v5p-*) VERSION="v2-alpha-tpuv5" ;;
      v5litepod-*|v5e-*) VERSION="v2-alpha-tpuv5-lite" ;;
      v6e-*) VERSION="v2-alpha-tpuv6e" ;;
      *) VERSION="tpu-ubuntu2204-base" ;;
    esac
  fi
  CREATE=(--accelerator-type "$TYPE" --version "$VERSION")
  [[ $SPOT -eq 1 ]] && CREATE+=(--spot)
  [[ $RESERVED -eq 1 ]] && CREATE+=(--reserved)
  echo "launch_tpu.sh: creating TPU VM $NAME ($TYPE, $VERSION) in $ZONE"
  run "${GC[@]}" create "$NAME" "${COMMON[@]}" "${CREATE[@]}"
fi

# ---- 2. the code, on every worker
if [[ -n "$REPO" ]]; then
  checkout="cd $(q "$DIR") && git fetch --all --tags"
  [[ -n "$BRANCH" ]] && checkout+=" && git checkout $(q "$BRANCH") && (git pull --ff-only 2>/dev/null || true)"
  on_all "if [ -d $(q "$DIR")/.git ]; then $checkout; else git clone $(q "$REPO") $(q "$DIR") && $checkout; fi"
else
  here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
  tmpdir="/tmp/cambrian_jax_launch" tarball="/tmp/cambrian_jax_launch/cambrian_jax.tar.gz"
  if [[ $DRY_RUN -eq 0 ]]; then
    tmpdir="$(mktemp -d)" tarball="$tmpdir/cambrian_jax.tar.gz"
    trap 'rm -rf "$tmpdir"' EXIT
    (cd "$here" && { git ls-files -z --cached --others --exclude-standard 2>/dev/null || find . -type f -not -path './.*' -print0; } \
      | tar --null -czf "$tarball" -T -)
  fi
  run "${GC[@]}" scp "$tarball" "$NAME:cambrian_jax.tar.gz" "${COMMON[@]}" --worker=all
  on_all "mkdir -p $(q "$DIR") && tar -xzf cambrian_jax.tar.gz -C $(q "$DIR") && rm cambrian_jax.tar.gz"
fi

# ---- 3. install (idempotent: pip skips what is there)
on_all "set -e; python3 -m venv ~/cambrian_env; ~/cambrian_env/bin/pip install -q -U pip; \
~/cambrian_env/bin/pip install -q -e $(q "$DIR")'[tpu]' gcsfs"

[[ $SETUP_ONLY -eq 1 ]] && { echo "launch_tpu.sh: $NAME is set up (--setup-only)"; exit 0; }

# ---- 4. train on all workers
[[ -n "$CONFIG" ]] || die "--config is required to train (or give --setup-only)"
[[ -n "$WORKDIR" ]] || die "--workdir is required to train (a gs:// bucket path on a multi-worker slice)"
# The trainer adds the LIBTPU_INIT_ARGS flags itself (cambrian_jax/topology.py LIBTPU_FLAGS, the ones
# the planner compiles with); --env LIBTPU_INIT_ARGS=... adds to them or overrides one.
envs="TF_CPP_MIN_LOG_LEVEL=2"
for kv in "${ENVS[@]+"${ENVS[@]}"}"; do envs+=" ${kv%%=*}=$(q "${kv#*=}")"; done
cmd="cd $(q "$DIR") && env $envs ~/cambrian_env/bin/python -m cambrian_jax.train --config $(q "$CONFIG") \
--workdir $(q "$WORKDIR") --stage $(q "$STAGE") --distributed=yes"
for a in "${EXTRA[@]+"${EXTRA[@]}"}"; do cmd+=" $(q "$a")"; done
if [[ $DETACH -eq 1 ]]; then
  on_all "nohup bash -c $(q "$cmd") > ~/cambrian_train.log 2>&1 &"
  echo "launch_tpu.sh: training started; follow it with"
  echo "  ${GC[*]} ssh $NAME --zone $ZONE --worker=0 --command 'tail -f ~/cambrian_train.log'"
else
  on_all "$cmd"
fi
