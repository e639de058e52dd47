#!/usr/bin/env bash
# One entry point for people and CI: sets up the pinned environment (once), then trains, tests, ...
# Run `./launch.sh help` for the subcommands.
set -euo pipefail

# Work from the repo root whatever the caller's cwd: the paths inside configs and overrides (data, output_dir)
# and the component path are relative to it. The files named on the command line (CONFIG, --checkpoint,
# --out) are the caller's and are made absolute first (from_caller).
CALLER_CWD=$PWD
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")"
ROOT=$PWD

VENV=${SEQREC_VENV:-$ROOT/.venv}
VENV_PY=$VENV/bin/python
STAMP=$VENV/.seqrec-deps-stamp
SAMPLE_DATA=.cache/sample_data
DEFAULT_CONFIG=configs/default.toml
# Bump when the install procedure below changes, so existing environments are rebuilt.
INSTALL_SCHEMA=1
# Set once ensure_env has run trainer.deps, so `setup` does not run it twice.
ENV_CHECKED=0
# venv: launch.sh creates and maintains $VENV. current: the Python environment already there (a GPU host's,
# a container image's) is used as it is, only checked. `--use-current-env` before the subcommand sets it.
SEQREC_ENV=${SEQREC_ENV:-venv}
# The torchx command of the environment in use (ensure_env sets it; torchx_local runs it).
TORCHX=("$VENV/bin/torchx")

