#!/bin/bash
# Stand-ins for devstack's plugin machinery (functions-common) and for the
# order in which stack.sh, unstack.sh and clean.sh drive it, written from
# what devstack does; see doc/source/admin/devstack.rst. What the plugin's
# name and directory depend on is reproduced exactly:
#
# - enable_plugin NAME URL [BRANCH] records the plugin under NAME, with
#   $DEST/NAME as its directory (GITDIR) and master as the default branch;
# - fetch_plugins runs git_clone for each plugin: nothing to do when the
#   directory exists; when it does not, ERROR_ON_CLONE=True (set by the
#   devstack jobs of Zuul, which check the projects out themselves) stops
#   the run. This harness never clones: without ERROR_ON_CLONE it stops too;
# - run_phase source sources $GITDIR/devstack/settings of each plugin, in
#   the order they were enabled, from inside a function; any other phase
#   sources $GITDIR/devstack/plugin.sh MODE PHASE the same way; a plugin
#   without the file is skipped silently.
#
# Set by the caller (oslo_messaging_ext.tests.devstack.run_devstack): DEST,
# ERROR_ON_CLONE, and the localrc file holding the enable_plugin lines.

DEVSTACK_PLUGINS=${DEVSTACK_PLUGINS:-""}
declare -A -g GITREPO GITDIR GITBRANCH

function enable_plugin {
    local name=$1
    local url=$2
    local branch=${3:-master}
    if is_plugin_enabled "$name"; then
        die $LINENO "Plugin attempted to be enabled twice: $name $url $branch"
    fi
    DEVSTACK_PLUGINS+=",$name"
    GITREPO[$name]=$url
    GITDIR[$name]=$DEST/$name
    GITBRANCH[$name]=$branch
}

function is_plugin_enabled {
    [[ ",$DEVSTACK_PLUGINS," == *",$1,"* ]]
}

function git_clone {
    local git_remote=$1
    local git_dest=$2
    local git_ref=$3
    if [[ -d "$git_dest" ]]; then
        return 0
    fi
    if [[ "$ERROR_ON_CLONE" == "True" ]]; then
        echo "The $git_dest project was not found; if this is a gate job, add"
        echo "the project to the \$PROJECTS variable in the job definition."
        die $LINENO "ERROR_ON_CLONE is set to True so cloning not allowed in this configuration"
    fi
    die $LINENO "the devstack stand-ins never clone ($git_remote $git_ref into $git_dest)"
}

function fetch_plugins {
    local plugin
    for plugin in ${DEVSTACK_PLUGINS//,/ }; do
        git_clone "${GITREPO[$plugin]}" "${GITDIR[$plugin]}" "${GITBRANCH[$plugin]}"
    done
}

function load_plugin_settings {
    local plugin dir
    for plugin in ${DEVSTACK_PLUGINS//,/ }; do
        dir=${GITDIR[$plugin]}
        if [[ -f $dir/devstack/settings ]]; then
            source "$dir/devstack/settings"
        fi
    done
}

function plugin_override_defaults {
    local plugin dir
    for plugin in ${DEVSTACK_PLUGINS//,/ }; do
        dir=${GITDIR[$plugin]}
        if [[ -f $dir/devstack/override-defaults ]]; then
            source "$dir/devstack/override-defaults"
        fi
    done
}

function run_plugins {
    local mode=$1
    local phase=$2
    local plugin dir
    for plugin in ${DEVSTACK_PLUGINS//,/ }; do
        dir=${GITDIR[$plugin]}
        if [[ -f $dir/devstack/plugin.sh ]]; then
            source "$dir/devstack/plugin.sh" "$mode" "$phase"
        fi
    done
}

function run_phase {
    local mode=$1
    local phase=$2
    if [[ "$mode" == "source" ]]; then
        load_plugin_settings
    elif [[ "$mode" == "override_defaults" ]]; then
        plugin_override_defaults
    else
        run_plugins "$mode" "$phase"
    fi
}

# stack.sh, as far as plugins go: clone, override defaults, load settings,
# then the stack phases in order (all of them unless some are named).
function standin_stack_sh {
    local phase
    fetch_plugins
    run_phase override_defaults
    run_phase source
    for phase in ${@:-pre-install install post-config extra test-config}; do
        run_phase stack "$phase"
    done
}

# unstack.sh and clean.sh load the settings without fetching anything.
# unstack.sh runs the unstack phase first and only then stops the services
# (stop_glance...): here STANDIN_STOP_SERVICES, a command the caller may
# give, stands for the latter. clean.sh runs unstack.sh, then the clean
# phase.
function standin_unstack_sh {
    load_plugin_settings
    run_phase unstack
    if [[ -n "${STANDIN_STOP_SERVICES:-}" ]]; then
        eval "$STANDIN_STOP_SERVICES"
    fi
}

function standin_clean_sh {
    standin_unstack_sh
    load_plugin_settings
    run_phase clean
}
