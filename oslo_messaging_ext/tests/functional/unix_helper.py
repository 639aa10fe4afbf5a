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

"""Real processes for the unix driver's functional tests.

``publish``: a service whose notifier uses the unix driver. The driver is
created first, then the service optionally forks workers (os.fork or
multiprocessing), as a pre-forking server does; every process emits
``--count`` notifications whose payload carries its worker name and a
sequence number. ``--eventlet`` monkey-patches the process first and emits
from green threads.

``subscribe``: a subscriber that reads until it has ``--count``
notifications and prints a JSON summary (received, dropped, gaps in the
sequence of each worker).
"""

import sys

if __name__ == '__main__' and '--eventlet' in sys.argv:
    import eventlet
    eventlet.monkey_patch()

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import multiprocessing  # noqa: E402
import os  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from oslo_config import cfg  # noqa: E402
import oslo_messaging  # noqa: E402

from oslo_messaging_ext.notify import _impl_unix  # noqa: E402
from oslo_messaging_ext import samples  # noqa: E402
from oslo_messaging_ext import unix_subscriber  # noqa: E402

EXIT_NO_SUBSCRIBERS = 3


def make_notifier(args):
    conf = cfg.ConfigOpts()
    conf([], project='unix-functional')
    _impl_unix.register_opts(conf)
    group = 'oslo_messaging_notifications'
    conf.set_override('sock_path', args.sock_path, group=group)
    conf.set_override('sock_buffer_size', args.buffer_size, group=group)
    transport = oslo_messaging.get_notification_transport(conf,
                                                          url='fake:/')
    notifier = oslo_messaging.Notifier(transport, driver='unix',
                                       publisher_id='image.functional')
    driver = notifier._driver_mgr.extensions[0].obj
    return notifier, driver


def emit(notifier, driver, args, worker):
    deadline = time.monotonic() + args.timeout
    while (driver.subscribers() or 0) < args.wait_subscribers:
        if time.monotonic() > deadline:
            sys.stderr.write('%s: %s subscriber(s) after %ss\n'
                             % (worker, driver.subscribers(), args.timeout))
            return EXIT_NO_SUBSCRIBERS
        time.sleep(0.005)
    base = samples.glance_upload_payload()
    seq = 0
    while args.forever or seq < args.count:
        payload = dict(base, seq=seq, worker=worker, tag=args.tag)
        notifier.info({}, 'image.upload', payload)
        seq += 1
        if seq == args.count and args.then_interval:
            args.forever, args.interval = True, args.then_interval
        if args.interval:
            time.sleep(args.interval)
    return 0


def _child(args, worker, notifier, driver):
    status = emit(notifier, driver, args, worker)
    driver.close()
    return status


def _multiprocessing_child(args, worker, notifier, driver):
    sys.exit(emit(notifier, driver, args, worker))


def publish(args):
    notifier, driver = make_notifier(args)
    print('ready', flush=True)
    status = 0
    if args.fork:
        pids = []
        for n in range(args.fork):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    code = _child(args, 'fork%d' % n, notifier, driver)
                finally:
                    os._exit(code)
            pids.append(pid)
        status = emit(notifier, driver, args, 'parent')
        for pid in pids:
            _, code = os.waitpid(pid, 0)
            status = status or os.waitstatus_to_exitcode(code)
    elif args.multiprocessing:
        ctx = multiprocessing.get_context('fork')
        procs = [ctx.Process(target=_multiprocessing_child,
                             args=(args, 'mp%d' % n, notifier, driver))
                 for n in range(args.multiprocessing)]
        for proc in procs:
            proc.start()
        status = emit(notifier, driver, args, 'parent')
        for proc in procs:
            proc.join()
            status = status or proc.exitcode
    elif args.eventlet:
        import eventlet
        pool = eventlet.GreenPool()
        results = [pool.spawn(emit, notifier, driver, args, 'green%d' % n)
                   for n in range(args.green_threads)]
        status = max(r.wait() for r in results)
    else:
        status = emit(notifier, driver, args, 'main')
    return status


