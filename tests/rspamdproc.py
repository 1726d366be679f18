"""A private Rspamd on loopback, started by a test (Debian's ``rspamd`` package).

Its own configuration directory, database directory and port; no Redis, no
Lua plugins, no DNS beyond loopback, so answers are deterministic::

    with Rspamd(freePort()) as rs:
        rs.url                  -> "http://127.0.0.1:PORT" (the normal worker: /checkv2)

Verdicts come from the GTUBE test patterns (``enable_test_patterns``): a body
with L{GTUBE} is rejected, L{GTUBE_ADD_HEADER} gets "add header",
L{GTUBE_REWRITE_SUBJECT} "rewrite subject"; and from a test rule: a message
with an ``X-Test-Action: <action>`` header gets that action ("soft reject",
"greylist", ...) with the message ``test <action>``.  Another test (DKIM
verification) can add its own modules with C{extra}.
"""

from __future__ import annotations

import http.client
import os
import shutil
import subprocess
import tempfile
import time

RSPAMD = shutil.which("rspamd") or "/usr/bin/rspamd"

_PATTERN = "JS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
GTUBE = "X" + _PATTERN
GTUBE_ADD_HEADER = "Y" + _PATTERN
GTUBE_REWRITE_SUBJECT = "Z" + _PATTERN

CONFIG = """\
options {{
  pidfile = "{dir}/rspamd.pid";
  dbdir = "{dir}/db";
  tempdir = "{dir}/tmp";
  enable_test_patterns = true;
  dns {{ nameserver = ["127.0.0.1:1"]; timeout = 1s; retransmits = 1; }}
}}
logging {{ type = "file"; filename = "{dir}/rspamd.log"; level = "info"; }}
actions {{ reject = 15; add_header = 6; greylist = 4; }}
worker "normal" {{ bind_socket = "127.0.0.1:{port}"; count = 1; task_timeout = 8s; }}
lua = "{dir}/test.lua";
{extra}
"""

TEST_RULE = """\
rspamd_config:register_symbol({
  name = 'TWISTMAIL_TEST_ACTION',
  type = 'prefilter',
  priority = 10,
  callback = function(task)
    local action = task:get_header('X-Test-Action')
    if action then
      task:set_pre_result(action, 'test ' .. action, 'twistmail-test')
    end
  end,
})
"""


def available() -> bool:
    return os.path.exists(RSPAMD)


class Rspamd:
    def __init__(self, port: int, extra: str = "") -> None:
        self.port = port
        self.dir = tempfile.mkdtemp(prefix="twistmail-rspamd-")
        for sub in ("db", "tmp"):
            os.makedirs(os.path.join(self.dir, sub))
        self.config = os.path.join(self.dir, "rspamd.conf")
        with open(self.config, "w") as f:
            f.write(CONFIG.format(dir=self.dir, port=port, extra=extra))
        with open(os.path.join(self.dir, "test.lua"), "w") as f:
            f.write(TEST_RULE)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        try:
            with open(os.path.join(self.dir, "rspamd.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def start(self, timeout: float = 120) -> Rspamd:
        args = [RSPAMD, "-f", "-c", self.config]
        if os.geteuid() == 0:
            args += ["-u", "root", "-g", "root", "-i"]  # -i: let workers run as root (a test)
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self._pong():
            if self.process.poll() is not None:
                output = self.process.stdout.read().decode(errors="replace")
                self.stop()
                raise RuntimeError(f"rspamd exited ({self.process.returncode}): {output}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"rspamd did not answer within {timeout} s:\n{self.log()}")
            time.sleep(0.1)  # polling for readiness: nothing to wait on but the port
        return self

    def _pong(self) -> bool:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:
            connection.request("GET", "/ping")
            return connection.getresponse().read().strip() == b"pong"
        except OSError:
            return False
        finally:
            connection.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None and self.process.stdout:
            self.process.stdout.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Rspamd:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
