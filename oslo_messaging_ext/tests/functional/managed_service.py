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

"""A service with the unix driver, run by real process managers.

Configured by the environment, as a process manager passes nothing else
through: ``UNIX_MATRIX_SOCK`` (the driver's sock_path; unset, the service
runs without the driver, for a baseline), ``UNIX_MATRIX_AT_LOAD`` (emit a
notification while the application loads, as glance does when it loads
its stores).

* ``application``: a WSGI application for uWSGI. ``GET /notify/<seq>``
  emits one notification and answers, in JSON, the worker's pid, whether
  the worker knew of a subscriber when it emitted (only then could it be
  delivered), and whether its relay is its own (made, or adopted, in
  this process).
* ``python -m ... oslo-service WORKERS``: oslo.service's ProcessLauncher
  with WORKERS workers (nova-conductor style: the notifier is made in the
  parent, before the fork); ``cotyledon WORKERS``: cotyledon's
  ServiceManager (ceilometer style: made in each worker). Each worker
  emits a notification every 20 ms, numbered per process, until the file
  ``UNIX_MATRIX_STATE + '.stop'`` exists or it is stopped; it then writes
  the last number it emitted to ``UNIX_MATRIX_STATE + '.<pid>'``, so that
  a test can tell what was emitted.
"""

import json
import os
import sys
import threading
import time

from oslo_config import cfg
import oslo_messaging

from oslo_messaging_ext.notify import _impl_unix

GROUP = 'oslo_messaging_notifications'
SOCK_ENV = 'UNIX_MATRIX_SOCK'
AT_LOAD_ENV = 'UNIX_MATRIX_AT_LOAD'
# Where workers find their stop file and leave their report.
STATE_ENV = 'UNIX_MATRIX_STATE'
# A worker's notifications, one every this many seconds.
_INTERVAL = 0.02


def make_notifier():
    """The service's notifier, and its unix driver (None without one)."""
    conf = cfg.ConfigOpts()
    conf([], project='unix-matrix')
    path = os.environ.get(SOCK_ENV)
    transport = oslo_messaging.get_notification_transport(conf,
                                                          url='fake:/')
    if not path:
        return oslo_messaging.Notifier(transport, driver='noop'), None
    _impl_unix.register_opts(conf)
    conf.set_override('sock_path', path, group=GROUP)
    notifier = oslo_messaging.Notifier(transport, driver='unix',
                                       publisher_id='image.matrix')
    # No extension: the driver failed to load (oslo.messaging logged why).
    loaded = notifier._driver_mgr.extensions
    return notifier, loaded[0].obj if loaded else None


def _threads():
    """The threads of this process, all of them (native or not)."""
    return len(os.listdir('/proc/self/task'))


def _emit(notifier, worker, seq):
    notifier.info({}, 'image.upload', {'worker': worker, 'seq': seq,
                                       'tag': 'matrix'})


# -- uWSGI --------------------------------------------------------------------

if 'uwsgi' in sys.modules:
    _notifier, _driver = make_notifier()
    if os.environ.get(AT_LOAD_ENV):
        # In uWSGI's master without --lazy-apps.
        _emit(_notifier, 'load', 0)


def application(environ, start_response):
    parts = environ.get('PATH_INFO', '').strip('/').split('/')
    knew = None if _driver is None else _driver.subscribers()
    if parts[0] == 'notify':
        _emit(_notifier, str(os.getpid()), int(parts[1]))
    body = json.dumps({
        'pid': os.getpid(),
        'subscribers': knew,
        'driver': _driver is not None,
        'threads': _threads(),
    }).encode()
    start_response('200 OK', [('Content-Type', 'application/json'),
                              ('Content-Length', str(len(body)))])
    return [body]


# -- oslo.service and cotyledon -----------------------------------------------

class _Emitter:
    """A worker's loop: a notification every _INTERVAL until stopped.

    Numbered per process: a service restarted in the same process (a
    SIGHUP reload) goes on from where it was.
    """

    _next = {}

    def __init__(self, notifier):
        self.notifier = notifier
        self.stopped = threading.Event()
        self.thread = None
        self.threads = 0
        self._path = os.environ[STATE_ENV]

    def start(self):
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        pid = os.getpid()
        stop_file = self._path + '.stop'
        self.threads = _threads()
        while not (self.stopped.is_set() or os.path.exists(stop_file)):
            seq = self._next.setdefault(pid, 0)
            _emit(self.notifier, str(pid), seq)
            self._next[pid] = seq + 1
            self.threads = max(self.threads, _threads())
            self.stopped.wait(_INTERVAL)
        self._say_last()

    def _say_last(self):
        pid = os.getpid()
        report = '%s.%d' % (self._path, pid)
        with open(report + '.tmp', 'w') as f:
            json.dump({'pid': pid, 'last': self._next.get(pid, 0) - 1,
                       'threads': self.threads}, f)
        # Whole or not at all, for the test that reads it.
        os.rename(report + '.tmp', report)

    def stop(self):
        self.stopped.set()
        if self.thread is not None:
            # Not join(timeout): under eventlet on Python 3.13 it raises.
            deadline = time.monotonic() + 5
            while self.thread.is_alive() and time.monotonic() < deadline:
                time.sleep(0.01)


def run_oslo_service(workers):
    from oslo_service import service

    notifier, _ = make_notifier()

    class Worker(service.Service):
        def start(self):
            super().start()
            self.emitter = _Emitter(notifier)
            self.emitter.start()

        def stop(self, graceful=False):
            # The parent's copy of the service is stopped too, never
            # started.
            if hasattr(self, 'emitter'):
                self.emitter.stop()
            super().stop(graceful)

    conf = cfg.ConfigOpts()
    conf([], project='unix-matrix')
    launcher = service.ProcessLauncher(conf, restart_method='reload')
    launcher.launch_service(Worker(), workers=workers)
    print('ready', flush=True)
    launcher.wait()


def run_cotyledon(workers):
    import cotyledon

    class Worker(cotyledon.Service):
        def __init__(self, worker_id):
            super().__init__(worker_id)
            notifier, _ = make_notifier()
            self.emitter = _Emitter(notifier)

        def run(self):
            self.emitter.start()
            self.emitter.stopped.wait()

        def terminate(self):
            self.emitter.stop()

    manager = cotyledon.ServiceManager()
    manager.add(Worker, workers=workers)
    print('ready', flush=True)
    manager.run()


if __name__ == '__main__':
    runner = {'oslo-service': run_oslo_service,
              'cotyledon': run_cotyledon}[sys.argv[1]]
    runner(int(sys.argv[2]))
