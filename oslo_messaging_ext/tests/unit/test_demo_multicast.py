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

import argparse
import contextlib
import io

from oslotest import base

from oslo_messaging_ext.cmd import _demo_multicast


class MulticastDemoTestCase(base.BaseTestCase):

    def test_every_target_prints_what_it_receives(self):
        parser = argparse.ArgumentParser()
        _demo_multicast.add_arguments(parser)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            status = _demo_multicast.run(parser.parse_args([]))
        self.assertEqual(0, status, out.getvalue())
        lines = out.getvalue().splitlines()
        received = [line.split()[:2] for line in lines
                    if line.startswith('  ')]
        self.assertEqual(7, received.count(['standard', 'notifications']))
        for host in ('host1', 'host2'):
            self.assertEqual(
                ['image.upload', 'image.delete'],
                [line.split()[1] for line in lines
                 if line.startswith('  glance.repl.%s ' % host)])
        self.assertEqual(3, sum(1 for line in lines
                                if line.startswith('  audit/images.active')))
        self.assertIn('Every notification and replica arrived.', lines)
