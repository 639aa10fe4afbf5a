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

"""A glance image life cycle relayed by the unix driver to a live subscriber.

A notifier configured with ``driver = unix`` emits the recorded glance
notifications; a subscriber connected to the socket, in another thread,
prints each one as it arrives, through oslo.messaging endpoint code. No
broker is involved.
"""

import datetime
import os
import shutil
import sys
import tempfile
import threading
import time

from oslo_config import cfg
import oslo_messaging

from oslo_messaging_ext.cmd import _tail_format
from oslo_messaging_ext.notify import _impl_unix
from oslo_messaging_ext import samples
from oslo_messaging_ext import unix_subscriber

_TIMEOUT = 10.0
# The demo's lines fit this many columns.
WIDTH = 120


class _PrintingEndpoint:
    """The endpoint a consumer would write for an oslo.messaging listener."""

    def __init__(self, expected, out):
        self.out = out
        self.received = []
        self.expected = expected
        self.done = threading.Event()

    def _print(self, ctxt, publisher_id, event_type, payload, metadata,
               priority):
        self.received.append(event_type)
        # The time of day only (the date is in the header): the line keeps
        # what identifies the image within WIDTH.
        when = _tail_format.format_time(metadata['timestamp'])[11:]
        line = '  subscriber got %s %-5s %s %s' % (
            when, priority, event_type, _tail_format.format_payload(
                {k: payload.get(k) for k in ('id', 'name', 'status')
                 if k in payload}))
        self.out.write(line[:WIDTH] + '\n')
        self.out.flush()
        if len(self.received) >= self.expected:
            self.done.set()

    def info(self, ctxt, publisher_id, event_type, payload, metadata):
        self._print(ctxt, publisher_id, event_type, payload, metadata,
                    'INFO')


def add_arguments(parser):
    parser.add_argument('--sock-path',
                        help='socket to use (default: one in a new '
                             'temporary directory, removed afterwards)')
    parser.add_argument('--interval', type=float, default=0.2,
                        help='seconds between notifications (default 0.2)')


def run(args):
    out = sys.stdout
    tmpdir = None
    sock_path = args.sock_path
    if not sock_path:
        tmpdir = tempfile.mkdtemp(prefix='oslo-notify-demo-')
        sock_path = os.path.join(tmpdir, 'notifications.sock')
    conf = cfg.ConfigOpts()
    conf([], project='glance')
    _impl_unix.register_opts(conf)
    conf.set_override('sock_path', sock_path,
                      group='oslo_messaging_notifications')
    transport = oslo_messaging.get_notification_transport(conf,
                                                          url='fake:/')
    notifier = oslo_messaging.Notifier(transport, driver='unix',
                                       publisher_id='image.demo-host')
    # The Notifier keeps its drivers to itself: a driver of the same
    # configuration shares its relay, and so knows its subscribers.
    watcher = _impl_unix.UnixSocketDriver(conf, [], transport)
    envelopes = samples.glance_image_notifications()
    endpoint = _PrintingEndpoint(len(envelopes), out)
    subscription = unix_subscriber.Subscription(sock_path, reconnect=True,
                                                min_backoff=0.02)
    dispatcher = unix_subscriber.EndpointDispatcher([endpoint])
    reader = threading.Thread(target=dispatcher.run, args=(subscription,),
                              name='demo-subscriber', daemon=True)
    reader.start()
    try:
        out.write('unix driver on %s (mode 0660); subscriber connecting\n'
                  % sock_path)
        out.write('the notifier publishes as image.demo-host; times are '
                  'local, of %s\n' % datetime.date.today().isoformat())
        if not subscription.connected.wait(_TIMEOUT):
            out.write('the subscriber could not connect\n')
            return 1
        # The service learns of its subscriber asynchronously.
        deadline = time.monotonic() + _TIMEOUT
        while not watcher.subscribers() and time.monotonic() < deadline:
            time.sleep(0.01)
        for envelope in envelopes:
            out.write('notifier emits  %s\n' % envelope['event_type'])
            out.flush()
            notifier.info({}, envelope['event_type'], envelope['payload'])
            time.sleep(args.interval)
        if not endpoint.done.wait(_TIMEOUT):
            out.write('only %d of %d notifications arrived\n'
                      % (len(endpoint.received), len(envelopes)))
            return 1
        out.write('%d notifications relayed, none lost\n'
                  % len(endpoint.received))
        return 0
    finally:
        subscription.close()
        reader.join(_TIMEOUT)
        # The Notifier's driver closes its socket at exit.
        watcher.close()
        transport.cleanup()
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)
