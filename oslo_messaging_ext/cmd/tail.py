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

"""oslo-notify-tail: print the notifications a service relays on a socket.

Output is NDJSON (the lines exactly as received) when stdout is not a
terminal, one readable line per notification on a terminal; ``--format``
forces either. Notices of dropped notifications
(``oslo_messaging_ext.unix.dropped``) are always printed, whatever the
filters, since they say that something is missing. Everything about the
connection (waiting, reconnections, notifications missed) goes to stderr,
so that stdout stays the stream.

Selectors (``--match``) are those of the messaging-multicast driver's rules,
evaluated by the same code: a rule can be tried live on a unix socket
before it goes into a service's configuration. This command does not import
oslo.messaging, to start fast and quietly.

Exit status: 0 when done (``--count`` reached, or the service closed the
stream); 1 when the stream ended before ``--count`` or the output cannot be
written; 2 for usage errors; 3 when the socket does not exist; 4 when
permission is denied; 5 when nothing listens on the socket (a stale file);
6 when the path is not a socket; 130 on interrupt.
"""

import argparse
import datetime
import fnmatch
import os
import sys
import threading

from oslo_messaging_ext.cmd import _tail_format
from oslo_messaging_ext.cmd import _tail_stats
from oslo_messaging_ext.notify import _multicast_rules
from oslo_messaging_ext import unix_subscriber

PROG = 'oslo-notify-tail'
EXIT_OK = 0
EXIT_INCOMPLETE = 1
EXIT_MISSING = 3
EXIT_PERMISSION = 4
EXIT_NOT_LISTENING = 5
EXIT_NOT_A_SOCKET = 6
EXIT_INTERRUPTED = 130

_EXIT_CODES = [
    (unix_subscriber.SocketMissing, EXIT_MISSING),
    (unix_subscriber.SocketPermissionDenied, EXIT_PERMISSION),
    (unix_subscriber.ServiceNotListening, EXIT_NOT_LISTENING),
    (unix_subscriber.NotASocket, EXIT_NOT_A_SOCKET),
]

# Kept for the callers of the former single module.
format_line = _tail_format.format_line


def _parser():
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.splitlines()[0],
        epilog='Exit status: 0 done, 1 stream ended before --count or '
               'output failed, 2 usage, 3 no such socket, 4 permission '
               'denied, 5 nothing listening, 6 not a socket, 130 '
               'interrupted.')
    parser.add_argument('sock_path', metavar='SOCK',
                        help='the sock_path of the service')
    parser.add_argument('-e', '--event-type', action='append', default=[],
                        metavar='GLOB',
                        help='only event types matching GLOB (e.g. image.*);'
                             ' repeat for several')
    parser.add_argument('-p', '--priority', action='append', default=[],
                        metavar='PRIORITY', type=_priority,
                        help='only this priority, in any case: %s; repeat '
                             'for several' % _tail_format.priority_spellings())
    parser.add_argument('-P', '--publisher-id', action='append', default=[],
                        metavar='GLOB',
                        help='only publisher ids matching GLOB')
    parser.add_argument('-m', '--match', action='append', default=[],
                        metavar='SELECTOR', type=_selector,
                        help='only notifications matching SELECTOR, "FIELD '
                             '[!]OPERATOR VALUE" as in a messaging-multicast '
                             'rule (e.g. "payload.disk_format exact qcow2", '
                             '"event_type glob image.*"); repeat: all must '
                             'match')
    parser.add_argument('-n', '--count', type=_positive, metavar='N',
                        help='exit after N notifications (after filtering)')
    parser.add_argument('-f', '--follow', action='store_true',
                        help='wait for the socket, and reconnect when the '
                             'service restarts (as soon as its new socket '
                             'appears); each reconnection and each '
                             'notification missed is reported on stderr')
    parser.add_argument('--format', choices=('auto', 'json', 'line'),
                        default='auto',
                        help='json: NDJSON; line: one readable line per '
                             'notification; auto (default): line on a '
                             'terminal, json otherwise')
    parser.add_argument('--color', '--colour', dest='colour',
                        choices=('auto', 'always', 'never'), default='auto',
                        help='colour the priority in line format: auto '
                             '(default) on a terminal unless NO_COLOR is '
                             'set')
    parser.add_argument('--utc', action='store_true',
                        help='show times in UTC (default: local time); '
                             'either way with the zone')
    parser.add_argument('--stats', action='store_true',
                        help='instead of the notifications, a table of '
                             'their counts per event type and priority and '
                             'of those dropped or missed, redrawn in place '
                             'every --interval on a terminal, printed one '
                             'after the other otherwise')
    parser.add_argument('--interval', type=_positive_float, default=1.0,
                        metavar='SECONDS',
                        help='--stats refresh interval (default 1)')
    return parser


