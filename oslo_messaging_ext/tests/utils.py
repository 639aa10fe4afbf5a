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

"""Helpers shared by the unit and functional tests and the benchmarks."""

import json
import logging
import os
import shutil
import time

import fixtures
from oslo_utils import strutils

from oslo_messaging_ext.notify import _unix_protocol as proto


# Set in CI (.ci/run): what a test needs is part of the test bed there.
REQUIRE_ENV = 'OSLO_MESSAGING_EXT_REQUIRE_BROKER'


def everything_required():
    """Whether a missing broker or tool fails a test, not skips it."""
    return strutils.bool_from_string(os.environ.get(REQUIRE_ENV, ''))


def unavailable(test, reason):
    """Skip ``test`` for ``reason`` on a laptop; fail it in CI.

    A CI run that skips a test proves nothing of what it promises: there,
    a missing broker or tool is a fault of the test bed, to be fixed.
    """
    if everything_required():
        test.fail('%s (%s is set: this is a failure, not a skip)'
                  % (reason, REQUIRE_ENV))
    test.skipTest(reason)


def require_tool(test, name, package):
    """The path of program ``name``; if missing, see :func:`unavailable`."""
    path = shutil.which(name)
    if not path:
        unavailable(test, '%s is not installed (Debian package %s)'
                    % (name, package))
    return path


def wait_until(predicate, timeout, interval=0.01):
    """Poll ``predicate`` until it is true or ``timeout`` passes.

    :returns: the predicate's last result
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result or time.monotonic() >= deadline:
            return result
        time.sleep(interval)


class FakeLogger(fixtures.FakeLogger):
    """fixtures.FakeLogger on the logger ``name``, enabled for the test.

    logging.config.dictConfig() and fileConfig() disable every logger that
    exists when they run, unless told otherwise: a test that configured
    logging earlier in the same process (upstream oslo.messaging's
    test_logging_conf, for one) leaves our module loggers disabled, and a
    disabled logger records nothing, whatever its handlers. The logger is
    enabled for the test and put back as it was after it, so that what a
    test asserts on does not depend on the tests run before it. assertLogs
    on the same logger within the test sees the records too.
    """

    def __init__(self, name, **kwargs):
        super().__init__(name=name, **kwargs)
        self.logger = logging.getLogger(name)

    def _setUp(self):
        self.useFixture(fixtures.MockPatchObject(
            self.logger, 'disabled', False))
        super()._setUp()


def notification_line(seq):
    """A notification as the unix relay carries it: one JSON line."""
    return json.dumps({'event_type': 'image.upload',
                       'payload': {'seq': seq}}).encode() + b'\n'


def native_socket_pair(test):
    """Connected AF_UNIX sockets, ours non-blocking, closed after ``test``.

    Native even in an eventlet-patched run: the relay's thread, which the
    relay and hub unit tests stand in for, never uses green sockets.
    """
    socket = proto.native('socket')
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    test.addCleanup(ours.close)
    test.addCleanup(theirs.close)
    ours.setblocking(False)
    theirs.settimeout(5.0)
    return ours, theirs
