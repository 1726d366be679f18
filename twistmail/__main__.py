"""``python -m twistmail``: the admin command line."""

from twistmail.cli.main import main

raise SystemExit(main())
