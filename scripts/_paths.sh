# Sourced by the launch scripts, not run on its own.  Path variables (MODEL_BASE, DATA_PATH, OUTPUT_DIR, ...)
# are taken relative to the CALLER's working directory, like any command-line tool's paths: each script
# turns them into absolute paths before it changes folder, and checks its inputs before it creates anything.
#
#   abs_path P              absolute form of P, relative to the current folder, with "." and ".." removed and
#                           links kept (a venv's bin/python must stay a link); P need not exist
#   resolve_paths VAR...    replace each set VAR by its absolute path
#   resolve_command VAR     the same for a command given as a path (PYTHON=.venv/bin/python); a bare name
#                           (python) is left for PATH to find
#   need VAR HINT           exit 2 with "error: set VAR (HINT)" unless VAR is set
#   need_dir / need_file VAR HINT     ... unless VAR names an existing folder / file
#   need_model VAR HINT     ... unless VAR is a folder holding config.json (a Hugging Face checkpoint)
#   need_output_dir VAR     ... if VAR names something that exists but is not a folder
#   project_python REPO     set and export PYTHON, the interpreter EVERY step of a script runs (and the scripts it
#                           calls inherit): PYTHON if set (a path is made absolute), else REPO/.venv/bin/python
#                           (what `make install` creates) when it exists, else `python` on PATH; REPO goes first
#                           on PYTHONPATH, so this checkout's llava_sculpt runs; exit 2 with one
#                           line saying what to run when that interpreter cannot import llava_sculpt or one of
#                           its dependencies
#   wrapper_fixes M T       in finetune_M_T.sh: exit 2 when METHOD or TARGET is set in the environment to another
#                           value (the wrapper would silently train M on T), pointing to finetune.sh
#   stage LOG TEXT CMD...   one line for one stage of a long job, "[  42s] TEXT ... done (7s)" (time since the
#                           script started, then the stage's own), CMD's output appended to LOG; if CMD fails:
#                           the end of LOG on stderr and exit with CMD's status

abs_path() {
    local path=$1
    case $path in
        /*) ;;
        *) path=$PWD/$path ;;
    esac
    realpath -m -s -- "$path" 2>/dev/null || printf '%s\n' "$path"
}

resolve_paths() {
    local name
    for name in "$@"; do
        if [ -n "${!name:-}" ]; then
            printf -v "$name" '%s' "$(abs_path "${!name}")"
        fi
    done
}

resolve_command() {
    case ${!1:-} in
        */*) printf -v "$1" '%s' "$(abs_path "${!1}")" ;;
    esac
}

project_python() {
    local repo=$1 missing
    resolve_command PYTHON
    if [ -z "${PYTHON:-}" ]; then
        if [ -x "$repo/.venv/bin/python" ]; then PYTHON=$repo/.venv/bin/python; else PYTHON=python; fi
    fi
    export PYTHON
    # the scripts run THIS checkout's llava_sculpt, whichever interpreter runs it
    export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
    # find_spec, not import: a second, not the ten that importing torch + transformers takes on a small CPU
    missing=$("$PYTHON" -c 'import importlib.util as u
print(" ".join(m for m in ("llava_sculpt", "torch", "transformers", "peft", "accelerate", "safetensors", "PIL",
                           "tqdm", "matplotlib") if u.find_spec(m) is None))' 2>/dev/null) \
        || missing="(it does not run)"
    [ -z "$missing" ] || script_error "the interpreter $PYTHON lacks $missing: run \`make install\` in $repo" \
        "(it creates $repo/.venv, which every script then uses), or set PYTHON=<a python with llava-sculpt installed>"
}

wrapper_fixes() {
    local method=$1 target=$2 name fixed
    for name in METHOD TARGET; do
        fixed=$method; [ "$name" = METHOD ] || fixed=$target
        if [ -n "${!name:-}" ] && [ "${!name}" != "$fixed" ]; then
            script_error "$name=${!name} is set, but $(basename "$0") always trains METHOD=$method on" \
                "TARGET=$target; for another method or target run \`METHOD=${METHOD:-$method}" \
                "TARGET=${TARGET:-$target} bash $(dirname "$0")/finetune.sh\` (or unset $name)"
        fi
    done
}

script_error() {
    echo "error: $*" >&2
    exit 2
}

need() {
    [ -n "${!1:-}" ] || script_error "set $1 ($2)"
}

need_dir() {
    need "$1" "$2"
    [ -e "${!1}" ] || script_error "$1=${!1} does not exist (expected $2)"
    [ -d "${!1}" ] || script_error "$1=${!1} is not a folder (expected $2)"
}

need_file() {
    need "$1" "$2"
    [ -e "${!1}" ] || script_error "$1=${!1} does not exist (expected $2)"
    [ -f "${!1}" ] || script_error "$1=${!1} is not a file (expected $2)"
}

need_model() {
    need_dir "$1" "$2"
    [ -f "${!1}/config.json" ] || script_error "$1=${!1} has no config.json, so it is not a Hugging Face checkpoint folder (expected $2)"
}

need_output_dir() {
    if [ -e "${!1}" ] && [ ! -d "${!1}" ]; then
        script_error "$1=${!1} exists and is not a folder (the outputs go into it)"
    fi
}

stage() {
    local log=$1 text=$2 start=$SECONDS status errexit=${-//[^e]/}
    shift 2
    mkdir -p "$(dirname "$log")"
    echo "=== $(date '+%F %T') $text" >> "$log"
    printf '[%4ds] %s ... ' "$SECONDS" "$text"
    # not `CMD || status=$?`: bash ignores `set -e` inside a function run on the left of ||
    set +e
    ( set -e; "$@" ) >> "$log" 2>&1
    status=$?
    [ -z "$errexit" ] || set -e
    if [ "$status" -ne 0 ]; then
        echo "failed (exit $status)"
        { echo "the end of $log:"; tail -n 30 "$log" | sed 's/^/    /'; } >&2
        exit "$status"
    fi
    echo "done ($((SECONDS - start))s)"
}
