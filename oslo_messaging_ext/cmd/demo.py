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

"""oslo-messaging-ext-demo: watch the drivers relay a glance image life cycle.

Runs on embedded defaults with no broker: a notifier emits the recorded
glance image life cycle through a driver, and subscribers print what they
receive, live. Each driver has its own sub-command; with none, every demo
runs in turn.
"""

import argparse
import importlib
import sys
import warnings

# Each demo module exposes add_arguments(parser) and run(args) -> int.
DEMOS = {
    'unix': 'oslo_messaging_ext.cmd._demo_unix',
    'multicast': 'oslo_messaging_ext.cmd._demo_multicast',
}


def _quiet_eventlet_deprecation():
    # oslo.messaging imports oslo.service's eventlet backend, which warns
    # on import that eventlet is deprecated: nine lines before any output
    # that concern neither the demo nor the drivers (which do not use
    # eventlet). Matched by message: the warning's class is eventlet's own.
    warnings.filterwarnings('ignore', message=r'\s*Eventlet is deprecated')


def main(argv=None):
    _quiet_eventlet_deprecation()
    parser = argparse.ArgumentParser(
        prog='oslo-messaging-ext-demo',
        description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest='demo', metavar='DEMO')
    for name, module_name in sorted(DEMOS.items()):
        module = importlib.import_module(module_name)
        sub = commands.add_parser(name, help=module.__doc__.splitlines()[0])
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    args = parser.parse_args(argv)
    if args.demo:
        return args.run(args)
    status = 0
    for name in sorted(DEMOS):
        print('=== oslo-messaging-ext-demo %s' % name)
        sys.stdout.flush()
        status = status or main([name])
    return status


if __name__ == '__main__':
    sys.exit(main())
