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
#   ENABLED_SERVICES  comma separated, as in devstack

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

function setup_develop {
    _standin_record setup_develop "$@"
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
