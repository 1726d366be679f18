"""twistmail: an all-in-one mail server on Twisted.

Importing this package must stay cheap and must never import the reactor:
twistd imports it through the plugin before it installs its reactor.
"""

__version__ = "0.1.0"
