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

"""Loss of the unix driver against a count kept outside the driver.

``python -m oslo_messaging_ext.tests.functional.unix_loss CASE [options]``
runs one case and prints its figures as one JSON object. It is black-box:
it knows the driver only as oslo.messaging loads it (``driver = unix``) and
the wire format of doc/source/admin/unix.rst, so it runs against any design
of the driver.

This process is a plain pre-fork pool: it imports oslo.messaging, then
forks its workers with ``os.fork()``; each builds its own ``Notifier`` and
emits as fast as it can, each notification's payload naming the worker
and its own count. The truth is what each worker records of itself, after
each ``notify()`` returns, in memory shared with this process (never
through the driver): how many notifications it emitted. In the ``uwsgi``
case the pool is uWSGI instead (see UWSGIPool and unix_loss_app), the
shared memory a file.

Three subscribers read the socket, all connected before any counted worker
starts (a primer process emits until each has received a line, then
exits): a raw reader of the socket (forked, it records per source what it
received and what drop notices said), the subscriber library
(``Subscription(reconnect=True)``, which reports ``missed``) and
``oslo-notify-tail --follow --format json`` (whose stderr says ``missed
N``).

Cases: ``recycle`` (each worker exits with ``os._exit()`` after
``--interval`` seconds and is replaced; their first lifetimes are spread),
``uwsgi`` (uWSGI's workers, recycled every ``--interval`` seconds by
--max-requests), ``kill`` (the hub process is sent SIGKILL every
``--interval`` seconds) and ``stop`` (the hub is sent SIGSTOP for
``--interval`` seconds once, then SIGCONT). The hub is found black-box:
the process that listens on the socket (SO_PEERCRED of a connection to
it), else the process whose command line runs
``oslo_messaging_ext.notify._unix_hub`` with the path.

Figures, per source of the wire's ``sequence.source``, mapped to a worker
by the payloads of its lines, and in total:

* ``owed``: emitted by the workers (the truth);
* ``delivered``: notification lines the raw reader received;
* ``noticed``: what drop notices said was dropped;
* ``silent`` = owed - delivered - noticed.

With ``kill``, each silent loss is split at the kill: lines a worker had
emitted before it (after the last one received of it) are those the dead
hub held or that were on their way to it; lines emitted after it and
before the reader received that worker's first line from the next hub
were emitted while no hub served the reader, which by design holds nothing
for a subscriber that is not connected (they show as a gap of sequence
numbers across the reconnection). ``held_bound`` is what a hub can hold,
from its buffers: ``sock_buffer_size`` plus the kernel's buffers of the
subscriber's connection, plus the kernel's buffer of each process's
ingest connection (see ``_bound_bytes``), in lines of the smallest size
seen.
"""

import argparse
import ctypes
import json
import mmap
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

HUB_MODULE = 'oslo_messaging_ext.notify._unix_hub'
APP = 'oslo_messaging_ext.tests.functional.unix_loss_app'
DROPPED_EVENT_TYPE = 'oslo_messaging_ext.unix.dropped'
EVENT_TYPE = 'loss.test'
END_EVENT_TYPE = 'loss.end'
PRIMER_EVENT_TYPE = 'loss.primer'
SERVICE = 'oslo-messaging-ext-loss'
GROUP = 'oslo_messaging_notifications'
SOCK_BUFFER_SIZE = 4194304
# Worker slots of the shared table: pid, count, alive.
_SLOTS = 4096
_SLOT = struct.Struct('qqq')
# Flags after the slots: stop the workers, stop the primer, reader saw
# the primer, stop the reader.
_FLAGS = _SLOTS * _SLOT.size
(_STOP_WORKERS, _STOP_PRIMER, _READER_READY, _STOP_READER,
 _SLOTS_TAKEN) = range(5)
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_PDEATHSIG = 1
# Bounds of the waits: set-up and the final drain.
START_TIMEOUT = 30.0
# Seconds uWSGI's master has to stop its workers once told to.
STOP_TIMEOUT = 10.0
DRAIN_IDLE = 2.0
DRAIN_TIMEOUT = 30.0
# Seconds between two notifications of the primer and the end marker.
PACE = 0.001


