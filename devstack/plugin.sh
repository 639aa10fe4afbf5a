#!/bin/bash
# devstack plugin of oslo.messaging-ext: installs the notification drivers
# into the environment glance runs from.

function install_oslo_messaging_ext {
    setup_develop "$OSLO_MESSAGING_EXT_DIR"
}

if [[ "$1" == "stack" && "$2" == "install" ]]; then
    echo_summary "Installing oslo.messaging-ext"
    install_oslo_messaging_ext
fi
