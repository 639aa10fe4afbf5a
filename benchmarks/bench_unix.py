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
driver. The log driver writes to a real handler (a file, /dev/null) at
INFO, as a service that uses it would.

The cases run twice, each time in a process of its own: as the default
install has it (orjson hidden from the service, its hub and its
subscribers, by an ``orjson`` module on PYTHONPATH that refuses to
import) and, when orjson is installed, with it. Each table says which.

Beside noop and log, every case measures a floor in the same run: what
any driver must do at least for one notification with a subscriber,
``Notifier.info()`` through noop plus encoding the envelope with the same
encoder plus one non-blocking send on a SOCK_SEQPACKET socket that
another process drains. Where a target is below that floor, the driver
must come within 10 % of it instead; the stuck subscriber's p99 is held
to the floor's p99, measured in the same comparison.

CPU per notification is the service process's (all its threads,
``time.process_time()``) and the hub's (utime + stime of its process),
over a run of notifications with one subscriber. Subscribers are
separate processes, as they are in production.

The soak table runs 4 worker processes flat out with 32 subscribers, 16
of which never read, for ``--duration`` seconds (60 by default, 3 with
``--quick``), and reports the hub's RSS and open files during the run and
once the subscribers left.
"""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

from benchmarks import _harness

GROUP = 'oslo_messaging_notifications'
HUB_MODULE = 'oslo_messaging_ext.notify._unix_hub'
US = 1e6

# A subscriber process: decodes every notification and reports when it
# has them all or sees the end marker (end to end).
_SUBSCRIBER = textwrap.dedent('''
    import json, sys, time
    from oslo_messaging_ext import unix_subscriber
    path, expected = sys.argv[1], int(sys.argv[2])
    received = 0
    print('ready', flush=True)
    subscription = unix_subscriber.Subscription(path)
    cpu = time.process_time()
    for notification in subscription:
        event_type = notification['event_type']
        if event_type == 'bench.end':
            break
        if event_type != unix_subscriber.DROPPED_EVENT_TYPE:
            received += 1
            if received + subscription.dropped >= expected:
                break
    print(json.dumps({'received': received,
                      'dropped': subscription.dropped,
                      'missed': subscription.missed,
                      'cpu': time.process_time() - cpu,
                      'done': time.monotonic()}), flush=True)
''')
# Reads and discards: ``count`` stream connections to ``path`` (or, with
# ``-``, the SOCK_SEQPACKET socket inherited as file descriptor ``count``).
_DISCARDER = textwrap.dedent('''
    import os, select, socket, sys
    path, count = sys.argv[1], int(sys.argv[2])
    if path == '-':
        socks = [socket.socket(fileno=count)]
    else:
        socks = []
        for _ in range(count):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(path)
            socks.append(sock)
    print('ready', flush=True)
    poller = select.poll()
    for sock in socks:
        poller.register(sock, select.POLLIN)
    by_fd = {sock.fileno(): sock for sock in socks}
    while by_fd:
        for fd, _ in poller.poll():
            if not by_fd[fd].recv(1 << 20):
                poller.unregister(fd)
                del by_fd[fd]
''')
_HIDE_ORJSON = ('raise ImportError("hidden by the benchmark: the default '
                'install has no orjson")\n')


def _encoder_name():
    try:
        import orjson  # noqa: F401
    except ImportError:
        return 'stdlib json'
    return 'orjson'


def _hub_cpu(pid):
    """Seconds of CPU the hub process used, or None.

    None too when the hub runs in this process (the first design), whose
    CPU time counts it already.
    """
    if pid == os.getpid():
        return None
    try:
        with open('/proc/%d/stat' % pid) as f:
            fields = f.read().rsplit(')', 1)[1].split()
    except (OSError, TypeError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def _hub_resources(pid):
    """(RSS in KiB, open files) of the hub, or (None, None)."""
    try:
        with open('/proc/%d/status' % pid) as f:
            rss = next(int(line.split()[1]) for line in f
                       if line.startswith('VmRSS:'))
        return rss, len(os.listdir('/proc/%d/fd' % pid))
    except (OSError, StopIteration, TypeError):
        return None, None


def _find_hub(path):
    from oslo_messaging_ext.tests.functional import unix_loss
    return unix_loss.find_hub(path)


def _wait(predicate, timeout=30.0, what='benchmark set-up'):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError('%s timed out' % what)
        time.sleep(0.005)


def _spawn(script, *args, **kwargs):
    proc = subprocess.Popen([sys.executable, '-c', script] + list(args),
                            stdout=subprocess.PIPE, text=True, **kwargs)
    if proc.stdout.readline().strip() != 'ready':
        raise RuntimeError('a benchmark subscriber failed to start')
    return proc


def _stop(proc):
    proc.kill()
    proc.wait()


class _Service:
    """The measuring process's notifiers, the floor and the hub."""

    def __init__(self, tmpdir):
        from oslo_config import cfg
        import oslo_messaging

        from oslo_messaging_ext.notify import _impl_unix
        self.sock_path = os.path.join(tmpdir, 'notifications.sock')
        self.payload = _harness.glance_payload()
        self.noop, _ = _harness.make_notifier('noop')
        logger = logging.getLogger('oslo.messaging.notification')
        logger.addHandler(logging.FileHandler(os.devnull))
        logger.setLevel(logging.INFO)
        logger.propagate = False
        self.log, _ = _harness.make_notifier('log')
        conf = cfg.ConfigOpts()
        conf([], project='oslo-messaging-ext-bench')
        _impl_unix.register_opts(conf)
        conf.set_override('sock_path', self.sock_path, group=GROUP)
        transport = oslo_messaging.get_notification_transport(conf,
                                                              url='fake:/')
        self.unix = oslo_messaging.Notifier(
            transport, publisher_id='image.localhost', driver='unix',
            topics=['notifications'])
        # A second driver of the same path, for its subscriber count only.
        self.probe = _impl_unix.UnixSocketDriver(conf, ['notifications'],
                                                 transport)
        self._floor_sock, self._floor_reader = self._floor()

    def _floor(self):
        ours, theirs = socket.socketpair(socket.AF_UNIX,
                                         socket.SOCK_SEQPACKET)
        reader = _spawn(_DISCARDER, '-', str(theirs.fileno()),
                        pass_fds=(theirs.fileno(),))
        theirs.close()
        try:
            import orjson
            dumps = orjson.dumps
        except ImportError:
            encoder = json.JSONEncoder(separators=(',', ':'),
                                       check_circular=False)

            def dumps(message):
                return encoder.encode(message).encode('ascii')
        envelope = {'message_id': '6f9d2b1e-2c57-4bb4-9d38-1f6b8a7c1d22',
                    'publisher_id': 'image.localhost',
                    'event_type': 'image.upload', 'priority': 'INFO',
                    'payload': self.payload,
                    'timestamp': '2026-11-22 02:40:11.123456',
                    'sequence': {'source': '4242-9f1c03d2a7b1',
                                 'number': 1}}
        send, flags = ours.send, socket.MSG_DONTWAIT
        noop, payload = self.noop, self.payload

        def floor():
            noop.info({}, 'image.upload', payload)
            try:
                send(dumps(envelope), flags)
            except BlockingIOError:
                pass
        self.floor_call = floor
        return ours, reader

    def call(self, name):
        notifier = getattr(self, name)
        payload = self.payload
        return lambda: notifier.info({}, 'image.upload', payload)

    def calls(self, *names):
        funcs = {name: self.call(name) for name in names}
        funcs['floor'] = self.floor_call
        return funcs

    def subscribers(self, count):
        _wait(lambda: self.probe.subscribers() == count,
              what='waiting for %d subscriber(s)' % count)

    def cpu_per_call(self, count):
        """Service and hub CPU seconds per unix notification."""
        hub = _find_hub(self.sock_path)
        emit = self.call('unix')
        hub_before = _hub_cpu(hub)
        before = time.process_time()
        for _ in range(count):
            emit()
        service = (time.process_time() - before) / count
        hub_after = _hub_cpu(hub)
        if hub_before is None or hub_after is None:
            return service, None
        return service, (hub_after - hub_before) / count

    def close(self):
        self._floor_sock.close()
        self._floor_reader.wait()
        self.probe.close()