class Shared:
    """The table the workers write their counts to, and a few flags.

    In memory shared with the processes this one forks, or in the file
    ``path`` for the processes of uWSGI.
    """

    SIZE = _FLAGS + 8 * 8

    def __init__(self, path=None):
        self.path = path
        if path is None:
            self.mem = mmap.mmap(-1, self.SIZE)
            return
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < self.SIZE:
                os.ftruncate(fd, self.SIZE)
            self.mem = mmap.mmap(fd, self.SIZE)
        finally:
            os.close(fd)

    def take_slot(self, pid):
        """A new slot for process ``pid`` (file-backed tables only)."""
        import fcntl
        with open(self.path, 'rb') as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            index = self.flag(_SLOTS_TAKEN)
            self.set_flag(_SLOTS_TAKEN, index + 1)
        self.set_slot(index, pid, 0, 1)
        return index

    def slot(self, index):
        return _SLOT.unpack_from(self.mem, index * _SLOT.size)

    def set_slot(self, index, pid, count, alive):
        _SLOT.pack_into(self.mem, index * _SLOT.size, pid, count, alive)

    def count(self, index):
        return struct.unpack_from('q', self.mem,
                                  index * _SLOT.size + 8)[0]

    def set_count(self, index, count):
        struct.pack_into('q', self.mem, index * _SLOT.size + 8, count)

    def counts(self, used):
        return [self.count(i) for i in range(used)]

    def flag(self, which):
        return struct.unpack_from('q', self.mem, _FLAGS + 8 * which)[0]

    def set_flag(self, which, value=1):
        struct.pack_into('q', self.mem, _FLAGS + 8 * which, value)


def _notifier(config_file):
    """A Notifier of the service's configuration, as a service builds it."""
    from oslo_config import cfg
    import oslo_messaging

    conf = cfg.ConfigOpts()
    conf(['--config-file', config_file], project=SERVICE)
    transport = oslo_messaging.get_notification_transport(conf, url='fake:/')
    return oslo_messaging.Notifier(transport, publisher_id='loss.local',
                                   topics=['n'])


def write_config(tmpdir, sock_path):
    path = os.path.join(tmpdir, 'service.conf')
    with open(path, 'w') as f:
        f.write('[%s]\ndriver = unix\nsock_path = %s\n'
                'sock_buffer_size = %d\n'
                % (GROUP, sock_path, SOCK_BUFFER_SIZE))
    return path


def _worker(shared, index, config_file, lifetime, event_type=EVENT_TYPE,
            stop_flag=_STOP_WORKERS, pace=None):
    """Emit until told to stop or ``lifetime`` ends, counting each call.

    ``pace``: seconds between two, for the primer and the end marker,
    which must not fill a buffer (their drops would count as misses).
    """
    code = 0
    try:
        notifier = _notifier(config_file)
        deadline = (time.monotonic() + lifetime) if lifetime else None
        count = 0
        while not shared.flag(stop_flag):
            if deadline is not None and time.monotonic() >= deadline:
                break
            count += 1
            notifier.info({}, event_type, {'w': index, 'n': count})
            shared.set_count(index, count)
            if pace:
                time.sleep(pace)
    except BaseException:  # a worker reports and ends, as a pool's does
        import traceback
        traceback.print_exc()
        code = 1
    finally:
        # As pre-fork pools end their workers: no interpreter shutdown.
        os._exit(code)


def _decode(line):
    return json.loads(line)


