#!/bin/bash
# devstack plugin of oslo.messaging-ext: installs the notification drivers
# into the environment glance runs from and enables them in glance-api.conf.
#
# Phases:
#   stack install      install this package (setup_develop) and put its
#                      commands on PATH
#   stack post-config  enable the drivers in $GLANCE_API_CONF (g-api only)
#   unstack            nothing: devstack's unstack.sh runs it before it
#                      stops glance-api, whose socket must stay in place
#                      while it runs
#   clean              (clean.sh runs unstack.sh, which stops every
#                      service, first) remove the socket and the files
#                      named after it, the runtime directory, its
#                      systemd-tmpfiles entry and the links to the commands

# Save trace setting
_XTRACE_OSLO_MESSAGING_EXT=$(set +o | grep xtrace)
set -o xtrace

OSLO_MESSAGING_EXT_KNOWN_DRIVERS="messaging-multicast unix"
OSLO_MESSAGING_EXT_NOTIFY_SECTION=oslo_messaging_notifications
# Commands of the package that devstack users run.
OSLO_MESSAGING_EXT_COMMANDS="oslo-notify-tail"


# True if the operator asked for our driver $1.
function oslo_messaging_ext_wants {
    [[ " $OSLO_MESSAGING_EXT_DRIVERS " == *" $1 "* ]]
}

# True if $OSLO_MESSAGING_EXT_RUN_DIR is a path this plugin may create and
# remove (as root, with rmdir once our files are gone): absolute, at least
# two levels deep.
function oslo_messaging_ext_run_dir_is_safe {
    [[ "$OSLO_MESSAGING_EXT_RUN_DIR" =~ ^/[^/]+/[^/]+ && "$OSLO_MESSAGING_EXT_RUN_DIR" != *..* ]]
}

function oslo_messaging_ext_check_settings {
    local driver
    for driver in $OSLO_MESSAGING_EXT_DRIVERS; do
        if [[ " $OSLO_MESSAGING_EXT_KNOWN_DRIVERS " != *" $driver "* ]]; then
            die $LINENO "OSLO_MESSAGING_EXT_DRIVERS: unknown driver '$driver' (known: $OSLO_MESSAGING_EXT_KNOWN_DRIVERS)"
        fi
    done
    if oslo_messaging_ext_wants unix && ! oslo_messaging_ext_run_dir_is_safe; then
        die $LINENO "OSLO_MESSAGING_EXT_RUN_DIR ($OSLO_MESSAGING_EXT_RUN_DIR) must be an absolute path at least two levels deep, such as /run/oslo-messaging-ext: the plugin removes it at clean"
    fi
    if oslo_messaging_ext_wants unix && \
            [[ "$(dirname "$OSLO_MESSAGING_EXT_SOCK_PATH")" != "$OSLO_MESSAGING_EXT_RUN_DIR" ]]; then
        die $LINENO "OSLO_MESSAGING_EXT_SOCK_PATH ($OSLO_MESSAGING_EXT_SOCK_PATH) must be directly in OSLO_MESSAGING_EXT_RUN_DIR ($OSLO_MESSAGING_EXT_RUN_DIR), the directory this plugin creates and removes"
    fi
}

# Print the notification driver list glance should run with, given the list
# it has now ($@): messagingv2 gives its place to messaging-multicast, which
# sends the standard notification itself (keeping both would send every
# notification twice); the operator's other drivers stay, in their order;
# ours are appended once. Running it on its own output changes nothing.
function oslo_messaging_ext_driver_list {
    local drivers="" driver
    for driver in "$@" $OSLO_MESSAGING_EXT_DRIVERS; do
        if [[ "$driver" == messagingv2 ]] && oslo_messaging_ext_wants messaging-multicast; then
            driver=messaging-multicast
        fi
        if [[ " $drivers " != *" $driver "* ]]; then
            drivers="${drivers:+$drivers }$driver"
        fi
    done
    echo "$drivers"
}

function install_oslo_messaging_ext {
    local extras=""
    if [[ "$OSLO_MESSAGING_EXT_ORJSON" == True ]]; then
        extras=orjson
    fi
    if [[ "$OSLO_MESSAGING_EXT_REGEX" == True ]]; then
        extras="${extras:+$extras,}regex"
    fi
    setup_develop "$OSLO_MESSAGING_EXT_DIR" $extras
}

# Link our commands into $OSLO_MESSAGING_EXT_BIN_LINK_DIR when pip put them
# elsewhere, as stack.sh does for its own commands of the global virtualenv.
function link_oslo_messaging_ext_commands {
    local bin_dir command
    bin_dir=$(get_python_exec_prefix)
    if [[ "$bin_dir" == "$OSLO_MESSAGING_EXT_BIN_LINK_DIR" ]]; then
        return
    fi
    for command in $OSLO_MESSAGING_EXT_COMMANDS; do
        if [[ ! -x "$bin_dir/$command" ]]; then
            die $LINENO "$command is not in $bin_dir after the install of $OSLO_MESSAGING_EXT_DIR"
        fi
        sudo ln -sf "$bin_dir/$command" "$OSLO_MESSAGING_EXT_BIN_LINK_DIR/$command"
    done
}

# Remove the links made at install, and only those.
function unlink_oslo_messaging_ext_commands {
    local bin_dir command link
    bin_dir=$(get_python_exec_prefix)
    for command in $OSLO_MESSAGING_EXT_COMMANDS; do
        link=$OSLO_MESSAGING_EXT_BIN_LINK_DIR/$command
        if [[ -L "$link" && "$(readlink "$link")" == "$bin_dir/$command" ]]; then
            sudo rm -f "$link"
        fi
    done
}