def _positive(value):
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number <= 0:
        raise argparse.ArgumentTypeError(
            'must be a positive integer, not %r' % value)
    return number


def _positive_float(value):
    try:
        number = float(value)
    except ValueError:
        number = 0
    if not number > 0:
        raise argparse.ArgumentTypeError(
            'must be a positive number of seconds, not %r' % value)
    return number


def _priority(value):
    priority = _tail_format.canonical_priority(value)
    if priority is None:
        raise argparse.ArgumentTypeError(
            'unknown priority %r; use one of %s'
            % (value, _tail_format.priority_spellings()))
    return priority


def _selector(value):
    try:
        return _multicast_rules.Selector.parse(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f'{value!r}: {exc}')


def _matches(args, notification):
    if notification.get('event_type') == unix_subscriber.DROPPED_EVENT_TYPE:
        return True
    event_type = str(notification.get('event_type'))
    if args.event_type and not any(fnmatch.fnmatchcase(event_type, g)
                                   for g in args.event_type):
        return False
    if args.priority and _tail_format.canonical_priority(
            notification.get('priority')) not in args.priority:
        return False
    publisher_id = str(notification.get('publisher_id'))
    if args.publisher_id and not any(fnmatch.fnmatchcase(publisher_id, g)
                                     for g in args.publisher_id):
        return False
    # Decoded from the wire already: read as the driver's selectors read.
    view = _multicast_rules.Notification(
        notification, notification.get('context') or {})
    return all(s.evaluate(view) for s in args.match)


class _Reporter:
    """Tells the person on stderr what happens to the connection."""

    def __init__(self, args, stream, stats=None, notes_in_stats=False):
        self.path = args.sock_path
        self.follow = args.follow
        self.stream = stream
        self.stats = stats
        # On a terminal the table is redrawn in place: what would go to
        # stderr is shown under it instead.
        self.notes_in_stats = notes_in_stats
        self._away = False

    def say(self, text):
        if self.notes_in_stats:
            self.stats.note(text)
            return
        try:
            self.stream.write(f'{PROG}: {text}\n')
            self.stream.flush()
        except (AttributeError, OSError, ValueError):
            pass  # stderr closed: nobody to tell

    def tell(self, text):
        """Say what just happened, with the time, as a log line."""
        self.say(f'{_now()} {text}')

    def __call__(self, event):
        if isinstance(event, unix_subscriber.Waiting):
            if not self._away:
                self._away = True
                self.tell(f'waiting for {self.path} ({event.reason.reason})')
            self._status('waiting for %s' % self.path)
        elif isinstance(event, unix_subscriber.Connected):
            if event.downtime is not None:
                self.tell('reconnected to %s after %.1f s (connection %d)'
                          % (self.path, event.downtime, event.connection))
            elif self._away:
                self.tell('connected to %s' % self.path)
            self._away = False
            self._status('connected to %s since %s (connection %d)'
                         % (self.path, _now(), event.connection))
        elif isinstance(event, unix_subscriber.Disconnected):
            if self.follow:
                self._away = True
                self.tell('the service closed the stream; waiting for it '
                          'to come back')
                self._status('disconnected from %s since %s'
                             % (self.path, _now()))
        elif isinstance(event, unix_subscriber.Gap):
            self.tell(_describe_gap(event))

    def _status(self, text):
        if self.stats is not None:
            self.stats.set_status(text)

    def summary(self, subscription):
        if subscription.missed:
            self.say('missed %d notifications (%d reported dropped by the '
                     'service, %d in sequence gaps, each counted once)'
                     % (subscription.missed, subscription.dropped,
                        subscription.gaps))


def _describe_gap(gap):
    who = f'{gap.publisher_id} (process {gap.source})'
    if gap.before_first:
        return ('%s: first heard of after reconnecting, at #%d; its %d '
                'notifications before were not received'
                % (who, gap.last + 1, gap.count))
    when = ' while disconnected' if gap.reconnected else ''
    return ('missed %d notification%s of %s%s (#%d to #%d)'
            % (gap.count, '' if gap.count == 1 else 's', who, when,
               gap.first, gap.last))


def _now():
    return datetime.datetime.now().astimezone().strftime('%H:%M:%S %Z')


