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

"""Options of the unix notification driver, and how their values are read.

Apart from the driver, so that listing them (oslo_messaging_ext.opts)
loads neither the driver nor anything it registers.
"""

import functools
import grp
import os

from oslo_config import cfg

GROUP = 'oslo_messaging_notifications'
# The least value of each bounded option, and why.
MINIMUMS = {'sock_max_subscribers': (1, ''),
            'sock_buffer_size': (65536, ' bytes, to hold a burst of '
                                 'notifications of a few kilobytes')}

unix_opts = [
    cfg.StrOpt('sock_path',
               help='Path of the Unix socket the unix notification driver '
                    'relays notifications on, e.g. '
                    '/run/glance/notifications.sock. Required with that '
                    'driver. Its directory must exist, be owned by root or '
                    'the service user, and not be writable by others unless '
                    'sticky; one path per service, whatever its number of '
                    'processes.'),
    cfg.StrOpt('sock_mode', default='0660',
               help='Mode of the socket file, as an octal string. Connecting '
                    'needs write permission, so 0660 lets the owner and the '
                    'group subscribe. The owner needs read and write; any '
                    'permission for others is refused.'),
    cfg.StrOpt('sock_group',
               help='Group of the socket file (name or numeric id). The '
                    'service user must belong to it. Unset means the '
                    'service\'s primary group.'),
    cfg.IntOpt('sock_max_subscribers', default=64,
               help='Subscribers served at once (at least 1); further ones '
                    'are closed and logged. The service\'s own processes '
                    'do not count.'),
    cfg.IntOpt('sock_buffer_size', default=4 * 1024 * 1024,
               help='Bytes of notifications queued at most per subscriber '
                    'that does not keep up, on top of the kernel socket '
                    'buffer (at least 65536). Past it, notifications are '
                    'dropped, counted and reported in-band. Each process '
                    'also asks for a send buffer of this size towards the '
                    'hub, as far as the kernel allows (net.core.wmem_max): '
                    'a larger notification is dropped and counted.'),
    cfg.BoolOpt('sock_include_context', default=False,
                help='Add the request context to each notification, as '
                     '"context". Auth tokens and other secrets are always '
                     'removed from it.'),
]


class UnixSocketConfigError(cfg.Error):
    """The unix driver's configuration is unusable; the message says why."""

    def __init__(self, name, value, reason):
        super().__init__('Invalid value %r for option %s in group [%s]: %s'
                         % (value, name, GROUP, reason))
        self.option = name
        self.group = GROUP
        self.value = value


def register_opts(conf):
    conf.register_opts(unix_opts, group=GROUP)


def bounded(conf_group, name):
    """The value of an option with a minimum; an error names what it was."""
    value = getattr(conf_group, name)
    least, why = MINIMUMS[name]
    if value < least:
        raise UnixSocketConfigError(name, value, 'it must be at least %d%s'
                                    % (least, why))
    return value


def parse_mode(value):
    """sock_mode as permission bits; UnixSocketConfigError if unsafe."""
    refuse = functools.partial(UnixSocketConfigError, 'sock_mode', value)
    try:
        mode = int(value, 8)
    except (TypeError, ValueError):
        raise refuse('not an octal number such as 0660')
    if mode & ~0o777:
        raise refuse('only permission bits (0-0777) apply')
    if mode & 0o007:
        raise refuse('the socket must not be accessible to others; grant '
                     'access through its group instead')
    if mode & 0o600 != 0o600:
        raise refuse('the owner needs read and write permission (0600)')
    return mode


def resolve_group(value):
    """Return the gid for ``value``, checking the service may use it."""
    if value is None or value == '':
        return os.getegid()
    try:
        gid = int(value) if value.isdigit() else grp.getgrnam(value).gr_gid
        if value.isdigit():
            grp.getgrgid(gid)
    except KeyError:
        raise UnixSocketConfigError('sock_group', value, 'no such group')
    if os.geteuid() != 0 and gid != os.getegid() and \
            gid not in os.getgroups():
        raise UnixSocketConfigError(
            'sock_group', value, 'the service user (uid %d) is not a '
            'member of this group' % os.geteuid())
    return gid
