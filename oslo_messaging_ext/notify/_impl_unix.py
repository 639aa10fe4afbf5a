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

"""Relay notifications to local subscribers over a Unix socket.

Configured in [oslo_messaging_notifications]: ``driver = unix`` and
``sock_path``. A subscriber connects to ``sock_path`` and reads one JSON
object a line (UTF-8, ``\\n``-terminated): the envelope oslo.messaging
builds (message_id, publisher_id, event_type, priority, payload, timestamp),
plus ``context`` only when ``sock_include_context`` is set, and then without
auth tokens or secrets, and ``sequence``, the emitting process's sequence
number. The payload and the context are masked as oslo.messaging's log
driver masks them (``strutils.mask_dict_password``). Nothing else is ever
written on the stream, so ``socat - UNIX-CONNECT:PATH | jq .`` works with
no handshake.

Delivery semantics:

* With no subscriber, a notification is dropped at near-zero cost: it is
  not serialized.
* Each subscriber receives every notification in order, per emitting
  process, as long as it keeps up. Notifications of several processes are
  interleaved in the order the hub receives them.
* notify() never blocks on a subscriber or on the hub. Past a subscriber's
  buffer bound (``sock_buffer_size`` bytes, on top of the kernel's socket
  buffer) its notifications are dropped and counted; the next one it gets
  is preceded by a notification of event_type
  ``oslo_messaging_ext.unix.dropped`` whose payload ``dropped`` is the count
  (and ``sources`` the count per emitting process).
  A process whose own queue to the hub overflows reports its drops the same
  way. A count is reported within about 0.1 s even when no notification
  follows, as soon as the subscriber has room for the notice, and a
  process that stops reports what it counted before it goes. One
  notification larger than ``sock_buffer_size`` still goes to a subscriber
  with nothing queued.
* Every line on the wire ends with ``\\n``: a stopping hub gives a slow
  subscriber the rest of a line it has started (1 s more); only one that
  reads nothing at all then sees a cut line, which the subscriber library
  counts as dropped.
* Disconnected or crashed subscribers are cleaned up silently.
* When every subscriber's buffer is full, notify() counts the notification
  instead of serializing it; the count is reported like any other drop.
* Nothing is stored: a subscriber receives what is emitted after the hub
  accepted its connection (in the hub's process), or after a publisher
  process learned of it from the hub (one status line later).

Multi-process services share one ``sock_path``. Each process takes a
short lock on ``sock_path + '.lock'``; the one that binds the path is the
hub, the others connect to it as publishers and introduce themselves with a
handshake line (subscribers send nothing; a new connection that says
nothing within 50 ms is a subscriber, and what was emitted meanwhile is
held for it; a publisher that introduces itself later still becomes
one). The hub relays the publishers' lines,
already serialized, to every subscriber, and tells the publishers how many
subscribers there are, so that a process with none serializes nothing.
Only processes of the same user may publish, and a process publishes
only to a hub of its own user (SO_PEERCRED, checked before anything is
sent): a path bound by another user is an error at driver load, and at
run time is retried with backoff while notifications are counted as
dropped. ``sock_max_subscribers`` counts subscribers only; the service's
own processes are always let in. The lock is only ever tried, never
waited for, so a process holding it delays the election and never blocks
the service (fork and notify included).

The directory of ``sock_path`` must be owned by root or the service user
and must not be writable by others unless sticky (as /tmp): otherwise
anyone could replace the socket. Members of a group that may write the
directory are trusted as the owner is.

The relay thread never takes a lock of the logging module: in a process
eventlet patched, its log records are handed to the service's side and
logged from a green thread within a second.

A process joins when the driver is loaded, and a forked child (os.fork,
multiprocessing, uWSGI workers) joins again at fork, never using what it
inherited; a process that forks parks its relay thread meanwhile. uWSGI's
master, which loads the application before forking its workers (without
``--lazy-apps``) and forks them without Python's at-fork hooks, never
starts a relay thread: what it emits while loading is not relayed (no
process serves the socket yet). A worker makes the relay its own through
uWSGI's post-fork hook, or as soon as it notices its new process id. If
the hub process exits, the publishers elect a new hub and subscribers
must reconnect (the subscriber library and ``oslo-notify-tail --follow``
do so with backoff). During the switch-over, what a publisher had not
yet handed to the departing hub is counted and reported as dropped to the
next hub's subscribers; what it had handed over but the hub had not
relayed yet is lost with the hub, and shows as a gap in the sequence
numbers of its process to a subscriber that hears from it again.
A hub relays the last lines of an exiting publisher before dropping it.

A stale socket file never blocks start-up, nor does a hub exiting, paused
or busy, or of another service: driver load never waits for another
process, and only what another user holds for good (the socket, its lock
file, a stale socket in a sticky directory) is an error at load. A process
sends notifications only to a hub that answered its handshake. The
socket is bound in a private directory, given its group and mode, then
renamed into place: it is never reachable with a wider mode than
configured. It is removed on clean shutdown (exit, or driver close()).
Nothing is ever unlinked, chmod'ed or chown'ed through a symlink.
"""

