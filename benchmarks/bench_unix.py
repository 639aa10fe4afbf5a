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

"""The unix driver against oslo.messaging's noop and log drivers.

Every case times ``Notifier.info()`` with the recorded glance image.upload
payload, in one run. The drivers take turns in blocks of 1000 calls, and
each ratio is the median of the ratios of neighbouring blocks (see
``_harness.compare``), so that a noisy neighbour does not favour one
driver. The log driver writes to a real handler (a
file, /dev/null) at INFO, as a service that uses it would.

Subscribers are separate processes, as they are in production.
"""

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

from oslo_config import cfg
import oslo_messaging

from benchmarks import _harness
from oslo_messaging_ext.notify import _impl_unix
from oslo_messaging_ext.tests import utils as test_utils

GROUP = 'oslo_messaging_notifications'

# A subscriber process: reads and discards (the per-call cases), or decodes
# every notification and reports when it has them all (end to end).
_SUBSCRIBER = textwrap.dedent('''
    import json, sys, time
    from oslo_messaging_ext import unix_subscriber
    path, expected = sys.argv[1], int(sys.argv[2])
    received = dropped = 0
    where = {}
    with unix_subscriber.Subscription(path) as subscription:
        for notification in subscription:
            event_type = notification['event_type']
            if event_type == unix_subscriber.DROPPED_EVENT_TYPE:
                count = notification['payload']['dropped']
                dropped += count
                place = notification['payload']['where'].split()[0]
                where[place] = where.get(place, 0) + count
            elif event_type == 'bench.end':
                break
            else:
                received += 1
                if received == expected:
                    break
    print(json.dumps({'received': received, 'dropped': dropped,
                      'where': where, 'done': time.monotonic()}),
          flush=True)
''')
_DISCARDER = textwrap.dedent('''
    import socket, sys
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(sys.argv[1])
    while sock.recv(1 << 20):
        pass
''')


def _unix_notifier(sock_path):
    conf = cfg.ConfigOpts()
    conf([], project='oslo-messaging-ext-bench')
    _impl_unix.register_opts(conf)
    conf.set_override('sock_path', sock_path, group=GROUP)
    transport = oslo_messaging.get_notification_transport(conf,
                                                          url='fake:/')
    notifier = oslo_messaging.Notifier(
        transport, publisher_id='image.localhost', driver='unix',
        topics=['notifications'])
    return notifier, notifier._driver_mgr.extensions[0].obj


def _log_notifier():
    logger = logging.getLogger('oslo.messaging.notification')
    handler = logging.FileHandler(os.devnull)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    notifier, _ = _harness.make_notifier('log')
    return notifier


def _wait(predicate, timeout=30.0):
    if not test_utils.wait_until(predicate, timeout, interval=0.005):
        raise RuntimeError('benchmark set-up timed out')


def _loop_rate(func, count):
    start = time.monotonic()
    for _ in range(count):
        func()
    return count / (time.monotonic() - start)


def _spawn(script, *args):
    return subprocess.Popen([sys.executable, '-c', script] + list(args),
                            stdout=subprocess.PIPE)


def run(args):
    count = 4000 if args.quick else 40000
    end_to_end = 20000 if args.quick else 200000
    payload = _harness.glance_payload()
    tmpdir = tempfile.mkdtemp(prefix='bench-unix-')
    sock_path = os.path.join(tmpdir, 'notifications.sock')

    noop, _ = _harness.make_notifier('noop')
    log = _log_notifier()
    unix, driver = _unix_notifier(sock_path)
    _wait(lambda: driver.subscribers() == 0)

    def call(notifier):
        return lambda: notifier.info({}, 'image.upload', payload)

    table = _harness.Table('unix driver: Notifier.info() with the glance '
                           'image.upload payload (us per call)')
    us = 1e6

    measured = _harness.compare({'noop': call(noop), 'log': call(log),
                                 'unix': call(unix)}, 'noop', count)
    table.add('noop (reference)', measured.median['noop'] * us, 'us')
    table.add('log (reference)', measured.median['log'] * us, 'us',
              ratio=measured.ratio('log'))
    ratio = measured.ratio('unix')
    table.add('no subscriber', measured.median['unix'] * us, 'us',
              ratio=ratio, target='<= 1.2x noop', ok=ratio <= 1.2)

    discarder = _spawn(_DISCARDER, sock_path)
    try:
        _wait(lambda: driver.subscribers() == 1)
        measured = _harness.compare({'noop': call(noop), 'log': call(log),
                                     'unix': call(unix)}, 'noop', count)
    finally:
        discarder.kill()
        discarder.wait()
    ratio = measured.ratio('unix')
    # Ratios are taken against the noop blocks run alongside this case.
    table.add('noop, alongside one subscriber', measured.median['noop'] * us,
              'us')
    table.add('one subscriber', measured.median['unix'] * us, 'us',
              ratio=ratio, target='<= 2x noop', ok=ratio <= 2.0)
    faster = measured.ratio('log', 'unix')
    table.add('one subscriber, times faster than log', faster, 'x',
              target='>= 5x', ok=faster >= 5.0)

    _wait(lambda: driver.subscribers() == 0)
    stuck = socket.socket(socket.AF_UNIX)
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(sock_path)
    try:
        _wait(lambda: driver.subscribers() == 1)
        # Fill its buffer first: the case is the steady state of a
        # subscriber that stopped reading long ago.
        for _ in range(10000):
            call(unix)()
        measured = _harness.compare({'noop': call(noop),
                                     'unix': call(unix)}, 'noop', count)
    finally:
        stuck.close()
    ratio = measured.ratio('unix', p99=True)
    table.add('noop p99, alongside a stuck subscriber',
              measured.p99['noop'] * us, 'us')
    table.add('stuck subscriber, p99', measured.p99['unix'] * us, 'us',
              ratio=ratio, target='<= 3x noop p99', ok=ratio <= 3.0)

    _wait(lambda: driver.subscribers() == 0)
    # What one thread can emit at all: the Notifier itself (uuid, clock,
    # stevedore) bounds every driver, and varies twofold between machines.
    ceiling = _loop_rate(call(noop), end_to_end)
    subscriber = _spawn(_SUBSCRIBER, sock_path, str(end_to_end))
    _wait(lambda: driver.subscribers() == 1)
    emit = call(unix)
    start = time.monotonic()
    for _ in range(end_to_end):
        emit()
    emitted = time.monotonic()
    # If some were dropped, the subscriber stops at this marker instead.
    deadline = emitted + 60
    while subscriber.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
        unix.info({}, 'bench.end', {})
    out, _ = subscriber.communicate(timeout=60)
    result = json.loads(out)
    rate = result['received'] / (result['done'] - start)
    lossless = (result['received'] == end_to_end and
                result['dropped'] == 0)
    table.add('one subscriber end to end, %d notifications%s'
              % (end_to_end, '' if lossless else ' (LOSS: %d dropped, %s)'
                 % (result['dropped'], result['where'])),
              rate, 'notifications/s', target='>= 50000/s, no loss',
              ok=lossless and rate >= 50000)
    table.add('  of which notify() alone', end_to_end / (emitted - start),
              'notifications/s')
    table.add('  ceiling: the same loop with noop', ceiling,
              'notifications/s', ratio=rate / ceiling)
    driver.close()
    os.rmdir(tmpdir) if not os.listdir(tmpdir) else None
    return [table]