class _Reader:
    """The raw reader: what arrived, per source and per connection."""

    def __init__(self, shared, sock_path):
        self.shared = shared
        self.sock_path = sock_path
        self.sources = {}   # source: {w, delivered, first, last}
        self.noticed = 0
        self.noticed_sources = {}
        self.unparsed = 0
        self.connections = []  # {start, end, last: {source: number}}
        self.min_line = None
        self.ended = False

    def run(self, out_path):
        while not self.shared.flag(_STOP_READER) and not self.ended:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.sock_path)
            except OSError:
                sock.close()
                time.sleep(0.005)  # polling for the socket: the scenario
                continue
            self._read(sock)
        with open(out_path, 'w') as out:
            json.dump({'sources': self.sources, 'noticed': self.noticed,
                       'noticed_sources': self.noticed_sources,
                       'unparsed': self.unparsed,
                       'connections': self.connections,
                       'min_line': self.min_line}, out)

    def _read(self, sock):
        conn = {'start': time.monotonic(), 'end': None, 'first': {},
                'last': {}}
        self.connections.append(conn)
        sock.settimeout(0.2)
        rest = b''
        while not self.shared.flag(_STOP_READER) and not self.ended:
            try:
                data = sock.recv(1 << 18)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            *lines, rest = (rest + data).split(b'\n')
            for raw in lines:
                self._line(raw, conn)
        conn['end'] = time.monotonic()
        if rest:
            self.unparsed += 1
        sock.close()

    def _line(self, raw, conn):
        try:
            line = _decode(raw)
        except ValueError:
            self.unparsed += 1
            return
        event_type = line.get('event_type')
        if event_type == DROPPED_EVENT_TYPE:
            payload = line.get('payload') or {}
            self.noticed += payload.get('dropped', 0)
            for source, count in (payload.get('sources') or {}).items():
                self.noticed_sources[source] = (
                    self.noticed_sources.get(source, 0) + count)
            return
        if event_type == PRIMER_EVENT_TYPE:
            self.shared.set_flag(_READER_READY)
            return
        if event_type == END_EVENT_TYPE:
            self.ended = True
            return
        if event_type != EVENT_TYPE:
            return
        size = len(raw) + 1
        self.min_line = size if self.min_line is None else min(
            self.min_line, size)
        sequence = line.get('sequence') or {}
        source = sequence.get('source') or 'worker-%s' % line['payload']['w']
        number = sequence.get('number', line['payload']['n'])
        entry = self.sources.get(source)
        if entry is None:
            entry = self.sources[source] = {
                'w': line['payload']['w'], 'delivered': 0, 'first': number,
                'last': number}
        entry['delivered'] += 1
        entry['last'] = number
        conn['first'].setdefault(source, number)
        conn['last'][source] = number
        # The payload's own count is the truth's index: the driver's
        # number must match it for the mapping to hold.
        if number != line['payload']['n']:
            entry['renumbered'] = True


# The library subscriber, in its own process: prints "ready" at its first
# line, and its counts as JSON when it sees the end marker or SIGTERM.
_LIBRARY_SUBSCRIBER = '''
import json, signal, sys
from oslo_messaging_ext import unix_subscriber
path = sys.argv[1]
sub = unix_subscriber.Subscription(path, reconnect=True, poll_interval=0.01)
signal.signal(signal.SIGTERM, lambda *a: sub.close())
received = ready = 0
for note in sub:
    event_type = note.get('event_type')
    if event_type == %(primer)r and not ready:
        ready = 1
        print('ready', flush=True)
    elif event_type == %(end)r:
        break
    elif event_type == %(event)r:
        received += 1
print(json.dumps({'received': received, 'missed': sub.missed,
                  'dropped': sub.dropped, 'gaps': sub.gaps,
                  'pending': sub.gap_counter.pending,
                  'unattributed': sub.gap_counter.unattributed,
                  'connections': sub.connections}), flush=True)
''' % {'primer': PRIMER_EVENT_TYPE, 'end': END_EVENT_TYPE,
       'event': EVENT_TYPE}


