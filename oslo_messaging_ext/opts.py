#    Licensed under the Apache License, Version 2.0 (the "License"); you may
#    not use this file except in compliance with the License. You may obtain
#    a copy of the License at
#
#         http://www.apache.org/licenses/LICENSE-2.0
#
#    Unless required by applicable law or agreed to in writing, software
#    distributed under the License is distributed on an "AS IS" BASIS, WITHOUT
#    WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the
#    License for the specific language governing permissions and limitations
#    under the License.

"""Configuration options of oslo.messaging-ext, for oslo-config-generator.

Each driver module declares its options at module top; this module only
gathers them, so that listing options never has side effects on a
configuration object.
"""

import copy

from oslo_messaging_ext.notify import _multicast_opts
from oslo_messaging_ext.notify import _unix_opts

__all__ = [
    'list_opts',
]

_opts = [
    (None, _multicast_opts.onmcast_opts),
    (_multicast_opts.GROUP, _multicast_opts.multicast_opts),
    # A dynamic group: one [multicast_rule_NAME] per rule named in rules.
    (_multicast_opts.rule_group, _multicast_opts.rule_opts),
    (_unix_opts.GROUP, _unix_opts.unix_opts),
]


def list_opts():
    """Return the oslo.config options that oslo.messaging-ext may register.

    Each element is a (group_name, opts) tuple; None names the
    [DEFAULT] group. The options are deep copies, so a caller that
    registers or mutates them cannot alter the drivers' own definitions.

    Discoverable through the oslo_messaging_ext entry point of the
    oslo.config.opts namespace.

    :returns: a list of (group_name, opts) tuples
    """
    return [(g, copy.deepcopy(o)) for g, o in _opts]