def _colour_wanted(args, out):
    if args.colour != 'auto':
        return args.colour == 'always'
    return (out.isatty() and not os.environ.get('NO_COLOR') and
            os.environ.get('TERM') != 'dumb')


class _Printer:
    """Writes each notification to stdout, as NDJSON or readable lines."""

    def __init__(self, args, out):
        self.out = out
        self.tty = out.isatty()
        self.readable = (args.format == 'line' or
                         args.format == 'auto' and self.tty)
        encoding = (getattr(out, 'encoding', None) or '').lower()
        self.formatter = _tail_format.LineFormatter(
            colour=_colour_wanted(args, out), utc=args.utc,
            ellipsis='\u2026' if encoding.startswith('utf') else '...')

    def write(self, line, notification):
        if self.readable:
            if self.tty:
                # Read at each line: the terminal may have been resized.
                self.formatter.width = _terminal_size(self.out).columns
            text = self.formatter.format(notification)
        else:
            text = line.decode('utf-8', 'replace')
        self.out.write(text + '\n')
        self.out.flush()


def _terminal_size(out):
    try:
        return os.get_terminal_size(out.fileno())
    except (OSError, ValueError):
        return os.terminal_size((80, 24))


def _tail(args, subscription, printer):
    printed = 0
    for line, notification in subscription.records():
        if not _matches(args, notification):
            continue
        printer.write(line, notification)
        if notification.get('event_type') == \
                unix_subscriber.DROPPED_EVENT_TYPE:
            continue
        printed += 1
        if args.count and printed >= args.count:
            return EXIT_OK
    if args.count:
        sys.stderr.write('%s: %s: the service closed the stream after %d '
                         'of %d notifications\n'
                         % (PROG, args.sock_path, printed, args.count))
        return EXIT_INCOMPLETE
    return EXIT_OK


def _stats(args, subscription, stats, out):
    """Count in a thread, draw here every interval until the stream ends."""
    outcome = {}

    def read():
        try:
            counted = 0
            for _line, notification in subscription.records():
                if (_matches(args, notification) and
                        notification.get('event_type') !=
                        unix_subscriber.DROPPED_EVENT_TYPE):
                    stats.add(notification)
                    counted += 1
                    if args.count and counted >= args.count:
                        break
        except BaseException as exc:
            outcome['error'] = exc
        finally:
            done.set()

    done = threading.Event()
    reader = threading.Thread(target=read, name='notify-tail-reader',
                              daemon=True)
    tty = out.isatty()
    drawer = (_tail_stats.InPlaceDrawer(out) if tty
              else _tail_stats.AppendingDrawer(out))
    reader.start()
    try:
        while True:
            finished = done.wait(args.interval)
            if finished and 'error' in outcome:
                break
            # A terminal without a size (0x0, some ptys) is not limited.
            size = _terminal_size(out) if tty else os.terminal_size((0, 0))
            drawer.draw(stats.table(
                args.interval,
                max_rows=_tail_stats.max_rows(size.lines) or None,
                width=size.columns or None))
            if finished:
                break
    finally:
        subscription.close()
        reader.join(5)
    if 'error' in outcome:
        raise outcome['error']
    return EXIT_OK


def main(argv=None):
    args = _parser().parse_args(argv)
    out = sys.stdout
    if out is None:
        sys.stderr.write('%s: standard output is closed\n' % PROG)
        return EXIT_INCOMPLETE
    stats = None
    subscription = unix_subscriber.Subscription(args.sock_path,
                                                reconnect=args.follow)
    if args.stats:
        stats = _tail_stats.Stats(subscription)
    reporter = _Reporter(args, sys.stderr, stats,
                         notes_in_stats=stats is not None and out.isatty())
    subscription.on_event = reporter
    try:
        if stats is not None:
            status = _stats(args, subscription, stats, out)
        else:
            status = _tail(args, subscription, _Printer(args, out))
    except unix_subscriber.SubscriberError as exc:
        reporter.say(str(exc))
        for cls, code in _EXIT_CODES:
            if isinstance(exc, cls):
                return code
        return EXIT_INCOMPLETE
    except KeyboardInterrupt:
        status = EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of our output went away (| head): nothing is wrong,
        # and nothing more may be written (nor flushed at exit).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        os.close(devnull)
        return EXIT_OK
    except OSError as exc:
        reporter.say('cannot write the output: %s' % exc)
        return EXIT_INCOMPLETE
    finally:
        subscription.close()
    reporter.notes_in_stats = False
    reporter.summary(subscription)
    return status


if __name__ == '__main__':
    sys.exit(main())