def find_hub(sock_path):
    """The pid of the hub of ``sock_path``, found black-box, or None.

    The process that listens on the socket, as SO_PEERCRED of a connection
    to it tells, if it runs the hub module (until the hub listens itself,
    it names the process that bound the socket for it); else a process
    whose command line runs the hub module with that path. A hub started
    while another holds the lock exits at once: the listener is the one.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(sock_path)
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                struct.calcsize('3i'))
        pid = struct.unpack('3i', creds)[0]
        with open('/proc/%d/cmdline' % pid, 'rb') as f:
            if HUB_MODULE.encode() in f.read().split(b'\0'):
                return pid
    except OSError:
        pass
    finally:
        sock.close()
    for name in os.listdir('/proc'):
        if not name.isdigit():
            continue
        try:
            with open('/proc/%s/cmdline' % name, 'rb') as f:
                argv = f.read().split(b'\0')
            with open('/proc/%s/stat' % name) as f:
                state = f.read().rsplit(')', 1)[1].split()[0]
        except OSError:
            continue
        if (state != 'Z' and any(HUB_MODULE.encode() in a for a in argv) and
                any(sock_path.encode() in a for a in argv)):
            return int(name)
    return None


def _bound_bytes(processes):
    """What one hub can hold, in bytes, by its buffers.

    Each process's ingest connection: its send buffer, which the driver
    asks to be sock_buffer_size (past net.core.wmem_max where allowed) and
    the kernel doubles for its bookkeeping. The subscriber's queue in the
    hub (sock_buffer_size), and the kernel's buffers of its connection.
    """
    def sysctl(name):
        try:
            with open('/proc/sys/net/core/%s' % name) as f:
                return int(f.read())
        except OSError:
            return 212992
    ingest = 2 * max(SOCK_BUFFER_SIZE if os.geteuid() == 0 else
                     min(SOCK_BUFFER_SIZE, sysctl('wmem_max')),
                     sysctl('wmem_default'))
    return (processes * ingest + SOCK_BUFFER_SIZE + sysctl('wmem_default') +
            sysctl('rmem_default'))


class Pool:
    """The pre-fork pool: forks workers, replaces those that end."""

    def __init__(self, shared, config_file, workers, lifetime):
        self.shared = shared
        self.config_file = config_file
        self.size = workers
        self.lifetime = lifetime
        self.used = 0
        self.pids = {}

    def spawn(self, lifetime=None):
        index = self.used
        self.used += 1
        self.shared.set_slot(index, 0, 0, 1)
        pid = os.fork()
        if pid == 0:
            _die_with_parent()
            _worker(self.shared, index, self.config_file,
                    lifetime or self.lifetime)
        self.shared.set_slot(index, pid, 0, 1)
        self.pids[pid] = index

    def start(self):
        for i in range(self.size):
            # Spread the first lifetimes, as a pool's workers drift apart.
            self.spawn(self.lifetime and self.lifetime * (i + 1) / self.size)

    def reap(self, respawn):
        """Reap ended children; replace ended workers if ``respawn``."""
        while True:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            # A hub orphaned by its worker comes to this subreaper too.
            if self.pids.pop(pid, None) is not None and respawn:
                self.spawn()

    def alive(self):
        return len(self.pids)

    def close(self):
        pass


class UWSGIPool:
    """uWSGI's pre-fork pool, recycling each worker every ``lifetime`` s.

    ``--max-requests 1`` with ``--min-worker-lifetime LIFETIME``: uWSGI
    recycles a worker after a request once it has lived that long (it
    never recycles one younger than --min-worker-lifetime, 10 s by
    default). The application (unix_loss_app) is loaded by uWSGI's
    master, as by default; each request emits PER_REQUEST notifications.
    One client thread per worker sends requests until the workers are
    told to stop.
    """

    PER_REQUEST = 100

    def __init__(self, shared, config_file, workers, lifetime, tmpdir):
        self.shared = shared
        self.config_file = config_file
        self.size = workers
        self.lifetime = lifetime
        self.http = os.path.join(tmpdir, 'http.sock')
        self.log = os.path.join(tmpdir, 'uwsgi.log')
        self.proc = None
        self.threads = []

    @staticmethod
    def program():
        here = os.path.dirname(sys.executable)
        return shutil.which('uwsgi', path=here + os.pathsep +
                            os.environ.get('PATH', ''))

    @property
    def used(self):
        return self.shared.flag(_SLOTS_TAKEN)

    def start(self):
        import threading
        env = dict(os.environ, UNIX_LOSS_CONF=self.config_file,
                   UNIX_LOSS_TRUTH=self.shared.path,
                   UNIX_LOSS_PER_REQUEST=str(self.PER_REQUEST))
        with open(self.log, 'w') as log:
            self.proc = subprocess.Popen(
                [self.program(), '--master', '--processes', str(self.size),
                 '--enable-threads', '--http-socket', self.http, '--home',
                 sys.prefix, '--module', APP + ':application',
                 '--need-app', '--die-on-term', '--disable-logging',
                 '--max-requests', '1', '--min-worker-lifetime',
                 str(self.lifetime)],
                env=env, stdout=log, stderr=log, start_new_session=True,
                preexec_fn=_die_with_parent)
        _wait_for(lambda: os.path.exists(self.http), START_TIMEOUT,
                  'uWSGI to listen')
        for _ in range(self.size):
            thread = threading.Thread(target=self._client, daemon=True)
            thread.start()
            self.threads.append(thread)

    def _client(self):
        while not self.shared.flag(_STOP_WORKERS):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(START_TIMEOUT)
            try:
                sock.connect(self.http)
                sock.sendall(b'GET / HTTP/1.0\r\n\r\n')
                while sock.recv(65536):
                    pass
            except OSError:
                time.sleep(0.01)  # uWSGI is busy: the client's pace
            finally:
                sock.close()

    def reap(self, respawn):
        return None  # uWSGI's master respawns and reaps its workers

    def alive(self):
        return sum(1 for thread in self.threads if thread.is_alive())

    def close(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            # uWSGI 2.0.31's master, told to stop while it waits to
            # respawn a worker ("respawning too fast"), respawns it after
            # killing the others and then waits for it forever: its session
            # goes, workers included (the hub has its own).
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _spawn_fn(shared, func, *args):
    pid = os.fork()
    if pid == 0:
        _die_with_parent()
        code = 0
        try:
            func(*args)
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        os._exit(code)
    return pid


# oslo-notify-tail, which dumps its stacks on SIGUSR1.
_TAIL = """import faulthandler, signal, sys
faulthandler.register(signal.SIGUSR1)
from oslo_messaging_ext.cmd import tail
sys.exit(tail.main(sys.argv[1:]))
"""


def _die_with_parent():
    """In a child: SIGTERM when this scenario ends, however it ends.

    The hub, in a session of its own, is left to end as it does. SIGINT
    ends the tail: not ignored, as a shell's background job inherits it.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_child(pid, timeout=START_TIMEOUT):
    """Reap child ``pid``, killing it if it has not ended in ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return True
        except ChildProcessError:
            return True
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return False


def _readline(proc, timeout):
    """A line of ``proc``'s stdout, or '' if none comes in ``timeout``."""
    import select
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else ''


