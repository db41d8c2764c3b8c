"""pip's effective settings as a uv command, for infra/install.sh.

uv reads none of pip's configuration, and where packages come from is the machine's
business (pip's config files, PIP_* variables), so install.sh asks pip what it would use
(`pip config list`) and hands uv the same sources:

    python infra/pip_uv.py UV_COMMAND...

prints `env`'s arguments, one a line: NAME=VALUE for uv's environment (cert, client-cert,
proxy, timeout), then UV_COMMAND, then uv's options (index-url, extra-index-url,
find-links, no-index, trusted-host, constraint). Standard library only: it runs before
tpserve is installed.
"""

from __future__ import annotations

import ast
import subprocess
import sys

# pip's sections, weakest first: a key in [install] beats [global], a PIP_* variable both
SECTIONS = ("global", "install", ":env:")


def effective(config_list: str) -> dict[str, str]:
    """`pip config list`'s lines (`section.key='value'`) as the values pip uses."""
    found: dict[str, dict[str, str]] = {}
    for line in config_list.splitlines():
        name, sep, value = line.partition("=")
        section, dot, key = name.rpartition(".")
        if not sep or not dot or section not in SECTIONS:
            continue
        # pip accepts find_links as well as find-links (and --find-links)
        key = key.strip().lstrip("-").replace("_", "-")
        found.setdefault(section, {})[key] = ast.literal_eval(value.strip())
    merged: dict[str, str] = {}
    for section in SECTIONS:
        merged.update(found.get(section, {}))
    return merged


def truthy(value: str) -> bool:
    return value.strip().lower() in ("y", "yes", "t", "true", "on", "1")


def uv_command(settings: dict[str, str], command: list[str]) -> list[str]:
    """`env`'s arguments that run `command` with pip's sources and transport settings."""
    env: list[str] = []
    options: list[str] = []
    # pip's lists (extra-index-url, find-links, ...) are whitespace-separated, one value
    # or several, on one line or many
    for key, flag in (("index-url", "--index-url"), ("extra-index-url", "--extra-index-url"),
                      ("find-links", "--find-links"), ("trusted-host", "--allow-insecure-host"),
                      ("constraint", "--constraint")):
        for value in settings.get(key, "").split():
            options += [flag, value]
    if truthy(settings.get("no-index", "")):
        options.append("--no-index")
    # without pip's cert, uv keeps its own: Mozilla's roots (pip's certifi's) or the
    # environment's SSL_CERT_FILE
    if settings.get("cert"):
        env.append(f"SSL_CERT_FILE={settings['cert']}")
    if settings.get("client-cert"):
        env.append(f"SSL_CLIENT_CERT={settings['client-cert']}")
    if settings.get("proxy"):
        env += [f"HTTP_PROXY={settings['proxy']}", f"HTTPS_PROXY={settings['proxy']}"]
    timeout = settings.get("default-timeout") or settings.get("timeout")
    if timeout:
        env.append(f"UV_HTTP_TIMEOUT={max(1, round(float(timeout)))}")
    line = env + command + options
    if any("\n" in item for item in line):
        raise ValueError("a pip setting holds a line break")
    return line


def main() -> int:
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                            capture_output=True, text=True, check=True).stdout
    print("\n".join(uv_command(effective(listed), sys.argv[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
