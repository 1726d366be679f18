"""The web side of the mail server: what mail needs served over HTTP(S).

Today the MTA-STS policy (RFC 8461); the resource tree is built in one place
(L{twistmail.web.site.buildRoot}) so ACME, autoconfig, metrics and an admin UI
can be added beside it.
"""
