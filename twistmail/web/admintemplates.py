"""The admin pages' Jinja2 templates, kept in code so the wheel needs no package data.

Rendered with autoescape on: every value a user or client chose (addresses,
error texts that quote them) reaches the page as text, never as markup.
"""

from __future__ import annotations

import jinja2

_LAYOUT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>twistmail admin{% if title %}: {{ title }}{% endif %}</title>
<style>body{font-family:sans-serif;margin:2em;max-width:60em}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}form.inline{display:inline}
code.txt{word-break:break-all;font-size:80%}.error{color:#a00}.done{color:#060;white-space:pre-wrap;word-break:break-all}section{margin-bottom:2em}</style></head>
<body><header><h1>twistmail admin</h1>
{% if session %}<p>Logged in as <b id="who">{{ session.address }}</b>
<form class="inline" method="post" action="/admin/logout">{{ csrf() }}<button>Log out</button></form></p>{% endif %}
</header>
{% if error %}<p class="error" id="error">{{ error }}</p>{% endif %}
{% if done %}<p class="done" id="done">{{ done }}</p>{% endif %}
{% block body %}{% endblock %}</body></html>
"""

_LOGIN = """{% extends "layout" %}{% block body %}
<form method="post" action="/admin/login">
<input type="hidden" name="csrf" value="{{ token }}">
<p><label>Address <input name="address" id="address" autocomplete="username"></label></p>
<p><label>Password <input type="password" name="password" id="password" autocomplete="current-password"></label></p>
<p><button id="login">Log in</button></p></form>{% endblock %}
"""

_DASHBOARD = """{% extends "layout" %}{% block body %}
{% if charts %}<section id="traffic"><h2>Traffic, last 24 hours</h2>
{% for title, svg in charts %}<h3>{{ title }}</h3>{{ svg }}{% endfor %}</section>{% endif %}
<section><h2>Domains</h2><table id="domains"><tr><th>domain</th><th></th></tr>
{% for d in domains %}<tr><td>{{ d }}</td><td><form class="inline" method="post" action="/admin/domain/remove">{{ csrf() }}<input type="hidden" name="domain" value="{{ d }}"><button>Remove</button></form></td></tr>{% endfor %}
</table>
<form method="post" action="/admin/domain/add">{{ csrf() }}<input name="domain" id="new-domain" placeholder="example.org"> <button>Add domain</button></form></section>
<section><h2>Users</h2><table id="users"><tr><th>address</th><th>quota</th><th>new quota</th><th>new password</th><th></th></tr>
{% for u, quota in users %}<tr><td>{{ u }}</td><td>{{ quota }}</td><td><form class="inline" method="post" action="/admin/user/quota">{{ csrf() }}<input type="hidden" name="address" value="{{ u }}"><input name="size" size="8" placeholder="10M"> <button>Set</button></form></td>
<td><form class="inline" method="post" action="/admin/user/password">{{ csrf() }}<input type="hidden" name="address" value="{{ u }}"><input type="password" name="password" autocomplete="new-password"> <button>Set</button></form></td>
<td><form class="inline" method="post" action="/admin/user/remove">{{ csrf() }}<input type="hidden" name="address" value="{{ u }}"><button>Remove</button></form></td></tr>{% endfor %}
</table>
<form method="post" action="/admin/user/add">{{ csrf() }}<input name="address" id="new-user" placeholder="user@example.org">
<input type="password" name="password" id="new-password" autocomplete="new-password"> <button id="add-user">Add user</button></form></section>
<section><h2>Aliases</h2><table id="aliases"><tr><th>alias</th><th>targets</th><th></th></tr>
{% for a, targets in aliases %}<tr><td>{{ a }}</td><td>{{ targets|join(", ") }}</td><td><form class="inline" method="post" action="/admin/alias/remove">{{ csrf() }}<input type="hidden" name="source" value="{{ a }}"><button>Remove</button></form></td></tr>{% endfor %}
</table>
<form method="post" action="/admin/alias/add">{{ csrf() }}<input name="source" placeholder="alias@example.org">
<input name="targets" placeholder="user@example.org, other@example.org"> <button>Add alias</button></form></section>
<section><h2>DKIM keys</h2><p>The signing key set of a domain signs its outgoing mail; a second one
waits until you remove the first (publish its records first). Quota sizes: octets or K, M, G, T; "unlimited";
"default".</p>
<table id="dkim"><tr><th>domain</th><th>key set</th><th>created (UTC)</th><th>state</th><th>DNS TXT records to publish</th><th></th></tr>
{% for domain, name, created, state, records in rows %}<tr><td>{{ domain }}</td><td>{{ name }}</td><td>{{ created }}</td><td>{{ state }}</td>
<td>{% for owner, text in records %}<code>{{ owner }}</code><br><code class="txt">{{ text }}</code><br>{% endfor %}</td>
<td><form class="inline" method="post" action="/admin/dkim/remove">{{ csrf() }}<input type="hidden" name="domain" value="{{ domain }}"><input type="hidden" name="selector" value="{{ name }}"><button>Remove</button></form></td></tr>{% endfor %}
</table>
<form method="post" action="/admin/dkim/generate">{{ csrf() }}<input name="domain" id="dkim-domain" placeholder="example.org">
<input name="selector" placeholder="key set name (optional)"> <button id="dkim-generate">Generate keys</button></form></section>
<p><a href="/admin/queue">Queue</a> · <a href="/admin/password">Change my password</a></p>{% endblock %}
"""

_QUEUE = """{% extends "layout" %}{% block body %}
<h2>Queue</h2><table id="queue"><tr><th>id</th><th>sender</th><th>recipients</th><th>attempts</th>
<th>next attempt</th><th>last error</th><th></th></tr>
{% for id, sender, recipients, attempts, next, last in rows %}<tr><td>{{ id }}</td><td>{{ sender }}</td><td>{{ recipients }}</td><td>{{ attempts }}</td><td>{{ next }}</td><td>{{ last }}</td>
<td><form class="inline" method="post" action="/admin/queue/flush">{{ csrf() }}<input type="hidden" name="id" value="{{ id }}"><button>Retry</button></form>
<form class="inline" method="post" action="/admin/queue/delete">{{ csrf() }}<input type="hidden" name="id" value="{{ id }}"><button>Delete</button></form></td></tr>{% endfor %}
</table><p>{{ rows|length }} message{{ "" if rows|length == 1 else "s" }} queued</p>
<form method="post" action="/admin/queue/flush">{{ csrf() }}<button>Retry all now</button></form>
<p><a href="/admin/">Back</a></p>{% endblock %}
"""

_PASSWORD = """{% extends "layout" %}{% block body %}
<h2>Change my password</h2>
<form method="post" action="/admin/password">{{ csrf() }}
<p><label>New password <input type="password" name="password" id="own-password" autocomplete="new-password"></label></p>
<p><button id="change">Change</button></p></form>
{% if session.admin %}<p><a href="/admin/">Back</a></p>{% endif %}{% endblock %}
"""

ENVIRONMENT = jinja2.Environment(
    loader=jinja2.DictLoader({"layout": _LAYOUT, "login": _LOGIN, "dashboard": _DASHBOARD,
                              "password": _PASSWORD, "queue": _QUEUE}),
    autoescape=True, undefined=jinja2.StrictUndefined)