def measure(quick):
    """Every per-call case, in this process; a dict of figures."""
    count = 4000 if quick else 40000
    end_to_end = 20000 if quick else 200000
    tmpdir = tempfile.mkdtemp(prefix='bench-unix-')
    service = _Service(tmpdir)
    figures = {'encoder': _encoder_name()}
    try:
        service.subscribers(0)
        measured = _harness.compare(service.calls('noop', 'log', 'unix'),
                                    'noop', count)
        figures['noop'] = measured.median['noop']
        figures['log'] = measured.ratio('log')
        figures['no subscriber'] = measured.ratio('unix')

        discarder = _spawn(_DISCARDER, service.sock_path, '1')
        try:
            service.subscribers(1)
            measured = _harness.compare(
                service.calls('noop', 'log', 'unix'), 'noop', count)
            figures['one subscriber'] = measured.ratio('unix')
            figures['floor'] = measured.ratio('floor')
            figures['faster than log'] = measured.ratio('log', 'unix')
            figures['cpu'] = service.cpu_per_call(count)
        finally:
            _stop(discarder)

        service.subscribers(0)
        stuck = socket.socket(socket.AF_UNIX)
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect(service.sock_path)
        try:
            service.subscribers(1)
            # Fill its buffers first: the case is the steady state of a
            # subscriber that stopped reading long ago.
            emit = service.call('unix')
            for _ in range(10000):
                emit()
            measured = _harness.compare(service.calls('noop', 'unix'),
                                        'noop', count)
        finally:
            stuck.close()
        figures['stuck p99'] = measured.ratio('unix', p99=True)
        figures['floor p99'] = measured.ratio('floor', p99=True)
        figures['noop p99'] = measured.p99['noop']

        service.subscribers(0)
        figures.update(_end_to_end(service, end_to_end))
    finally:
        service.close()
        shutil.rmtree(tmpdir, ignore_errors=True)
    return figures