def _wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError('timed out waiting for %s' % what)
        time.sleep(0.01)


def _tail_missed(stderr_text):
    import re
    match = re.search(r'missed (\d+) notifications \(', stderr_text)
    return int(match.group(1)) if match else 0


def run(case, duration, interval, workers, tmpdir=None, min_recycles=0):
    """Run one case; return its figures (see the module's docstring).

    ``min_recycles``: run past ``duration`` (up to three times it) until
    that many workers were replaced, as a loaded host starts workers late.
    """
    import oslo_messaging  # noqa: F401 -- a pre-fork pool loads it first

    own_tmp = tmpdir is None
    tmpdir = tmpdir or tempfile.mkdtemp(prefix='unix-loss-')
    sock_path = os.path.join(tmpdir, 'n.sock')
    config_file = write_config(tmpdir, sock_path)
    reader_out = os.path.join(tmpdir, 'reader.json')
    tail_out = os.path.join(tmpdir, 'tail.out')
    tail_err = os.path.join(tmpdir, 'tail.err')
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    # uWSGI's workers are not forked by this process: a file holds it.
    shared = Shared(os.path.join(tmpdir, 'truth') if case == 'uwsgi'
                    else None)
    reader_pid = _spawn_fn(shared, _Reader(shared, sock_path).run,
                           reader_out)
    library = subprocess.Popen(
        [sys.executable, '-c', _LIBRARY_SUBSCRIBER, sock_path],
        stdout=subprocess.PIPE, text=True, preexec_fn=_die_with_parent)
    tail = subprocess.Popen(
        [sys.executable, '-c', _TAIL, '--follow', '--format', 'json',
         sock_path],
        stdout=open(tail_out, 'w'), stderr=open(tail_err, 'w'),
        preexec_fn=_die_with_parent)
    if case == 'uwsgi':
        pool = UWSGIPool(shared, config_file, workers,
                         max(1, int(interval)), tmpdir)
    else:
        pool = Pool(shared, config_file, workers,
                    interval if case == 'recycle' else None)
    result = {'case': case, 'duration': duration, 'interval': interval,
              'workers': workers, 'signals': []}
    try:
        # The primer emits until every subscriber has received from it,
        # so that every counted notification is owed to all three, and
        # until a worker has emitted, so that the hub never leaves between
        # (uWSGI's master may load the service past the hub's grace).
        primer = _spawn_fn(shared, _worker, shared, _SLOTS - 1, config_file,
                           None, PRIMER_EVENT_TYPE, _STOP_PRIMER, PACE)
        _wait_for(lambda: shared.flag(_READER_READY), START_TIMEOUT,
                  'the raw reader')
        if _readline(library, START_TIMEOUT).strip() != 'ready':
            raise RuntimeError('the library subscriber failed')
        _wait_for(lambda: PRIMER_EVENT_TYPE in _read(tail_out),
                  START_TIMEOUT, 'oslo-notify-tail')
        start = time.monotonic()
        pool.start()
        _wait_for(lambda: any(shared.counts(pool.used)), START_TIMEOUT,
                  'a worker to emit')
        shared.set_flag(_STOP_PRIMER)
        _wait_child(primer)
        next_signal = start + interval
        stopped = None
        longest = 3 * duration

        def running():
            elapsed = time.monotonic() - start
            return elapsed < duration or (
                pool.used < workers + min_recycles and elapsed < longest)
        while running():
            pool.reap(respawn=True)
            now = time.monotonic()
            if case == 'kill' and now >= next_signal:
                next_signal += interval
                hub = find_hub(sock_path)
                if hub:
                    before = shared.counts(pool.used)
                    os.kill(hub, signal.SIGKILL)
                    result['signals'].append(
                        {'at': time.monotonic(), 'pid': hub,
                         'counts': before, 'alive': pool.alive()})
            elif case == 'stop' and stopped is None and now >= start + 1:
                hub = find_hub(sock_path)
                if hub:
                    os.kill(hub, signal.SIGSTOP)
                    stopped = (hub, now)
                    result['signals'].append({'at': now, 'pid': hub})
            elif stopped and now >= stopped[1] + interval:
                os.kill(stopped[0], signal.SIGCONT)
                stopped = False
            time.sleep(0.01)  # the pool's own loop: the scenario's cadence
        if stopped:
            os.kill(stopped[0], signal.SIGCONT)
        shared.set_flag(_STOP_WORKERS)
        _wait_for(lambda: pool.reap(respawn=False) or not pool.alive(),
                  START_TIMEOUT, 'the workers to end')
        pool.close()
        owed = shared.counts(pool.used)
        result.update(_drain_and_end(shared, config_file, library, tail,
                                     tail_out, tail_err, reader_pid,
                                     reader_out, sum(owed)))
        result['hub_exit'] = _hub_exit(sock_path)
    finally:
        shared.set_flag(_STOP_WORKERS)
        shared.set_flag(_STOP_READER)
        pool.close()
        for proc in (library, tail):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    result.update(_figures(case, owed, result))
    if own_tmp:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return result


