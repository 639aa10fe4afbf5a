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
filters, since they say that something is missing.

Exit status: 0 when done (``--count`` reached, or the service closed the
stream); 1 when the stream ended before ``--count``; 2 for usage errors;
3 when the socket does not exist; 4 when permission is denied; 5 when
nothing listens on the socket (a stale file); 6 when the path is not a
socket; 130 on interrupt.
"""

import argparse
import fnmatch
import json
import os
import sys

from oslo_messaging_ext import unix_subscriber

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


def _parser():
    parser = argparse.ArgumentParser(
        prog='oslo-notify-tail',
        description=__doc__.splitlines()[0],
        epilog='Exit status: 0 done, 1 stream ended before --count, '
               '2 usage, 3 no such socket, 4 permission denied, 5 nothing '
               'listening, 6 not a socket, 130 interrupted.')
    parser.add_argument('sock_path', metavar='SOCK',
                        help='the sock_path of the service')
    parser.add_argument('-e', '--event-type', action='append', default=[],
                        metavar='GLOB',
                        help='only event types matching GLOB (e.g. image.*);'
                             ' repeat for several')
    parser.add_argument('-p', '--priority', action='append', default=[],
                        metavar='PRIORITY', type=str.lower,
                        help='only this priority (info, warn, error...); '
                             'repeat for several')
    parser.add_argument('-P', '--publisher-id', action='append', default=[],
                        metavar='GLOB',
                        help='only publisher ids matching GLOB')
    parser.add_argument('-n', '--count', type=_positive, metavar='N',
                        help='exit after N notifications (after filtering)')
    parser.add_argument('-f', '--follow', action='store_true',
                        help='wait for the socket and reconnect, with '
                             'backoff, when the service restarts')
    parser.add_argument('--format', choices=('auto', 'json', 'line'),
                        default='auto',
                        help='json: NDJSON; line: one readable line per '
                             'notification; auto (default): line on a '
                             'terminal, json otherwise')
    return parser


def _positive(value):
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError('must be a positive integer')
    return number


def _matches(args, notification):
    if notification.get('event_type') == unix_subscriber.DROPPED_EVENT_TYPE:
        return True
    event_type = str(notification.get('event_type'))
    if args.event_type and not any(fnmatch.fnmatchcase(event_type, g)
                                   for g in args.event_type):
        return False
    priority = str(notification.get('priority', '')).lower()
    if args.priority and priority not in args.priority:
        return False
    publisher_id = str(notification.get('publisher_id'))
    if args.publisher_id and not any(fnmatch.fnmatchcase(publisher_id, g)
                                     for g in args.publisher_id):
        return False
    return True


def format_line(notification, width=None):
    """One readable line: time, priority, publisher, event type, payload."""
    head = '%s %-5s %s %s ' % (notification.get('timestamp', '-'),
                               str(notification.get('priority', '-')),
                               notification.get('publisher_id', '-'),
                               notification.get('event_type', '-'))
    payload = json.dumps(notification.get('payload'), sort_keys=True,
                         separators=(',', ':'))
    line = head + payload
    if width and len(line) > width:
        line = line[:max(width - 3, len(head))] + '...'
    return line


def main(argv=None):
    args = _parser().parse_args(argv)
    readable = (args.format == 'line' or
                args.format == 'auto' and sys.stdout.isatty())
    width = None
    if readable and sys.stdout.isatty():
        width = os.get_terminal_size(sys.stdout.fileno()).columns
    subscription = unix_subscriber.Subscription(args.sock_path,
                                                reconnect=args.follow)
    printed = 0
    out = sys.stdout
    try:
        for line in subscription.lines():
            try:
                notification = json.loads(line)
            except ValueError:
                continue
            if not _matches(args, notification):
                continue
            if readable:
                out.write(format_line(notification, width) + '\n')
            else:
                out.write(line.decode('utf-8') + '\n')
            out.flush()
            if notification.get('event_type') == \
                    unix_subscriber.DROPPED_EVENT_TYPE:
                continue
            printed += 1
            if args.count and printed >= args.count:
                return EXIT_OK
    except unix_subscriber.SubscriberError as exc:
        sys.stderr.write('oslo-notify-tail: %s\n' % exc)
        for cls, code in _EXIT_CODES:
            if isinstance(exc, cls):
                return code
        return EXIT_INCOMPLETE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of our output went away (| head): nothing is wrong.
        sys.stderr.close()
        return EXIT_OK
    finally:
        subscription.close()
    if args.count:
        sys.stderr.write('oslo-notify-tail: %s: the service closed the '
                         'stream after %d of %d notifications\n'
                         % (args.sock_path, printed, args.count))
        return EXIT_INCOMPLETE
    return EXIT_OK


if __name__ == '__main__':
    sys.exit(main())