def _loop_rate(func, count):
    start = time.monotonic()
    for _ in range(count):
        func()
    return count / (time.monotonic() - start)


def _end_to_end(service, count):
    floor_rate = _loop_rate(service.floor_call, count)
    subscriber = _spawn(_SUBSCRIBER, service.sock_path, str(count))
    service.subscribers(1)
    hub = _find_hub(service.sock_path)
    hub_before = _hub_cpu(hub)
    cpu_before = time.process_time()
    emit = service.call('unix')
    start = time.monotonic()
    for _ in range(count):
        emit()
    emitted = time.monotonic()
    cpu = (time.process_time() - cpu_before) / count
    # If some were lost silently, the subscriber stops at this marker.
    deadline = emitted + 60
    while subscriber.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
        service.unix.info({}, 'bench.end', {})
    out, _ = subscriber.communicate(timeout=60)
    hub_after = _hub_cpu(hub)
    result = json.loads(out.strip().splitlines()[-1])
    return {'e2e rate': result['received'] / (result['done'] - start),
            'e2e notify rate': count / (emitted - start),
            'e2e floor rate': floor_rate,
            'e2e received': result['received'],
            'e2e dropped': result['dropped'],
            'e2e silent': count - result['received'] - result['dropped'],
            'e2e count': count,
            'e2e cpu': (cpu, None if hub_before is None or hub_after is None
                        else (hub_after - hub_before) / count),
            'e2e subscriber cpu': result['cpu'] / max(result['received'], 1)}