import grp
import logging
import os
import stat
import sys

from oslo_config import cfg
from oslo_messaging.notify import notifier

from oslo_messaging_ext.notify import _unix_encoding
from oslo_messaging_ext.notify import _unix_opts
from oslo_messaging_ext.notify import _unix_protocol
from oslo_messaging_ext.notify import _unix_relay
from oslo_messaging_ext.notify import _unix_sockfile

LOG = logging.getLogger(__name__)

GROUP = _unix_opts.GROUP
MIN_BUFFER_SIZE = _unix_opts.MIN_BUFFER_SIZE
_RefusedValue = _unix_opts.RefusedValue
unix_opts = _unix_opts.unix_opts
register_opts = _unix_opts.register_opts

# Services build many Notifiers (glance about 14 a process), each loading
# its own driver: what it serves is said at INFO once per configuration.
_LOADED = set()


class UnixSocketConfigError(cfg.Error):
    """The unix driver's configuration is unusable; the message says why."""

    def __init__(self, name, value, reason):
        super().__init__('Invalid value %r for option %s in group [%s]: %s'
                         % (value, name, GROUP, reason))
        self.option = name
        self.group = GROUP
        self.value = value


def _parse_mode(value):
    try:
        mode = int(value, 8)
    except (TypeError, ValueError):
        raise UnixSocketConfigError('sock_mode', value,
                                    'not an octal number such as 0660')
    if mode & ~0o777:
        raise UnixSocketConfigError('sock_mode', value,
                                    'only permission bits (0-0777) apply')
    if mode & 0o007:
        raise UnixSocketConfigError(
            'sock_mode', value, 'the socket must not be accessible to '
            'others; grant access through its group instead')
    if mode & 0o600 != 0o600:
        raise UnixSocketConfigError(
            'sock_mode', value, 'the owner needs read and write permission '
            '(0600): the service\'s own processes connect to it')
    return mode


def _resolve_group(value):
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


def _check_path(path):
    if not path:
        raise UnixSocketConfigError(
            'sock_path', path, 'the unix notification driver needs a socket '
            'path, e.g. /run/<service>/notifications.sock')
    if not os.path.isabs(path):
        raise UnixSocketConfigError('sock_path', path,
                                    'it must be an absolute path')
    # sun_path holds 107 bytes; the socket is first bound in a private
    # directory beside the path, whose name is longer by up to 16 bytes.
    directory = os.path.dirname(path)
    if (len(os.fsencode(path)) > 107 or
            len(os.fsencode(directory)) + 16 > 107):
        raise UnixSocketConfigError('sock_path', path,
                                    'too long for a Unix socket address')
    if not os.path.isdir(directory):
        raise UnixSocketConfigError(
            'sock_path', path, 'its directory %s does not exist' % directory)
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UnixSocketConfigError(
            'sock_path', path, 'the service user (uid %d) cannot create '
            'files in %s' % (os.geteuid(), directory))
    problem = _unix_sockfile.directory_problem(directory)
    if problem:
        raise UnixSocketConfigError('sock_path', path, problem)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise UnixSocketConfigError(
            'sock_path', path, 'it exists and is not a socket (a symlink, '
            'a regular file or a directory is never replaced)')


