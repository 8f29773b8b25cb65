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
