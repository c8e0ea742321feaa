"""Drop-in registering the hello-vo experiment with ``twisted.plugin``.

``getPlugins(IExperiment)`` imports every module of every ``twisted/plugins``
directory on ``sys.path`` and collects the module-level objects that provide the
interface, so this file only instantiates the plug-in: keep it this small, because
every pilot start may import it.  It lives in the namespace ``twisted.plugins``:
this directory and its parent must never get an ``__init__.py``.
"""

from hello_vo import HelloVOExperiment

hello_vo = HelloVOExperiment()
