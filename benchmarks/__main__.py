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

"""Run the benchmarks: ``python -m benchmarks [name ...]``.

Each module ``benchmarks/bench_<name>.py`` exposes ``run(args)``, which
returns a list of ``_harness.Table``. Tables are printed as they come;
the exit code is 1 when a target was missed, so a regression is visible.
"""

import argparse
import importlib
import pkgutil
import sys

import benchmarks


def main(argv=None):
    available = sorted(m.name[len('bench_'):]
                       for m in pkgutil.iter_modules(benchmarks.__path__)
                       if m.name.startswith('bench_'))
    parser = argparse.ArgumentParser(prog='python -m benchmarks')
    parser.add_argument('names', nargs='*', metavar='NAME',
                        help='benchmarks to run (default: all of: %s)'
                        % ', '.join(available))
    parser.add_argument('--quick', action='store_true',
                        help='fewer iterations, for a smoke run')
    parser.add_argument('--duration', type=float, metavar='SECONDS',
                        help='length of the soak runs (unix: the hub with '
                        '32 subscribers; default 60, 3 with --quick)')
    args = parser.parse_args(argv)
    unknown = set(args.names) - set(available)
    if unknown:
        parser.error('unknown benchmark(s) %s; choose from %s'
                     % (', '.join(sorted(unknown)), ', '.join(available)))
    missed = []
    for name in args.names or available:
        module = importlib.import_module('benchmarks.bench_%s' % name)
        for table in module.run(args):
            print(table.render())
            print()
            sys.stdout.flush()
            missed.extend(table.missed())
    if missed:
        print('Targets missed: %s' % ', '.join(missed))
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
