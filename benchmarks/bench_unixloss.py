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

"""Loss of the unix driver against an independent truth.

A pre-fork pool of 4 workers (os.fork, or uWSGI recycling its workers
with --max-requests) emits flat out through ``driver = unix``,
each worker recording outside the driver how many notifications it
emitted; three subscribers (a raw reader, the subscriber library,
oslo-notify-tail) read from before the first counted notification. See
oslo_messaging_ext.tests.functional.unix_loss, which runs each case in its
own process, black-box, and oslo_messaging_ext/tests/functional/
test_unix_loss.py, which asserts the same targets on shorter runs.

silent = owed - delivered - reported in drop notices. Targets: 0 when
workers are recycled (every second, every 5 s) and after the hub is
stopped for 3 s; when the hub is killed every 5 s, only what the dead hubs
held, within the bound of their buffers. The library's and the tail's
counts of what they missed are compared with the truth of what each
received.
"""

import json
import subprocess
import sys

from benchmarks import _harness

MODULE = 'oslo_messaging_ext.tests.functional.unix_loss'


def _case(case, duration, interval):
    # At least two replacements of each worker, however loaded the host.
    recycles = 8 if case in ('recycle', 'uwsgi') else 0
    proc = subprocess.run(
        [sys.executable, '-m', MODULE, case, '--duration', str(duration),
         '--interval', str(interval), '--workers', '4', '--min-recycles',
         str(recycles)],
        capture_output=True, text=True, timeout=3 * duration + 300)
    if proc.returncode:
        raise RuntimeError('%s failed: %s' % (case, proc.stderr[-2000:]))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args):
    long = 4 if args.quick else 30
    cases = (('workers recycled every 1 s', 'recycle', long, 1),
             ('workers recycled every 5 s', 'recycle', max(long, 8), 5),
             ('uWSGI workers recycled every 1 s (--max-requests)', 'uwsgi',
              long, 1),
             ('uWSGI workers recycled every 5 s (--max-requests)', 'uwsgi',
              max(long, 8), 5),
             ('hub SIGSTOPped for 3 s', 'stop', 6 if args.quick else 10, 3),
             ('hub SIGKILLed every 5 s', 'kill', 6 if args.quick else 30,
              5))
    from oslo_messaging_ext.tests.functional import unix_loss
    tables = []
    for title, case, duration, interval in cases:
        if case == 'uwsgi' and unix_loss.UWSGIPool.program() is None:
            table = _harness.Table('unix loss: %s: uwsgi is not installed'
                                   % title)
            tables.append(table)
            continue
        result = _case(case, duration, interval)
        table = _harness.Table(
            'unix loss: %s, 4 workers flat out, %d s' % (title, duration))
        owed = result['owed']
        table.add('owed (emitted, the truth)', owed, 'notifications')
        table.add('delivered to the raw reader', result['delivered'],
                  'notifications')
        table.add('reported in drop notices', result['noticed'],
                  'notifications')
        silent = result['silent']
        if case == 'kill':
            held = result['silent_held_by_dead_hubs']
            table.add('silent, held by the dead hubs (%d kills)'
                      % len(result['signals']), held, 'notifications',
                      target='<= %d (their buffers)' % result['held_bound'],
                      ok=held <= result['held_bound'])
            table.add('silent, emitted while no hub served the reader',
                      result['silent_emitted_while_away'], 'notifications')
            other = result['silent_otherwise']
            table.add('silent, otherwise', other, 'notifications',
                      target='0', ok=other <= 0)
        else:
            table.add('silent', silent, 'notifications', target='0',
                      ok=silent == 0)
        table.add('silent, share of owed', 100.0 * silent / max(owed, 1),
                  '%')
        table.add('  of which after the last line received of a worker',
                  result['undelivered_after_last_line'] if not silent else
                  min(silent, result['undelivered_after_last_line']),
                  'notifications')
        table.add('workers started', result['workers_started'], 'processes')
        for name, label in (('library', 'Subscription.missed'),
                            ('tail', 'oslo-notify-tail "missed"')):
            sub = result[name]
            exact = sub['missed'] == sub['truth_missed']
            table.add('%s (truth: %d not received)'
                      % (label, sub['truth_missed']), sub['missed'],
                      'notifications',
                      target=None if case == 'kill' else '= truth',
                      ok=None if case == 'kill' else exact)
        hub_exit = result['hub_exit']
        table.add('hub gone after the last worker ended',
                  -1 if hub_exit is None else hub_exit, 's (-1: never)')
        tables.append(table)
    return tables
