"""twistmail's plugin package: storage backends are found here with ``twisted.plugin``.

Another distribution adds a backend by shipping a module in its own
``twistmail/plugins/`` directory (without an ``__init__.py``); every such
directory on ``sys.path`` is searched, as ``twisted/plugins`` is for twistd.
See README.rst, "Writing a storage backend".
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))
__all__: list[str] = []
