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

import json
import subprocess
import sys

from oslotest import base
import stevedore

from oslo_messaging_ext import opts
from oslo_messaging_ext import samples


class ListOptsTestCase(base.BaseTestCase):

    def test_entry_point_is_list_opts(self):
        mgr = stevedore.NamedExtensionManager(
            'oslo.config.opts', names=['oslo_messaging_ext'],
            on_load_failure_callback=self._reraise)
        self.assertEqual(['oslo_messaging_ext'], mgr.names())
        self.assertIs(opts.list_opts, mgr['oslo_messaging_ext'].plugin)

    def test_returns_deep_copies(self):
        first = opts.list_opts()
        second = opts.list_opts()
        # Empty lists would pass every check below.
        self.assertTrue(first)
        self.assertEqual([g for g, _ in first], [g for g, _ in second])
        for (group, first_opts), (_, second_opts) in zip(first, second):
            self.assertTrue(first_opts, 'group %s lists no option' % group)
            self.assertEqual([o.name for o in first_opts],
                             [o.name for o in second_opts])
            for a, b in zip(first_opts, second_opts):
                self.assertIsNot(a, b)

    def test_every_option_has_help(self):
        for group, group_opts in opts.list_opts():
            for opt in group_opts:
                self.assertTrue(opt.help, '{}.{} has no help'.format(
                    group or 'DEFAULT', opt.name))

    @staticmethod
    def _reraise(manager, entrypoint, exc):
        raise exc


# Run in a fresh interpreter: what importing opts (and listing its
# options, as oslo-config-generator does) loads and registers.
_IMPORT_OPTS = """
import json, sys
from oslo_config import cfg
before = set(cfg.CONF)
import oslo_messaging_ext.opts
oslo_messaging_ext.opts.list_opts()
print(json.dumps({
    'modules': sorted(m for m in sys.modules
                      if m.startswith('oslo_messaging')),
    'conf': sorted(set(cfg.CONF) - before),
}))
"""


class ImportSideEffectsTestCase(base.BaseTestCase):

    def test_opts_loads_option_definitions_only(self):
        result = subprocess.run([sys.executable, '-c', _IMPORT_OPTS],
                                capture_output=True, text=True, timeout=60)
        self.assertEqual(0, result.returncode, result.stderr)
        loaded = json.loads(result.stdout)
        # No driver module, not even oslo.messaging: oslo-config-generator
        # lists the options without loading either driver.
        self.assertEqual(['oslo_messaging_ext',
                          'oslo_messaging_ext.notify',
                          'oslo_messaging_ext.notify._multicast_opts',
                          'oslo_messaging_ext.notify._unix_opts',
                          'oslo_messaging_ext.opts'], loaded['modules'])
        # Nothing registered on the process-wide configuration, in
        # [DEFAULT] (onmcast's options) or any group.
        self.assertEqual([], loaded['conf'])


class SamplesTestCase(base.BaseTestCase):

    def test_glance_life_cycle_in_order(self):
        envelopes = samples.glance_image_notifications()
        events = [n['event_type'] for n in envelopes]
        self.assertEqual(['image.create', 'image.update', 'image.prepare',
                          'image.upload', 'image.activate', 'image.update'],
                         events)
        for envelope in envelopes:
            self.assertEqual(
                {'message_id', 'publisher_id', 'event_type', 'priority',
                 'payload', 'timestamp'}, set(envelope))

    def test_upload_payload_is_active_image(self):
        payload = samples.glance_upload_payload()
        self.assertEqual('active', payload['status'])
        self.assertEqual(1036, payload['size'])
