#!/bin/bash
# Minimal stand-ins for the devstack functions the plugin calls, so that
# devstack/settings and devstack/plugin.sh run as they would inside
# stack.sh, unstack.sh and clean.sh, without devstack.
#
# Set by the caller (oslo_messaging_ext.tests.devstack.run_plugin):
#   STANDIN_PYTHON  a python3 interpreter
#   STANDIN_INI     path of ini.py, the INI function stand-ins
#   STANDIN_LOG     file where calls with side effects outside the
#                   configuration file are recorded, one line each
#   STANDIN_PIP     path of pip.py, which installs a project's commands
#   STANDIN_SYSTEM_BIN  where pip puts commands without GLOBAL_VENV
#                   (/usr/local/bin on a real system)
#   ENABLED_SERVICES  comma separated, as in devstack
#   GLOBAL_VENV, DEVSTACK_VENV  as in devstack's stackrc

function _standin_record {
    echo "$*" >> "$STANDIN_LOG"
}

function _standin_ini {
    "$STANDIN_PYTHON" "$STANDIN_INI" "$@"
}

function iniset {
    _standin_ini iniset "$@"
}

function iniset_multiline {
    _standin_ini iniset_multiline "$@"
}

function iniadd {
    _standin_ini iniadd "$@"
}

function iniget {
    _standin_ini iniget "$@"
}

function iniget_multiline {
    _standin_ini iniget_multiline "$@"
}

function inidelete {
    _standin_ini inidelete "$@"
}

function ini_has_option {
    _standin_ini ini_has_option "$@"
}

# True if any of the named services is enabled.
function is_service_enabled {
    local service
    for service in "$@"; do
        if [[ ",$ENABLED_SERVICES," == *",$service,"* ]]; then
            return 0
        fi
    done
    return 1
}

function define_plugin {
    _standin_record define_plugin "$@"
}

# Where pip puts commands: devstack's global virtualenv by default.
function get_python_exec_prefix {
    if [[ "$GLOBAL_VENV" == "True" ]]; then
        echo "$DEVSTACK_VENV/bin"
    else
        echo "$STANDIN_SYSTEM_BIN"
    fi
}

# pip install -e PROJECT_DIR[EXTRAS]: fails as pip would on a directory that
# is not a project; installs the project's commands, which run the code of
# the tree under test.
function setup_develop {
    local project_dir=$1
    _standin_record setup_develop "$@"
    if [[ ! -f "$project_dir/setup.cfg" ]]; then
        die $LINENO "setup_develop: $project_dir is not a Python project (no setup.cfg)"
    fi
    "$STANDIN_PYTHON" "$STANDIN_PIP" "$project_dir" "$(get_python_exec_prefix)"
}

function echo_summary {
    echo "$@"
}

function die {
    local line=$1
    shift
    echo "[ERROR] plugin.sh:$line $*" >&2
    exit 1
}

# The harness already runs as the user the commands need.
function sudo {
    _standin_record sudo "$@"
    "$@"
}
