"""SMTP policy as a chain of filters (L{twistmail.interfaces.IMessageFilter}).

The built-in filters live in this package and are registered as plugins in
``twistmail/plugins/twistmail_builtin.py``, the way a third-party filter
registers its own.
"""