def _check_holders(path, service):
    """Refuse what another user holds for good; leave the rest to the relay.

    Only the certain is an error at load: a lock file or a socket file of
    another user, or another user listening. A hub exiting, paused or
    busy, or of another service, may be gone in a moment: the relay
    retries with backoff. Nothing here waits for another process.
    """
    problem = _unix_sockfile.squatted(path, path + '.lock')
    if problem:
        raise UnixSocketConfigError('sock_path', path, problem)
    try:
        _unix_sockfile.check_listener(path, service)
    except _unix_protocol.RelayError as exc:
        raise UnixSocketConfigError('sock_path', path, str(exc))


def _bounded_option(conf_group, name):
    """The value of an option with a minimum; an error names what it was."""
    try:
        return getattr(conf_group, name)
    except ValueError as exc:
        # oslo.config reports a configuration file's value as
        # ConfigFileValueError, raised while handling ours.
        refused = exc if isinstance(exc, _RefusedValue) else exc.__context__
        if not isinstance(refused, _RefusedValue):
            raise
        raise UnixSocketConfigError(name, refused.value, str(refused))


def _say_loaded(path, mode, gid, service):
    key = (os.getpid(), path, mode, gid)
    log = LOG.debug if key in _LOADED else LOG.info
    _LOADED.add(key)
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = str(gid)
    log('unix notification driver loaded: socket %(path)s, mode %(mode)04o, '
        'group %(group)s, service %(service)s; it relays every notification '
        'of this service and ignores topics',
        {'path': path, 'mode': mode, 'group': group, 'service': service})


def service_identity(conf):
    """What the processes of a service share: its project, else program."""
    return (getattr(conf, 'project', None) or
            os.path.basename(sys.argv[0] or 'python'))


def validate(conf):
    """Register and check the driver's options, as the driver loads them.

    Also what oslo-messaging-ext-check runs on a service's files.

    :returns: {'path', 'mode', 'gid', 'max_subscribers', 'buffer_size',
        'include_context', 'service'}
    :raises UnixSocketConfigError: naming the option, group and value
    """
    register_opts(conf)
    group = conf[GROUP]
    path = group.sock_path
    _check_path(path)
    settings = {'path': path,
                'mode': _parse_mode(group.sock_mode),
                'gid': _resolve_group(group.sock_group),
                'max_subscribers': _bounded_option(group,
                                                   'sock_max_subscribers'),
                'buffer_size': _bounded_option(group, 'sock_buffer_size'),
                'include_context': group.sock_include_context,
                'service': service_identity(conf)}
    try:
        _check_holders(path, settings['service'])
    except OSError as exc:
        raise UnixSocketConfigError('sock_path', path, str(exc))
    return settings


class UnixSocketDriver(notifier.Driver):
    """Relay notifications to subscribers of a local Unix socket."""

    def __init__(self, conf, topics, transport):
        super().__init__(conf, topics, transport)
        settings = validate(conf)
        path, mode, gid, service = (settings['path'], settings['mode'],
                                    settings['gid'], settings['service'])
        max_subscribers = settings['max_subscribers']
        buffer_size = settings['buffer_size']
        self._include_context = settings['include_context']
        _say_loaded(path, mode, gid, service)
        self._encode = _unix_encoding.make_line_encoder()
        self._sequence = _unix_encoding.sequence(path)
        self._relay = _unix_relay.get(
            path, service=service, mode=mode, gid=gid,
            max_subscribers=max_subscribers, buffer_size=buffer_size)
        # Not in uWSGI's master, which forks its workers after loading the
        # application: they join when they are forked.
        self._relay.start()

    def notify(self, ctxt, message, priority, retry):
        relay = self._relay
        if relay is None:
            return
        if not relay.wanted():
            self._sequence.skip()
            return
        try:
            if self._include_context:
                message = dict(message, context=_unix_encoding.redact_context(
                    ctxt))
            # A str: the relay thread encodes it to UTF-8 with the rest of
            # its batch, off the service's path.
            self._sequence.publish(message, self._encode, relay.publish)
        except Exception:
            LOG.exception('Cannot serialize notification %s (%s) for the '
                          'unix notification socket; dropped.',
                          message.get('message_id'),
                          message.get('event_type'))

    def subscribers(self):
        """How many subscribers this process knows of (None: not yet)."""
        return None if self._relay is None else self._relay.subscribers

    def close(self):
        """Stop relaying; the last driver of a path removes its socket.

        Optional: the socket is also removed when the process exits.
        """
        relay, self._relay = self._relay, None
        if relay is not None:
            _unix_relay.release(relay)
