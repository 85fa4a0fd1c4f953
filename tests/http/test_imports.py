"""The HTTP process imports neither torch nor the runtime's core (it only speaks the protocol)."""

import subprocess
import sys


def test_http_front_imports_no_torch():
    code = ("import sglite.http.server, sglite.http.__main__, sglite.http.launch, sglite.engine\n"
            "import sglite.lang.backend.http_client, sys\nprint(' '.join(sys.modules))")
    mods = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True, timeout=120).stdout.split())
    assert "torch" not in mods and "transformers" not in mods
    assert {m for m in mods if m.startswith("sglite.runtime")} <= {
        "sglite.runtime", "sglite.runtime.server", "sglite.runtime.server.args"}