def soak(duration):
    """Hub RSS and open files: 4 workers, 32 subscribers, 16 stuck."""
    from oslo_messaging_ext.tests.functional import unix_loss

    tmpdir = tempfile.mkdtemp(prefix='bench-unix-soak-')
    sock_path = os.path.join(tmpdir, 'n.sock')
    shared = unix_loss.Shared()
    pool = unix_loss.Pool(shared, unix_loss.write_config(tmpdir, sock_path),
                          4, None)
    readers, stuck = [], []
    figures = {}
    try:
        pool.start()
        # Not the socket file: a starting hub's starter binds it first.
        _wait(lambda: _find_hub(sock_path) is not None,
              what='the hub to start')
        hub = _find_hub(sock_path)
        figures['before'] = _hub_resources(hub)
        figures['hub'] = hub
        for _ in range(2):
            readers.append(_spawn(_DISCARDER, sock_path, '8'))
        for _ in range(16):
            sock = socket.socket(socket.AF_UNIX)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(sock_path)
            stuck.append(sock)
        peak_rss = peak_files = 0
        end = time.monotonic() + duration
        while time.monotonic() < end:
            rss, files = _hub_resources(hub)
            peak_rss, peak_files = max(peak_rss, rss or 0), max(
                peak_files, files or 0)
            time.sleep(0.5)  # the soak's sampling cadence
        figures['during'] = (peak_rss, peak_files)
        figures['end'] = _hub_resources(hub)
        if figures['end'][1] is None:
            raise RuntimeError('the hub (pid %s) died during the soak' % hub)
        for sock in stuck:
            sock.close()
        for reader in readers:
            _stop(reader)
        # Each subscriber is one file of the hub: wait until all 32 went.
        gone = figures['end'][1] - 32
        try:
            _wait(lambda: (_hub_resources(hub)[1] or 0) <= gone,
                  what='the hub to let the subscribers go')
        except RuntimeError:
            figures['not released'] = True
        figures['after'] = _hub_resources(hub)
        figures['emitted'] = sum(shared.counts(pool.used))
    finally:
        shared.set_flag(unix_loss._STOP_WORKERS)
        _wait(lambda: pool.reap(respawn=False) or not pool.alive(),
              what='the workers to end')
        for sock in stuck:
            sock.close()
        for reader in readers:
            if reader.poll() is None:
                _stop(reader)
        shutil.rmtree(tmpdir, ignore_errors=True)
    return figures