def _read(path):
    with open(path) as f:
        return f.read()


def _drain_and_end(shared, config_file, library, tail, tail_out, tail_err,
                   reader_pid, reader_out, owed):
    """Wait until the subscribers stop receiving, then end them."""
    # Each subscriber stops at the end marker, which a last process emits
    # once the tail's output (a proxy for all three) stops growing: what
    # the pool's hub still held is delivered by then.
    last, idle_since = -1, time.monotonic()
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while time.monotonic() < deadline:
        size = os.path.getsize(tail_out)
        if size != last:
            last, idle_since = size, time.monotonic()
        elif time.monotonic() - idle_since > DRAIN_IDLE:
            break
        time.sleep(0.05)
    shared.set_flag(_STOP_PRIMER, 0)
    closer = _spawn_fn(shared, _worker, shared, _SLOTS - 2, config_file,
                       None, END_EVENT_TYPE, _STOP_PRIMER, PACE)
    figures = {}
    try:
        out, _ = library.communicate(timeout=DRAIN_TIMEOUT)
        figures['library'] = json.loads(out.strip().splitlines()[-1])
        _wait_for(lambda: END_EVENT_TYPE in _read(tail_out), DRAIN_TIMEOUT,
                  'the tail to see the end')
        figures['tail_sigints'] = _interrupt(tail, tail_err)
        if not _wait_child(reader_pid, DRAIN_TIMEOUT):
            raise RuntimeError('the raw reader never saw the end marker')
    finally:
        shared.set_flag(_STOP_PRIMER)
        _wait_child(closer)
    with open(tail_out) as f:
        tail_lines = [line for line in f if '"%s"' % EVENT_TYPE in line]
    figures['tail'] = {'received': len(tail_lines),
                       'sigints': figures.pop('tail_sigints'),
                       'missed': _tail_missed(_read(tail_err)),
                       'said': [line for line in _read(tail_err).splitlines()
                                if 'Eventlet' not in line][-8:]}
    if figures['tail']['sigints'] > 1:
        figures['tail']['stacks'] = _read(tail_err)[-3000:]
    with open(reader_out) as f:
        figures['reader'] = json.load(f)
    return figures


