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

extensions = [
    'sphinx.ext.autodoc',
    'oslo_config.sphinxext',
    'openstackdocstheme',
    'reno.sphinxext',
]

openstackdocs_repo_name = 'openstack/oslo.messaging-ext'
openstackdocs_bug_project = 'oslo.messaging-ext'
openstackdocs_bug_tag = ''
openstackdocs_auto_name = False

project = 'oslo.messaging-ext'
copyright = '2026, oslo.messaging-ext developers'
source_suffix = '.rst'
master_doc = 'index'
add_module_names = True
pygments_style = 'native'

html_theme = 'openstackdocs'
