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

"""The WSGI service of unix_loss's uWSGI case.

uWSGI loads it (in its master, as a service is loaded by default): it
builds its Notifier from the configuration file UNIX_LOSS_CONF names.
Each request emits UNIX_LOSS_PER_REQUEST notifications and records, after
each, how many this process emitted, in the shared table of the file
UNIX_LOSS_TRUTH names (a slot per process, taken at its first request).
"""

import os

from oslo_messaging_ext.tests.functional import unix_loss

_state = {}


def _load():
    config = os.environ.get('UNIX_LOSS_CONF')
    if config:
        _state['notifier'] = unix_loss._notifier(config)
        _state['per_request'] = int(os.environ['UNIX_LOSS_PER_REQUEST'])


def application(environ, start_response):
    if _state.get('pid') != os.getpid():
        # A new worker: its own slot, and its count from 0.
        shared = unix_loss.Shared(os.environ['UNIX_LOSS_TRUTH'])
        _state.update(pid=os.getpid(), shared=shared,
                      slot=shared.take_slot(os.getpid()), count=0)
    shared, slot = _state['shared'], _state['slot']
    notifier = _state['notifier']
    for _ in range(_state['per_request']):
        _state['count'] += 1
        notifier.info({}, unix_loss.EVENT_TYPE,
                      {'w': slot, 'n': _state['count']})
        shared.set_count(slot, _state['count'])
    start_response('200 OK', [('Content-Type', 'text/plain')])
    return [b'ok\n']


_load()