def _interrupt(tail, tail_err):
    """SIGINT until the tail ends (3 at most); how many it took.

    Once in a CI run, under coverage, the tail outlived a first SIGINT
    by 30 s: past 10 s, its stacks go to its stderr (see "said").
    """
    for sigints in range(1, 4):
        tail.send_signal(signal.SIGINT)
        try:
            tail.wait(10 if sigints > 1 else DRAIN_TIMEOUT)
            return sigints
        except subprocess.TimeoutExpired:
            tail.send_signal(signal.SIGUSR1)
    tail.kill()
    raise RuntimeError('the tail did not end on SIGINT: %s'
                       % _read(tail_err)[-3000:])


def _hub_exit(sock_path, timeout=30.0):
    """Seconds the hub took to exit once no worker was left, or None."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if find_hub(sock_path) is None:
            return round(time.monotonic() - start, 2)
        time.sleep(0.05)
    hub = find_hub(sock_path)
    if hub:
        os.kill(hub, signal.SIGKILL)
    return None


def _figures(case, owed, result):
    reader = result.pop('reader')
    by_worker = {}
    for source, entry in reader['sources'].items():
        by_worker.setdefault(entry['w'], []).append(source)
    delivered = sum(e['delivered'] for e in reader['sources'].values())
    total_owed = sum(owed)
    noticed = reader['noticed']
    attributed = sum(reader['noticed_sources'].values())
    figures = {'owed': total_owed, 'delivered': delivered,
               'noticed': noticed,
               'noticed_unattributed': noticed - attributed,
               'silent': total_owed - delivered - noticed,
               'sources': len(reader['sources']),
               'workers_started': len(owed),
               'workers_unheard': sum(1 for w, n in enumerate(owed)
                                      if n and w not in by_worker),
               'unparsed': reader['unparsed'],
               'reconnections': len(reader['connections']) - 1,
               'renumbered': sum(1 for e in reader['sources'].values()
                                 if e.get('renumbered'))}
    # Of what was not delivered, what came after the last line received
    # of its worker: a loss that no later line can reveal as a gap.
    figures['undelivered_after_last_line'] = sum(
        max(0, count - reader['sources'][by_worker[w][-1]]['last'])
        if w in by_worker else count for w, count in enumerate(owed))
    # What each subscriber missed by its own count, against the truth
    # of what it received.
    for name in ('library', 'tail'):
        sub = result[name]
        sub['truth_missed'] = total_owed - sub['received']
    if case == 'kill':
        figures.update(_kill_split(owed, reader, result['signals']))
        figures['silent_otherwise'] = (figures['silent'] -
                                       figures['silent_held_by_dead_hubs'] -
                                       figures['silent_emitted_while_away'])
    return figures


def _kill_split(owed, reader, kills):
    """Split the silent losses at each kill (see the module's docstring)."""
    source_of = {e['w']: s for s, e in reader['sources'].items()}
    connections = reader['connections']
    held = [0] * len(owed)
    away = [0] * len(owed)
    bound = 0
    for kill in kills:
        before = [c for c in connections if c['start'] <= kill['at']]
        after = [c for c in connections if c['start'] > kill['at']]
        for worker, count in enumerate(kill.pop('counts')):
            source = source_of.get(worker)
            last = max([c['last'].get(source, 0) for c in before] or [0])
            nxt = [c['first'][source] for c in after
                   if source in c['first']]
            first_after = min(nxt) if nxt else owed[worker] + 1
            held[worker] += max(0, count - last)
            away[worker] += max(0, first_after - 1 - max(count, last))
        kill['bound_lines'] = (_bound_bytes(kill['alive']) //
                               (reader['min_line'] or 1))
        bound += kill['bound_lines']
    # Per worker, its silent loss is first what the dead hubs may have
    # held of it, then what it emitted while the reader was away.
    silent_held = silent_away = 0
    for worker, count in enumerate(owed):
        entry = reader['sources'].get(source_of.get(worker), {})
        silent = (count - entry.get('delivered', 0) -
                  reader['noticed_sources'].get(source_of.get(worker), 0))
        in_held = max(0, min(silent, held[worker]))
        silent_held += in_held
        silent_away += max(0, min(silent - in_held, away[worker]))
    return {'silent_held_by_dead_hubs': silent_held,
            'silent_emitted_while_away': silent_away,
            'held_bound': bound}


def main(argv=None):
    parser = argparse.ArgumentParser(prog='unix_loss')
    parser.add_argument('case', choices=('recycle', 'kill', 'stop', 'uwsgi'))
    parser.add_argument('--duration', type=float, default=10.0)
    parser.add_argument('--interval', type=float, default=1.0)
    parser.add_argument('--workers', type=int, default=4)
    parser.add_argument('--min-recycles', type=int, default=0,
                        help='run on (up to 3 x duration) until that many '
                        'workers were replaced')
    args = parser.parse_args(argv)
    print(json.dumps(run(args.case, args.duration, args.interval,
                         args.workers, min_recycles=args.min_recycles)))
    return 0


if __name__ == '__main__':
    sys.exit(main())