def subscribe(args):
    # first and connections say where a loss was, when a test fails.
    summary = {'received': 0, 'dropped': 0, 'gaps': 0, 'workers': {},
               'first': {}, 'tags': [], 'connections': 0}
    last = {}
    subscription = unix_subscriber.Subscription(args.sock_path,
                                                reconnect=True,
                                                min_backoff=0.01)
    # Past the deadline, report what arrived rather than nothing. With
    # --idle-timeout the deadline moves with every line: a slow machine
    # (coverage tracing, CPU contention) is not a failure, a stall is.
    progress = [time.monotonic()]
    stop = threading.Event()

    def watchdog():
        while True:
            if args.idle_timeout:
                deadline = progress[0] + args.idle_timeout
            else:
                deadline = started + args.timeout
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                subscription.close()
                return
            if stop.wait(remaining):
                return

    started = time.monotonic()
    timer = threading.Thread(target=watchdog, daemon=True)
    timer.start()
    wanted_tags = set(args.until_tags.split(',')) if args.until_tags else set()
    for notification in subscription:
        progress[0] = time.monotonic()
        if notification['event_type'] == unix_subscriber.DROPPED_EVENT_TYPE:
            summary['dropped'] += notification['payload']['dropped']
            continue
        payload = notification['payload']
        worker, seq = payload['worker'], payload['seq']
        # A subscriber may join mid-stream: gaps count after the first.
        if worker in last and seq != last[worker] + 1:
            summary['gaps'] += 1
        last[worker] = seq
        summary['first'].setdefault(worker, seq)
        summary['workers'][worker] = summary['workers'].get(worker, 0) + 1
        if payload['tag'] not in summary['tags']:
            summary['tags'].append(payload['tag'])
        summary['received'] += 1
        if (summary['received'] >= args.count and
                wanted_tags.issubset(summary['tags'])):
            break
    stop.set()
    subscription.close()
    summary['last'] = last
    summary['connections'] = subscription.connections
    print(json.dumps(summary), flush=True)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest='command', required=True)
    pub = sub.add_parser('publish')
    pub.add_argument('sock_path')
    pub.add_argument('--count', type=int, default=100)
    pub.add_argument('--forever', action='store_true')
    pub.add_argument('--interval', type=float, default=0.0)
    pub.add_argument('--then-interval', type=float, default=0.0,
                     help='after --count, go on forever at this pace')
    pub.add_argument('--fork', type=int, default=0)
    pub.add_argument('--multiprocessing', type=int, default=0)
    pub.add_argument('--eventlet', action='store_true')
    pub.add_argument('--green-threads', type=int, default=4)
    pub.add_argument('--wait-subscribers', type=int, default=0)
    pub.add_argument('--buffer-size', type=int, default=4 * 1024 * 1024)
    pub.add_argument('--tag', default='')
    pub.add_argument('--timeout', type=float, default=30.0)
    pub.set_defaults(run=publish)
    subs = sub.add_parser('subscribe')
    subs.add_argument('sock_path')
    subs.add_argument('--count', type=int, required=True)
    subs.add_argument('--timeout', type=float, default=60.0)
    subs.add_argument('--idle-timeout', type=float, default=0.0,
                      help='give up after this long without a line, '
                           'instead of --timeout in all')
    subs.add_argument('--until-tags', default='',
                      help='comma-separated tags to see before stopping, '
                           'past --count')
    subs.set_defaults(run=subscribe)
    args = parser.parse_args(argv)
    # What the drivers log lands in the test's failure output.
    logging.basicConfig(level=logging.DEBUG if os.environ.get(
        'UNIX_HELPER_DEBUG') else logging.WARNING, stream=sys.stderr)
    return args.run(args)


if __name__ == '__main__':
    sys.exit(main())