def _child(mode, quick, hide_dir):
    env = dict(os.environ)
    if mode == 'default':
        env['PYTHONPATH'] = os.pathsep.join(
            p for p in (hide_dir, env.get('PYTHONPATH')) if p)
    proc = subprocess.run(
        [sys.executable, '-m', 'benchmarks.bench_unix', 'measure'] +
        (['--quick'] if quick else []), env=env, capture_output=True,
        text=True, timeout=3600)
    if proc.returncode:
        raise RuntimeError('the %s case failed: %s'
                           % (mode, proc.stderr[-3000:]))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cases_table(mode, figures):
    orjson = figures['encoder'] == 'orjson'
    table = _harness.Table(
        'unix driver, %s (encoder: %s): Notifier.info() with the glance '
        'image.upload payload, as ratios to noop in the same run'
        % ('with orjson' if mode == 'orjson' else 'default install',
           figures['encoder']))
    floor = figures['floor']
    table.add('noop (reference)', figures['noop'] * US, 'us')
    table.add('log', figures['log'], 'x noop', ratio=figures['log'])
    ratio = figures['no subscriber']
    table.add('no subscriber', ratio, 'x noop', ratio=ratio,
              target='<= 1.1x noop', ok=ratio <= 1.1)
    table.add('floor: noop + encode + send', floor, 'x noop', ratio=floor)
    ratio = figures['one subscriber']
    limit = 1.5 if orjson else 2.0
    table.add('1 subscriber', ratio, 'x noop', ratio=ratio,
              target='<= %.1fx noop, or <= 1.1x floor' % limit,
              ok=ratio <= limit or ratio <= 1.1 * floor)
    table.add('1 subscriber, times faster than log',
              figures['faster than log'], 'x')
    service, hub = figures['cpu']
    table.add('1 subscriber, service CPU per notification (all threads)',
              service * US, 'us')
    if hub is not None:
        table.add('1 subscriber, hub CPU per notification', hub * US, 'us')
    ratio, floor_p99 = figures['stuck p99'], figures['floor p99']
    table.add('floor p99: noop + encode + send', floor_p99, 'x noop p99',
              ratio=floor_p99)
    table.add('stuck subscriber, p99 (noop p99: %.1f us)'
              % (figures['noop p99'] * US), ratio, 'x noop p99',
              ratio=ratio, target='<= 1.5x noop p99, or <= 1.1x floor p99',
              ok=ratio <= 1.5 or ratio <= 1.1 * floor_p99)
    target = 100000 if orjson else 50000
    rate, floor_rate = figures['e2e rate'], figures['e2e floor rate']
    silent = figures['e2e silent']
    table.add('end to end, %d notifications (%d dropped and reported, %d '
              'silent)' % (figures['e2e count'], figures['e2e dropped'],
                           silent),
              rate, 'notifications/s',
              target='>= %d/s, or >= floor/1.1; 0 silent' % target,
              ok=silent == 0 and (rate >= target or
                                  rate >= floor_rate / 1.1))
    table.add('  of which notify() alone', figures['e2e notify rate'],
              'notifications/s')
    table.add('  floor: the same loop, noop + encode + send', floor_rate,
              'notifications/s', ratio=rate / floor_rate)
    service, hub = figures['e2e cpu']
    table.add('  service CPU per notification (all threads)', service * US,
              'us')
    subscriber = figures['e2e subscriber cpu']
    table.add('  subscriber CPU per notification it got', subscriber * US,
              'us')
    if hub is not None:  # and what the machine's cores allow at the target
        table.add('  hub CPU per notification', hub * US, 'us')
        table.add('  the three processes, CPU per notification (%d cores '
                  'at %d/s allow %.1f us)' % (
                      os.cpu_count(), target, os.cpu_count() * 1e6 / target),
                  (service + hub + subscriber) * US, 'us')
    return table


def _soak_table(duration, figures):
    table = _harness.Table(
        'unix hub: 4 workers flat out (%d notifications), 32 subscribers of '
        'which 16 never read, %d s' % (figures['emitted'], duration))
    for when, label in (('before', 'before the subscribers'),
                        ('during', 'peak while they are connected'),
                        ('end', 'at the end of the run'),
                        ('after', 'once they left')):
        rss, files = figures[when]
        table.add('hub RSS, %s' % label, (rss or 0) / 1024.0, 'MiB')
        table.add('hub open files, %s' % label, files or 0, 'files')
    if figures.get('not released'):
        table.add('the hub kept files of subscribers that left', 1, '',
                  target='0', ok=False)
    return table


def run(args):
    # Measured in children: one hides orjson, each starts its own hub.
    hide_dir = tempfile.mkdtemp(prefix='bench-unix-no-orjson-')
    with open(os.path.join(hide_dir, 'orjson.py'), 'w') as f:
        f.write(_HIDE_ORJSON)
    tables = []
    try:
        modes = ['default']
        if _encoder_name() == 'orjson':
            modes.append('orjson')
        for mode in modes:
            tables.append(_cases_table(mode, _child(mode, args.quick,
                                                    hide_dir)))
        if len(modes) == 1:
            tables[0].title += ' (orjson is not installed: its targets ' \
                               'were not measured)'
    finally:
        shutil.rmtree(hide_dir, ignore_errors=True)
    duration = getattr(args, 'duration', None) or (3 if args.quick else 60)
    tables.append(_soak_table(duration, soak(duration)))
    return tables


def main(argv):
    if argv[:1] == ['measure']:
        print(json.dumps(measure('--quick' in argv)))
        return 0
    return 2


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