usage() {
    cat <<'EOF'
Usage: ./launch.sh [SUBCOMMAND | CONFIG.toml] [ARGS...]

  ./launch.sh [CONFIG.toml] [--section.key=value ...]
        Train (the default). CONFIG defaults to configs/default.toml; overrides pass through to
        trainer.main. Checks the config and the data and output paths first (exit 2 listing every
        fault), makes the built-in sample data if the config reads it, then runs the trainer under
        torchrun through torchx (local_cwd scheduler): one rank per GPU, or 2 ranks on CPU.
  ./launch.sh train [CONFIG.toml] [overrides...]
        Same as above.
  ./launch.sh test [PYTEST ARGS...]
        Run the test suite (python -m pytest). This is the project's test command.
  ./launch.sh plan CONFIG.toml --world-size N --hbm-gb G [--local-world-size M] [--ddr-gb D]
                   [--batch-size B] [--json] [overrides...]
        Dry run of the embedding sharding plan for N GPUs (no GPU needed); exits 1 if it does not fit.
  ./launch.sh eval [CONFIG.toml] --checkpoint outputs/RUN[/step_N] [--out FILE] [--eval.key=value ...]
        Leave-one-out evaluation of a checkpoint, or of a run folder's best one (test split; --eval.split=valid
        for validation, --eval.protocol=sampled for the SASRec paper's 100-negative protocol), with the
        config it was trained with unless CONFIG is given. Prints the metrics (one JSON line naming the
        split and protocol) and writes them to CHECKPOINT/eval_<split>_<protocol>.json.
  ./launch.sh export --checkpoint outputs/RUN/step_N --out DIR [--format parquet|npy]
        Write a checkpoint's embedding tables and dense model for serving, without the distributed runtime.
  ./launch.sh setup
        Only create/update the environment and check the dependency set.
  ./launch.sh help | -h | --help
        This text.
  ./launch.sh --use-current-env SUBCOMMAND ...
        Any of the above in the current Python environment (same as SEQREC_ENV=current).

Files named on the command line (CONFIG, --checkpoint, --out) are taken from your current folder;
paths inside configs and overrides are relative to the repository root, where the job runs.

The environment (.venv, or $SEQREC_VENV) is created on first use from the pins in setup.cfg and
reused while those pins, the flavour and the Python version are unchanged. With SEQREC_ENV=current
(hosts and containers that come with torch, and often no package registry) nothing is created or
installed: $SEQREC_PYTHON, else python3 on PATH (an activated venv or conda env), is checked by
`python -m trainer.deps` against the matched torch/fbgemm/torchrec sets and used as it is; a
missing or mismatched package stops the launch with exit code 3 and a list of what to install.

Environment variables:
  SEQREC_ENV             venv (default): create and use $SEQREC_VENV; current: use the current environment
  SEQREC_VENV            where the virtual environment lives (default: ./.venv)
  SEQREC_PYTHON          interpreter used to create it, or with SEQREC_ENV=current the one used
                         (a name on PATH or an absolute path; default: python3, must be >= 3.11)
  SEQREC_FLAVOUR         cpu | cuda (default: cuda when `nvidia-smi -L` lists a GPU, else cpu)
  SEQREC_NPROC           ranks per node (default: number of GPUs on cuda, 2 on cpu)
  SEQREC_TORCH_INDEX_URL extra pip index for torch (e.g. https://download.pytorch.org/whl/cpu)
EOF
}

# A path typed by the caller, relative to the folder they ran launch.sh in, as an absolute path; paths that
# exist only relative to the repo root (`configs/x.toml` from a subfolder) are kept as they are.
from_caller() {
    local path=$1
    if [[ -z $path || $path == /* || $CALLER_CWD == "$ROOT" || ! -e $CALLER_CWD/$path && -e $path ]]; then
        printf '%s\n' "$path"
    else
        printf '%s\n' "$CALLER_CWD/$path"
    fi
}

log() { printf 'launch.sh: %s\n' "$*" >&2; }
die() { printf 'launch.sh: error: %s\n' "$*" >&2; exit 1; }
# Exit code 3 is trainer.main's (and trainer.deps') for missing or broken dependencies.
die_deps() { printf 'launch.sh: error: %s\n' "$*" >&2; exit 3; }

# Reads setup.cfg with configparser, so launch.sh never repeats a version pin.
#   key FLAVOUR          -> hash of the dependency sections + flavour + Python version + install schema
#   reqs GROUP [GROUP..] -> requirements, one per line; groups: torch base cpu cuda test nodeps
DEPS_HELPER='
import configparser, hashlib, json, re, sys

cfg = configparser.ConfigParser(interpolation=None)
if not cfg.read("setup.cfg"):
    sys.exit("setup.cfg not found")

def lines(section, key):
    raw = cfg.get(section, key, fallback="")
    return [l.strip() for l in raw.splitlines() if l.strip() and not l.strip().startswith("#")]

def name(requirement):
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower()

base = lines("options", "install_requires")
groups = {
    "torch": [r for r in base if name(r) == "torch"],
    "base": base,
    "cpu": lines("options.extras_require", "cpu"),
    "cuda": lines("options.extras_require", "cuda"),
    "test": lines("options.extras_require", "test"),
    "nodeps": lines("seqrec", "no_deps_requires"),
}
command, args = sys.argv[1], sys.argv[2:]
if command == "key":
    payload = {"groups": groups, "flavour": args[0], "python": sys.version, "schema": args[1]}
    print(hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest())
elif command == "reqs":
    for group in args:
        if not groups[group]:
            sys.exit(f"setup.cfg defines no requirements for {group!r}")
        print("\n".join(groups[group]))
else:
    sys.exit(f"unknown command {command}")
'

gpu_count() {
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        echo 0
        return
    fi
    # grep -c prints 0 (and fails) when nothing matches; a broken driver must not hang the launch.
    timeout 20 nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
}

detect_flavour() {
    if [[ -n ${SEQREC_FLAVOUR:-} ]]; then
        [[ $SEQREC_FLAVOUR == cpu || $SEQREC_FLAVOUR == cuda ]] \
            || die "SEQREC_FLAVOUR must be cpu or cuda, got '$SEQREC_FLAVOUR'"
        echo "$SEQREC_FLAVOUR"
    elif (($(gpu_count) > 0)); then
        echo cuda
    else
        echo cpu
    fi
}

env_key() { "$VENV_PY" -c "$DEPS_HELPER" key "$1" "$INSTALL_SCHEMA"; }

# Prints the requirements of the given setup.cfg groups, one per line.
requirements() { "$VENV_PY" -c "$DEPS_HELPER" reqs "$@"; }

pip_quiet() {
    # -qq: errors only. Warnings (e.g. about unreachable extra indexes in a machine's pip config) are noise in CI logs.
    PIP_PROGRESS_BAR=off "$VENV_PY" -m pip --disable-pip-version-check --no-input -qq "$@"
}

pip_install_groups() {
    local out
    local -a reqs
    out=$(requirements "$@")
    mapfile -t reqs <<<"$out"
    pip_quiet install "${reqs[@]}"
}

create_venv() {
    local python=${SEQREC_PYTHON:-python3}
    command -v "$python" >/dev/null 2>&1 || die "$python not found; install Python 3.11 or set SEQREC_PYTHON"
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "$python is $("$python" --version 2>&1); Python >= 3.11 is required (set SEQREC_PYTHON)"
    log "creating $VENV with $("$python" --version 2>&1)"
    # --clear: a leftover venv whose interpreter is gone is rebuilt rather than patched.
    "$python" -m venv --clear "$VENV"
}

# Removes the fbgemm build of the other flavour: both builds write the same fbgemm_gpu/ folder.
remove_other_fbgemm() {
    local flavour=$1 other=fbgemm-gpu wanted=fbgemm-gpu-cpu
    if [[ $flavour == cuda ]]; then other=fbgemm-gpu-cpu wanted=fbgemm-gpu; fi
    if "$VENV_PY" -m pip show -q "$other" >/dev/null 2>&1; then
        log "removing $other (flavour is now $flavour)"
        # The wanted build goes too: uninstalling the other one deleted files the two share.
        pip_quiet uninstall -y "$other" "$wanted"
    fi
}

install_env() {
    local flavour=$1 with_test=$2 key
    log "setting up $VENV (flavour $flavour); this takes a minute or two the first time"
    "$VENV_PY" -c 'import sys' >/dev/null 2>&1 || create_venv
    key=$(env_key "$flavour")
    # A half-finished install must not look complete to the next run.
    rm -f "$STAMP"
    remove_other_fbgemm "$flavour"

    # torch first and alone, pinned: later requirements then find it satisfied and cannot pull another build.
    local -a torch_index=()
    if [[ -n ${SEQREC_TORCH_INDEX_URL:-} ]]; then torch_index=(--extra-index-url "$SEQREC_TORCH_INDEX_URL"); fi
    local out
    out=$(requirements torch)
    pip_quiet install "${torch_index[@]}" "$out"

    local -a groups=(base "$flavour")
    if ((with_test)); then groups+=(test); fi
    pip_install_groups "${groups[@]}"
    # torchrec's metadata requires the CUDA fbgemm-gpu; with deps it would overwrite fbgemm-gpu-cpu.
    out=$(requirements nodeps)
    local -a nodeps
    mapfile -t nodeps <<<"$out"
    pip_quiet install --no-deps "${nodeps[@]}"

    "$VENV_PY" -m trainer.deps --flavour "$flavour" >&2 || die "the installed dependencies do not work (see above)"
    ENV_CHECKED=1
    if ((with_test)); then echo "$key test" >"$STAMP"; else echo "$key" >"$STAMP"; fi
}

# True when the stamp says $VENV already holds the pinned set (a test install also serves training).
env_is_current() {
    local flavour=$1 with_test=$2 key stamp
    [[ -x $VENV_PY && -f $STAMP ]] || return 1
    key=$(env_key "$flavour" 2>/dev/null) || return 1
    stamp=$(<"$STAMP")
    [[ $stamp == "$key test" || ($with_test == 0 && $stamp == "$key") ]]
}

# Writes an executable `python` that runs $VENV_PY and puts its folder first on PATH. The torchx component's
# ranks run `python` from PATH, which need not be this interpreter (SEQREC_PYTHON=/opt/env/bin/python3 on a
# PATH with another python, or none). A script, not a symlink: a symlink to a venv's interpreter outside
# the venv's bin/ no longer finds the venv's pyvenv.cfg and runs the bare base interpreter.
install_python_shim() {
    local dir
    # One folder per interpreter: two launches from one checkout with different environments do not clash.
    dir=$ROOT/.cache/current-env/$(printf '%s' "$VENV_PY" | sha256sum | cut -c1-16)
    mkdir -p "$dir"
    printf '#!/usr/bin/env bash\n# Written by launch.sh (SEQREC_ENV=current).\nexec %q "$@"\n' "$VENV_PY" \
        >"$dir/python.tmp"
    chmod +x "$dir/python.tmp"
    mv -f "$dir/python.tmp" "$dir/python"
    export PATH=$dir:$PATH
}

# SEQREC_ENV=current: checks the interpreter's environment, and uses it, without installing anything.
use_current_env() {
    local flavour=$1 with_test=$2 python=${SEQREC_PYTHON:-python3} resolved
    resolved=$(command -v "$python") \
        || die_deps "SEQREC_ENV=current: $python not found; put the environment's python3 on PATH or set SEQREC_PYTHON"
    "$resolved" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die_deps "SEQREC_ENV=current: $resolved is $("$resolved" --version 2>&1); seqrec needs Python >= 3.11"
    # The interpreter's own absolute path: a relative SEQREC_PYTHON or a pyenv-style shim script would
    # otherwise be what the ranks run.
    VENV_PY=$("$resolved" -c 'import sys; print(sys.executable)')
    [[ -n $VENV_PY ]] || die_deps "SEQREC_ENV=current: $resolved does not report its own path (sys.executable)"
    log "using the current environment of $VENV_PY ($("$VENV_PY" --version 2>&1), flavour $flavour); installing nothing"
    local -a check=(--flavour "$flavour")
    if ((with_test)); then check+=(--test); fi
    # trainer.deps ends its report with the line naming every missing or mismatched package.
    "$VENV_PY" -m trainer.deps "${check[@]}" >&2 || exit 3
    ENV_CHECKED=1
    install_python_shim
    # The environment's own torchx, whichever folder pip put its script in (or none: `pip install --target`).
    TORCHX=("$VENV_PY" -m torchx.cli.main)
}

# Makes sure $VENV holds the pinned set for this flavour (with_test=1 adds the test extra), or with
# SEQREC_ENV=current that the current environment holds a matched set.
ensure_env() {
    local with_test=$1 flavour lock_fd
    flavour=$(detect_flavour)
    # The trainer's dependency check reads it: the flavour the environment was built for.
    export SEQREC_FLAVOUR=$flavour
    case $SEQREC_ENV in
        current) use_current_env "$flavour" "$with_test"; return ;;
        venv) ;;
        *) die "SEQREC_ENV must be venv or current, got '$SEQREC_ENV'" ;;
    esac
    if ! env_is_current "$flavour" "$with_test"; then
        mkdir -p "$(dirname "$VENV")" .cache
        # Two launches at once (CI and a person) must not install into one venv concurrently; the second
        # waits, then finds the stamp current.
        exec {lock_fd}>.cache/venv.lock
        if command -v flock >/dev/null 2>&1; then flock "$lock_fd"; fi
        if ! env_is_current "$flavour" "$with_test"; then
            # An environment that had the test extra keeps it, so `test` after a re-install stays instant.
            if [[ -f $STAMP && $(<"$STAMP") == *" test" ]]; then with_test=1; fi
            install_env "$flavour" "$with_test"
        fi
        exec {lock_fd}>&-
    fi
    export VIRTUAL_ENV=$VENV
    export PATH=$VENV/bin:$PATH
}

run_train() {
    local config=$DEFAULT_CONFIG
    if [[ $# -gt 0 && $1 == *.toml ]]; then
        config=$(from_caller "$1")
        shift
    fi
    [[ -f $config ]] || die "config not found: $config"
    ensure_env 0
    # Check the config, the overrides and what the job reads and writes here, in a second and without torch:
    # a typo or a missing data folder then fails before torchx and torchrun start, naming the key and path.
    # The built-in sample data is made first, and only if the config reads it.
    "$VENV_PY" -m trainer.main --config "$config" --check-config --sample-data "$SAMPLE_DATA" "$@" >/dev/null \
        || exit 2

    local -a overrides=()
    # torchx hands everything after `--` to the component's *script_args (the trainer's overrides).
    if (($# > 0)); then overrides=(-- "$@"); fi
    torchx_local train --config "$config" "${overrides[@]}"
}

# Runs a component of trainer/component.py on this machine (torchx local_cwd): one rank per GPU, or
# $SEQREC_NPROC (default 2) on CPU.
torchx_local() {
    local component=$1
    shift
    local gpus=0 ranks cpus
    if [[ $SEQREC_FLAVOUR == cuda ]]; then gpus=$(gpu_count); fi
    if ((gpus > 0)); then ranks=${SEQREC_NPROC:-$gpus}; else ranks=${SEQREC_NPROC:-2}; fi
    cpus=$(nproc)
    # Component options must come before `--`; the caller's arguments end with it and the overrides.
    local -a opts=() rest=()
    while (($# > 0)) && [[ $1 != -- ]]; do opts+=("$1"); shift; done
    rest=("$@")
    # For local schedulers `torchx run` waits, streams every rank's output to stderr and exits 1 when the
    # job fails. log_dir keeps the per-rank logs.
    local log_dir=$ROOT/outputs/torchx_logs
    local -a status
    # Only torchx's stderr goes through runtime.joblog (stdout, e.g. evaluate's metrics JSON, stays as it is):
    # it passes the ranks' lines on live and ends a failed job with the failing rank's message and log path
    # instead of torchrun's ChildFailedError traceback and torchx's AppStatus. No `exec` any more, so the
    # exit status is torchx's, from PIPESTATUS; set -e must not end the script before it is read. Ctrl-C
    # reaches torchx directly (same process group) and it stops the ranks; the filter ignores SIGINT and shows
    # that to the end. bash waits for both, and as the filter did not die of SIGINT it carries on to exit
    # with torchx's status (130 if torchx itself died of the signal).
    set +e
    {
        "${TORCHX[@]}" run -s local_cwd -cfg "log_dir=$log_dir" \
            "trainer/component.py:$component" "${opts[@]}" \
            --nproc_per_node "$ranks" --cpu "$cpus" --gpu "$gpus" "${rest[@]}" 2>&1 1>&3 3>&- \
            | "$VENV_PY" -m runtime.joblog --log-dir "$log_dir" 3>&-
        status=("${PIPESTATUS[@]}")
    } 3>&1
    set -e
    exit "${status[0]}"
}

run_eval() {
    caller_args "$@"
    set -- "${ARGS[@]}"
    # No CONFIG: the checkpoint's own config.toml, the one it was trained with.
    local checkpoint=""
    local -a config=() overrides=()
    if [[ $# -gt 0 && $1 == *.toml ]]; then
        [[ -f $1 ]] || die "config not found: $1"
        config=(--config "$1")
        shift
    fi
    while (($# > 0)); do
        case $1 in
            --checkpoint) checkpoint=${2:-}; shift $(($# > 1 ? 2 : 1)) ;;
            --checkpoint=*) checkpoint=${1#*=}; shift ;;
            *) overrides+=("$1"); shift ;;
        esac
    done
    [[ -n $checkpoint ]] || die "eval needs --checkpoint PATH (a checkpoint folder, e.g. outputs/RUN/step_N, or a run's folder)"
    [[ -d $checkpoint ]] || die "checkpoint not found: $checkpoint"
    ensure_env 0
    # The config, the checkpoint and the data, checked before any rank starts (exit 2 names what is wrong).
    "$VENV_PY" -m trainer.evaluate "${config[@]}" --checkpoint "$checkpoint" --check-config "${overrides[@]}" || exit 2
    local -a rest=()
    if ((${#overrides[@]} > 0)); then rest=(-- "${overrides[@]}"); fi
    torchx_local evaluate "${config[@]}" --checkpoint "$checkpoint" "${rest[@]}"
}

# Sets ARGS to "$@" with the caller's file arguments (a leading CONFIG.toml, --checkpoint, --out) made absolute.
caller_args() {
    ARGS=()
    if [[ $# -gt 0 && $1 == *.toml ]]; then ARGS+=("$(from_caller "$1")"); shift; fi
    while (($# > 0)); do
        case $1 in
            --checkpoint | --out) ARGS+=("$1" "$(from_caller "${2:-}")"); shift $(($# > 1 ? 2 : 1)) ;;
            --checkpoint=* | --out=*) ARGS+=("${1%%=*}=$(from_caller "${1#*=}")"); shift ;;
            *) ARGS+=("$1"); shift ;;
        esac
    done
}

run_plan() {
    # Dry run of the embedding sharding for a GPU cluster; needs no GPU (see trainer/plan.py).
    ensure_env 0
    caller_args "$@"
    exec "$VENV_PY" -m trainer.plan "${ARGS[@]}"
}

run_export() {
    # Checkpoint -> embedding tables (Parquet/.npy) + dense state dict, for serving (see trainer/export.py).
    ensure_env 0
    caller_args "$@"
    exec "$VENV_PY" -m trainer.export "${ARGS[@]}"
}

run_tests() {
    ensure_env 1
    exec "$VENV_PY" -m pytest "$@"
}

main() {
    # A flag before the subcommand, not after: everything after it belongs to the subcommand.
    if [[ ${1:-} == --use-current-env ]]; then
        SEQREC_ENV=current
        shift
    fi
    local command=${1:-train}
    case $command in
        help | -h | --help)
            usage
            ;;
        setup)
            ensure_env 0
            # A fresh install (or SEQREC_ENV=current) has just run the check; otherwise show it now.
            if ((!ENV_CHECKED)); then "$VENV_PY" -m trainer.deps; fi
            ;;
        test)
            shift
            run_tests "$@"
            ;;
        train)
            # Bare `./launch.sh` lands here with no argument to drop.
            if (($# > 0)); then shift; fi
            run_train "$@"
            ;;
        plan)
            shift
            run_plan "$@"
            ;;
        export)
            shift
            run_export "$@"
            ;;
        eval)
            shift
            run_eval "$@"
            ;;
        *.toml | --*)
            run_train "$@"
            ;;
        *)
            usage >&2
            die "unknown subcommand '$command'"
            ;;
    esac
}

main "$@"
