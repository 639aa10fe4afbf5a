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

"""A fork that runs none of Python's at-fork hooks, as default uWSGI's.

Run by test_unix_relay in a child process, single-threaded (a fork that
skips the hooks is only safe so): ``python hookless_fork.py SOCK_PATH``.
The parent makes a relay and never starts it, as uWSGI's master does,
and hands a log record to the relay's deferred records, as the relay
thread does in an eventlet process; it then forks with the C library's
fork(), the GIL held. The child relays one notification to a subscriber
and closes, as a worker does at exit. Prints one JSON line from the
child's point of view.
"""

import ctypes
import json
import logging
import os
import sys
import time

from oslo_messaging_ext.notify import _unix_log
from oslo_messaging_ext.notify import _unix_relay
from oslo_messaging_ext import unix_subscriber

LOG = logging.getLogger('hookless_fork')


class Records(logging.Handler):

    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def wait_for(predicate):
    deadline = time.monotonic() + 20
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


def child(path, records):
    # What a worker's driver gets: the relay its parent made.
    relay = _unix_relay.get(path, service='hookless', mode=0o660,
                            gid=os.getegid(), max_subscribers=4,
                            buffer_size=65536)
    relay.wanted()
    wait_for(lambda: os.path.exists(path))
    sock = unix_subscriber.connect(path)
    wait_for(lambda: relay.subscribers == 1)
    if relay.wanted():
        relay.publish(json.dumps({'event_type': 'image.upload',
                                  'payload': {'pid': os.getpid()}}))
    sock.settimeout(20)
    received = json.loads(sock.makefile('rb').readline())
    _unix_log.emit_deferred_records()
    own = relay.pid == os.getpid()
    _unix_relay.release(relay)
    _unix_relay.release(relay)
    sock.close()
    print(json.dumps({'relay_pid_is_ours': own,
                      'received_from': received['payload']['pid'],
                      'pid': os.getpid(),
                      'socket_left': os.path.lexists(path),
                      'parent_records': records.messages}), flush=True)


def main(path):
    records = Records()
    LOG.addHandler(records)
    LOG.setLevel(logging.INFO)
    # Made, never started: uWSGI's master.
    _unix_relay.get(path, service='hookless', mode=0o660, gid=os.getegid(),
                    max_subscribers=4, buffer_size=65536)
    _unix_log.logging_is_green = lambda: True
    _unix_log.log(LOG, logging.WARNING, 'deferred in the parent')
    _unix_log.logging_is_green = lambda: False
    # ctypes.PyDLL keeps the GIL across the call: the child has it.
    pid = ctypes.PyDLL(None).fork()
    if pid == 0:
        code = 1
        try:
            child(path, records)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


if __name__ == '__main__':
    sys.exit(main(sys.argv[1]))
