"""The pluggy markers of the ``lvlm_safety`` project.

Plugins import them from the package root::

    from lvlm_safety_plugins import hookimpl
"""

import pluggy

PROJECT_NAME = "lvlm_safety"
ENTRY_POINT_GROUP = "lvlm_safety_plugins"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