function configure_oslo_messaging_ext_unix {
    local conf=$1
    local group=${OSLO_MESSAGING_EXT_SOCK_GROUP:-$(id -gn "$STACK_USER")}

    # glance runs as $STACK_USER and binds the socket; subscribers of the
    # group need search permission on the directory to connect.
    sudo install -d -o "$STACK_USER" -g "$group" -m 0750 "$OSLO_MESSAGING_EXT_RUN_DIR"
    echo "d $OSLO_MESSAGING_EXT_RUN_DIR 0750 $STACK_USER $group -" | \
        sudo tee "$OSLO_MESSAGING_EXT_TMPFILES_CONF" > /dev/null

    iniset "$conf" $OSLO_MESSAGING_EXT_NOTIFY_SECTION sock_path "$OSLO_MESSAGING_EXT_SOCK_PATH"
    iniset "$conf" $OSLO_MESSAGING_EXT_NOTIFY_SECTION sock_group "$group"
    iniset "$conf" $OSLO_MESSAGING_EXT_NOTIFY_SECTION sock_mode "$OSLO_MESSAGING_EXT_SOCK_MODE"
}

function configure_oslo_messaging_ext_multicast {
    local conf=$1
    local rule_section=multicast_rule_$OSLO_MESSAGING_EXT_MULTICAST_RULE
    local targets="" host

    for host in ${OSLO_MESSAGING_EXT_MULTICAST_HOSTS//,/ }; do
        targets="${targets:+$targets,}$OSLO_MESSAGING_EXT_MULTICAST_PREFIX$host"
    done

    iniset "$conf" oslo_messaging_multicast rules "$OSLO_MESSAGING_EXT_MULTICAST_RULE"
    iniset "$conf" "$rule_section" targets "$targets"
    iniset "$conf" "$rule_section" publisher_id "$OSLO_MESSAGING_EXT_MULTICAST_PUBLISHER_ID"
    # selector is multi-valued: drop what an earlier run left so that
    # exactly one remains. Deleting and re-adding puts it right below the
    # section header, so it is written last: a second run then finds the
    # other options where the first run left them and the file unchanged.
    inidelete "$conf" "$rule_section" selector
    iniset "$conf" "$rule_section" selector "event_type in $OSLO_MESSAGING_EXT_MULTICAST_EVENTS"
}

function configure_oslo_messaging_ext {
    local conf=$GLANCE_API_CONF
    local current

    oslo_messaging_ext_check_settings
    if oslo_messaging_ext_wants unix; then
        configure_oslo_messaging_ext_unix "$conf"
    fi
    if oslo_messaging_ext_wants messaging-multicast; then
        configure_oslo_messaging_ext_multicast "$conf"
    fi

    # iniset_multiline rewrites the driver lines right below the section
    # header; done after the iniset calls of the same section, the second
    # run of this phase leaves the file as the first one wrote it. Driver
    # names never contain spaces, so word splitting the lists is safe.
    current=$(iniget_multiline "$conf" $OSLO_MESSAGING_EXT_NOTIFY_SECTION driver)
    iniset_multiline "$conf" $OSLO_MESSAGING_EXT_NOTIFY_SECTION driver $(oslo_messaging_ext_driver_list $current)
}

# Run at clean only, once the service is stopped. What the driver makes
# is named after sock_path: the socket itself and files beside it whose
# name starts with it and a dot (its lock file, which outlives the service
# on purpose, and any other socket or file a driver version adds there).
# Sockets and regular files only, never a link or a directory.
function cleanup_oslo_messaging_ext {
    local path
    for path in "$OSLO_MESSAGING_EXT_SOCK_PATH" "$OSLO_MESSAGING_EXT_SOCK_PATH".*; do
        if [[ ! -L "$path" ]] && [[ -S "$path" || -f "$path" ]]; then
            sudo rm -f "$path"
        fi
    done
    # rmdir, not rm -r: whatever else someone put there is not ours to
    # delete, and the directory then stays.
    if oslo_messaging_ext_run_dir_is_safe && [[ -d "$OSLO_MESSAGING_EXT_RUN_DIR" ]]; then
        if ! sudo rmdir "$OSLO_MESSAGING_EXT_RUN_DIR"; then
            echo "oslo-messaging-ext: $OSLO_MESSAGING_EXT_RUN_DIR is not empty; left in place"
        fi
    fi
    if [[ -f "$OSLO_MESSAGING_EXT_TMPFILES_CONF" ]]; then
        sudo rm -f "$OSLO_MESSAGING_EXT_TMPFILES_CONF"
    fi
}

if [[ "$1" == "stack" && "$2" == "install" ]]; then
    echo_summary "Installing oslo.messaging-ext"
    install_oslo_messaging_ext
    link_oslo_messaging_ext_commands
elif [[ "$1" == "stack" && "$2" == "post-config" ]]; then
    if is_service_enabled g-api && [[ -f "$GLANCE_API_CONF" ]]; then
        echo_summary "Enabling oslo.messaging-ext notification drivers in glance-api"
        configure_oslo_messaging_ext
    fi
fi

# Nothing is done at unstack: devstack's unstack.sh runs the plugins'
# unstack phase before it stops the services, so glance-api still serves
# its socket then.
if [[ "$1" == "clean" ]]; then
    cleanup_oslo_messaging_ext
    unlink_oslo_messaging_ext_commands
fi

# Restore xtrace
$_XTRACE_OSLO_MESSAGING_EXT
