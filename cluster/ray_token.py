"""Ray's auth token: where Ray looks for it, and one made where it is missing.

Ray 2.60 starts a head (`ray start --head`) with `RAY_AUTH_MODE=token` only when a token
exists, and every client (drivers, the dashboard's REST API) sends it. Ray looks in the
`RAY_AUTH_TOKEN` variable, then the file `RAY_AUTH_TOKEN_PATH`, then `~/.ray/auth_token`.
`ensure_token()` makes one the way `ray get-auth-token --generate` does (256 random bits,
hex), but readable by its owner only; the stack and the head's start script call it, so a
fresh HOME works. This module imports nothing from Ray.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path


def token_path() -> Path:
    """The file Ray reads its token from: RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def read_token() -> str:
    """The token Ray's own clients would send; empty when there is none."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token and token_path().is_file():
        token = token_path().read_text().strip()
    return token


def ensure_token() -> Path | None:
    """Make a token at token_path() unless Ray already has one; returns the file made, or
    None when there was one. Two callers at once make one token: the file is created
    exclusively."""
    if read_token():
        return None
    path = token_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another caller made it just now, or it is an empty file
        if read_token():
            return None
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def main() -> int:
    """`python -m cluster.ray_token`: make the token if missing (infra/start_head.sh)."""
    made = ensure_token()
    print(f"made Ray's auth token in {made}" if made else "Ray's auth token exists",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
