# -*- test-case-name: tests.test_plugins -*-
"""Find a plugin by name: the one place twistmail calls ``twisted.plugin.getPlugins``.

Every plugin found is checked against its interface (``verifyObject``), so a
broken third-party backend stops ``twistd`` at start-up with its module named,
not at the first delivery.  Two plugins claiming one name are refused too:
which one won would depend on the order of ``sys.path``.
"""

from __future__ import annotations

from twisted.plugin import getPlugins
from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

from twistmail.config import ConfigError


def _origin(plugin) -> str:
    return type(plugin).__module__


def available(interface) -> dict:
    """{name: plugin} of every valid plugin providing C{interface}.

    @raise ConfigError: a plugin does not implement C{interface} correctly, or
        two plugins share a name.
    """
    import twistmail.plugins

    found: dict = {}
    for plugin in getPlugins(interface, twistmail.plugins):
        try:
            verifyObject(interface, plugin)
        except Invalid as e:
            raise ConfigError(f"plugin {_origin(plugin)} does not implement "
                              f"{interface.__name__}: {e}. Fix: update or uninstall the package "
                              "that provides it") from None
        name = plugin.name
        if name in found:
            raise ConfigError(f"two plugins are named {name!r}: {_origin(found[name])} and "
                              f"{_origin(plugin)}. Fix: uninstall one of the packages")
        found[name] = plugin
    return dict(sorted(found.items()))


def find(interface, name: str, where: str, kind: str = "plugin"):
    """The plugin providing C{interface} called C{name}.

    @param where: the config key naming it, and C{kind} what it is (for the
        error message).
    @raise ConfigError: no such plugin (the message lists those available), or
        see L{available}.
    """
    plugins = available(interface)
    if name not in plugins:
        raise ConfigError(f"{where}: unknown {kind} {name!r}. Fix: use one of "
                          f"{', '.join(plugins) or '(none installed)'}, or install the package "
                          "that provides it")
    return plugins[name]
