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
#   check_launch            check the launch variables of finetune.sh (below) and exit 2 with one line on a bad
#                           one, before anything starts; HOSTFILE is made absolute
#   launch CMD...           exec CMD, or with DRY_RUN=1 print it (shell_line, after PYTHONPATH=..., which the
#                           scripts export) and exit 0
#   shell_line ARG...       ARGs as one line a shell reads back as the same words (each quoted only when needed)
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

# Launch variables (finetune.sh; reproduce_table1.sh checks them first and passes them through):
#   one node (neither HOSTFILE nor NNODES)   DeepSpeed's launcher with --num_gpus NUM_GPUS, as always
#   HOSTFILE [NUM_NODES] [MASTER_ADDR] [MASTER_PORT]     DeepSpeed's launcher started on ONE node, which starts
#       the others (pdsh/ssh): --hostfile, --num_nodes (the first NUM_NODES hosts), --master_addr (default: the
#       first host's `hostname -I`), --master_port; hostfile lines `hostname slots=N`, blank lines and # comments
#       allowed, each host once (DeepSpeed's own rules, checked here so a bad line stops before the launch)
#   NNODES [NODE_RANK] [MASTER_ADDR] [MASTER_PORT]       torchrun started on EVERY node (srun): --nnodes,
#       --node_rank (required when NNODES > 1, in [0, NNODES)), --master_addr (required when NNODES > 1)
#   DRY_RUN      1 = print the launch command instead of running it (0 or unset: run it)
check_launch() {
    local line number=0 hosts=0 max_port=65535
    local -A seen=()
    case ${DRY_RUN:-0} in
        0|1) ;;
        *) script_error "DRY_RUN=$DRY_RUN: expected 1 (print the launch command instead of running it) or 0" ;;
    esac
    if [ -n "${HOSTFILE:-}" ] && [ -n "${NNODES:-}" ]; then
        script_error "HOSTFILE and NNODES are both set: set HOSTFILE to start every node from this one with" \
            "DeepSpeed's launcher, or NNODES (with NODE_RANK, MASTER_ADDR) to run torchrun on each node, not both"
    fi
    if [ -n "${HOSTFILE:-}" ]; then
        resolve_paths HOSTFILE
        need_file HOSTFILE "DeepSpeed's hostfile: one \`hostname slots=N\` line per node"
        while IFS= read -r line || [ -n "$line" ]; do
            number=$((number + 1))
            line=${line#"${line%%[![:space:]]*}"}
            line=${line%"${line##*[![:space:]]}"}
            [[ -z $line || $line == '#'* ]] && continue
            [[ $line =~ ^([^[:space:]]+)[[:space:]]+slots=([0-9]+) ]] || script_error "HOSTFILE=$HOSTFILE line" \
                "$number ($line) has no slots=N: expected \`hostname slots=N\` (N GPUs on that host), a blank" \
                "line or a # comment"
            [ $((10#${BASH_REMATCH[2]})) -gt 0 ] || script_error "HOSTFILE=$HOSTFILE line $number ($line) gives" \
                "the host no GPU: expected slots=N with N >= 1"
            [ -z "${seen[${BASH_REMATCH[1]}]:-}" ] || script_error "HOSTFILE=$HOSTFILE line $number names" \
                "${BASH_REMATCH[1]} again (first on line ${seen[${BASH_REMATCH[1]}]}): one line per host"
            seen[${BASH_REMATCH[1]}]=$number
            hosts=$((hosts + 1))
        done < "$HOSTFILE"
        [ "$hosts" -gt 0 ] || script_error "HOSTFILE=$HOSTFILE names no host: expected \`hostname slots=N\` lines"
    fi
    if [ -n "${NUM_NODES:-}" ]; then
        [ -n "${HOSTFILE:-}" ] || script_error "NUM_NODES=$NUM_NODES is set without HOSTFILE: NUM_NODES takes the" \
            "first hosts of DeepSpeed's hostfile (for torchrun on each node set NNODES instead)"
        [[ $NUM_NODES =~ ^[1-9][0-9]*$ ]] || script_error "NUM_NODES=$NUM_NODES is not a positive number of nodes"
        [ "$NUM_NODES" -le "$hosts" ] || script_error "NUM_NODES=$NUM_NODES, but HOSTFILE=$HOSTFILE lists" \
            "$hosts host(s)"
    fi
    if [ -n "${NNODES:-}" ]; then
        [[ $NNODES =~ ^[1-9][0-9]*$ ]] || script_error "NNODES=$NNODES is not a positive number of nodes (torchrun's --nnodes)"
        if [ "$NNODES" -gt 1 ]; then
            need MASTER_ADDR "NNODES=$NNODES: the address of the node with NODE_RANK=0, which every node can reach;\
 under SLURM MASTER_ADDR=\$(scontrol show hostnames \"\$SLURM_JOB_NODELIST\" | head -n 1)"
            need NODE_RANK "NNODES=$NNODES: this node's rank, 0 to $((NNODES - 1)), a different one on each node;\
 under SLURM NODE_RANK=\$SLURM_NODEID"
        fi
        [[ ${NODE_RANK:-0} =~ ^[0-9]+$ && $((10#${NODE_RANK:-0})) -lt $NNODES ]] || script_error \
            "NODE_RANK=$NODE_RANK is not in [0, NNODES) = [0, $NNODES)"
    elif [ -n "${NODE_RANK:-}" ] && [ "$NODE_RANK" != 0 ]; then
        script_error "NODE_RANK=$NODE_RANK is set without NNODES: set NNODES (the number of nodes) for torchrun on" \
            "each node, or unset NODE_RANK"
    fi
    if [ -n "${HOSTFILE:-}${NNODES:-}" ] && [ -n "${MASTER_PORT:-}" ]; then
        [[ $MASTER_PORT =~ ^[1-9][0-9]*$ && $MASTER_PORT -le $max_port ]] || script_error \
            "MASTER_PORT=$MASTER_PORT is not a port number (1 to $max_port)"
    fi
}

shell_line() {
    local arg words=()
    for arg in "$@"; do
        if [[ $arg =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then words+=("$arg"); else words+=("${arg@Q}"); fi
    done
    printf '%s\n' "${words[*]}"
}

launch() {
    if [ "${DRY_RUN:-0}" = 1 ]; then
        local value=${PYTHONPATH:-}
        [[ $value =~ ^[A-Za-z0-9_@%+=:,./-]*$ ]] || value=${value@Q}
        printf 'PYTHONPATH=%s %s\n' "$value" "$(shell_line "$@")"
        exit 0
    fi
    exec "$@"
}
