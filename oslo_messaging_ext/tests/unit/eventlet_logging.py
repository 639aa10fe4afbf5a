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

"""Relay threads logging while green threads log, in a patched process.

Run by test_unix_relay in a child process: before the fix it hung, or
died with "greenlet.error: Cannot switch to a different thread".
"""

import eventlet
eventlet.monkey_patch()

import io  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import tempfile  # noqa: E402

from oslo_messaging_ext.notify import _unix_relay  # noqa: E402


def main():
    stream = io.StringIO()
    logging.basicConfig(level=logging.DEBUG, stream=stream)
    log = logging.getLogger('green')
    running = [True]

    def chatter():
        while running[0]:
            log.debug('green %s', 'x' * 100)
            eventlet.sleep(0)

    for _ in range(10):
        eventlet.spawn_n(chatter)
    directory = tempfile.mkdtemp()
    for i in range(100):
        path = os.path.join(directory, 's%d' % i)
        # A stale socket: the relay thread logs that it removed it.
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(path)
        stale.close()
        relay = _unix_relay.Relay(
            path, service='eventlet-logging',
            mode=0o660, gid=os.getegid(), max_subscribers=4,
            buffer_size=1 << 20)
        relay.start()
        while relay.state != 'hub':
            eventlet.sleep(0.001)
        relay.close()
    running[0] = False
    served = stream.getvalue().count('Removed stale unix notification socket')
    print('%d relay records logged' % served)
    return 0 if served == 100 else 1


if __name__ == '__main__':
    raise SystemExit(main())
