# -*- test-case-name: tests.test_filter_config -*-
"""Build the filters ``[filters] inbound`` and ``submission`` name, from their plugins."""

from __future__ import annotations

from twistmail import _pluginload
from twistmail.config import Config, ConfigError
from twistmail.filters.chain import ConfiguredFilter
from twistmail.interfaces import IMessageFilterFactory
from twistmail.model import FilterContext

ROLES = ("inbound", "submission")


def makeFilters(config: Config, context: FilterContext) -> dict[str, tuple[ConfiguredFilter, ...]]:
    """{role: the configured filters of that role, in order}.

    A filter named in both lists is built once and shared (its state, a
    greylist's say, is one).  No side effects: ``check-config`` calls this too.

    @raise ConfigError: an unknown name (listing those installed), a broken
        plugin, or options the plugin refuses.
    """
    built: dict[str, ConfiguredFilter] = {}
    out = {}
    for role in ROLES:
        for name in config["filters"][role]:
            if name not in built:
                factory = _pluginload.find(IMessageFilterFactory, name, f"[filters] {role}",
                                           "filter")
                timeout, onFailure = config.filterSettings(name)
                built[name] = ConfiguredFilter(
                    name, factory.makeFilter(config.filterOptions(name), context), timeout,
                    onFailure)
        out[role] = tuple(built[name] for name in config["filters"][role])
    return out


__all__ = ["ROLES", "ConfigError", "makeFilters"]
