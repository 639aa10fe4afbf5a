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

"""Losses at hub switch-over, as a subscriber can count them.

Three processes of one service notify as fast as they can; every second
the process that is the hub exits (cleanly, or killed with SIGKILL) and a
new one starts; one subscriber reads slowly and reconnects. Of what the
processes emitted, the table shows what the subscriber neither received
nor counted: counted by drop notices only, and by the rule of unix.rst
(gaps in sequence numbers, notices per source). What a killed hub had
emitted itself after its last line the subscriber got cannot be counted
by anyone alive: that part stays.
"""

import json
import multiprocessing
import os
import signal
import socket
import tempfile
import time

from benchmarks import _harness

GROUP = 'oslo_messaging_notifications'
SERVICE = 'oslo-messaging-ext-bench-switchover'
_PROCESSES = 3


def _driver(path):
    # Imported in the child: the parent, which forks every process of the
    # case, must hold no state of oslo.messaging or of the driver.
    from oslo_config import cfg
    import oslo_messaging

    from oslo_messaging_ext.notify import _impl_unix
    conf = cfg.ConfigOpts()
    conf([], project=SERVICE)
    _impl_unix.register_opts(conf)
    conf.set_override('sock_path', path, group=GROUP)
    conf.set_override('sock_buffer_size', 262144, group=GROUP)
    transport = oslo_messaging.get_notification_transport(conf,
                                                          url='fake:/')
    return _impl_unix.UnixSocketDriver(conf, ['n'], transport)


def _notify_until_told(path, emitted, stop):
    driver = _driver(path)
    told = []
    signal.signal(signal.SIGTERM, lambda *args: told.append(True))
    payload = {'id': 'x' * 200, 'status': 'active'}
    count = 0
    while not told and not stop.is_set():
        count += 1
        driver.notify({}, {'message_id': str(count), 'event_type': 'bench',
                           'priority': 'INFO', 'payload': payload},
                      'INFO', None)
        emitted.value = count
        if count % 50 == 0:
            time.sleep(0.001)
    driver.close()
    os._exit(0)


class _Tally:
    """What one subscriber received and counted, by unix.rst's rule."""

    def __init__(self):
        from oslo_messaging_ext import unix_subscriber
        self._dropped_event_type = unix_subscriber.DROPPED_EVENT_TYPE
        self.received = self.noticed = self.gaps = self.unattributed = 0
        self.last = {}
        self.pending = {}

    def line(self, raw):
        line = json.loads(raw)
        if line.get('event_type') == self._dropped_event_type:
            payload = line['payload']
            sources = payload.get('sources') or {}
            self.noticed += payload['dropped']
            self.unattributed += payload['dropped'] - sum(sources.values())
            for source, count in sources.items():
                self.pending[source] = self.pending.get(source, 0) + count
            return
        self.received += 1
        sequence = line.get('sequence')
        if not sequence:
            return
        source, number = sequence['source'], sequence['number']
        if source in self.last:
            gap = number - self.last[source] - 1
            self.gaps += gap
            pending = self.pending.get(source, 0)
            self.pending[source] = pending - min(gap, pending)
        self.last[source] = number

    def counted(self):
        return self.gaps + sum(self.pending.values()) + self.unattributed


def _read_slowly(path, results, stop):
    tally = _Tally()
    deadline = None
    while deadline is None or time.monotonic() < deadline:
        if stop.is_set() and deadline is None:
            deadline = time.monotonic() + 3
        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            time.sleep(0.02)
            continue
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.settimeout(0.5)
        rest = b''
        while deadline is None or time.monotonic() < deadline:
            try:
                data = sock.recv(16384)
            except socket.timeout:
                continue
            except OSError:
                break
            if not data:
                break
            time.sleep(0.002)
            *lines, rest = (rest + data).split(b'\n')
            for raw in lines:
                tally.line(raw)
        sock.close()
    results.put((tally.received, tally.noticed, tally.counted()))


def _hub_pid(path):
    from oslo_messaging_ext.notify import _unix_sockfile
    try:
        return _unix_sockfile.probe(path, SERVICE, 1.0)['pid']
    except Exception:
        return None


def _run_case(kill, duration):
    ctx = multiprocessing.get_context('fork')
    path = os.path.join(tempfile.mkdtemp(prefix='bench-switchover-'),
                        'n.sock')
    stop = ctx.Event()
    results = ctx.Queue()
    counters, processes = [], {}

    def spawn():
        emitted = ctx.Value('q', 0, lock=False)
        process = ctx.Process(target=_notify_until_told,
                              args=(path, emitted, stop))
        process.start()
        counters.append(emitted)
        processes[process.pid] = process

    spawn()
    while not os.path.exists(path):
        time.sleep(0.01)
    reader = ctx.Process(target=_read_slowly, args=(path, results, stop))
    reader.start()
    for _ in range(_PROCESSES - 1):
        spawn()
    time.sleep(1)
    start = time.monotonic()
    while time.monotonic() - start < duration:
        time.sleep(1)
        pid = _hub_pid(path)
        if pid in processes:
            os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
            processes.pop(pid).join(10)
            spawn()
    stop.set()
    for process in processes.values():
        process.join(15)
    received, noticed, counted = results.get(timeout=60)
    reader.join(5)
    emitted = sum(c.value for c in counters)
    return emitted, received, noticed, counted


def run(args):
    duration = 3 if args.quick else 8
    table = _harness.Table(
        'unix driver: hub recycled every second, 3 processes, a lagging '
        'subscriber (%% of notifications emitted, %ds)' % duration)
    for kill, name, target in ((False, 'hub exits cleanly', 1.0),
                               (True, 'hub killed (SIGKILL)', None)):
        emitted, received, noticed, counted = _run_case(kill, duration)
        table.add('%s: neither received nor in a drop notice' % name,
                  100.0 * (emitted - received - noticed) / emitted, '%')
        uncounted = 100.0 * (emitted - received - counted) / emitted
        table.add('%s: neither received nor counted (gaps, notices)' % name,
                  uncounted, '%',
                  target=None if target is None else '<= %.0f%%' % target,
                  ok=None if target is None else uncounted <= target)
    return [table]
