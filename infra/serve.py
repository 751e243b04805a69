"""REST serving of a registered version exactly as it was registered (`make serve` runs this):

    python -m infra.serve [--model-version champion|N] [--port 5001] [--workers N] [--host 127.0.0.1]

Resolves the version in the tracking server of MLFLOW_TRACKING_URI, downloads its folder into
``.cache/serving/<model>-v<N>/`` and checks every file against the digest recorded when it was registered (the tag
``model_sha256``, which only a reviewer's account can change; xray.serving.bundle.verify). Only then does
``mlflow models serve`` serve that checked folder, so the code the scoring server imports from it is the code that
was registered. A version whose files changed is refused in one ``error:`` line naming it (exit 2), and nothing
is served.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

from xray.config.registry import RegistryConfig
from xray.environment import REPO_ROOT, apply_defaults
from xray.errors import XrayError

logger = logging.getLogger("infra.serve")


def checked_folder(model_name: str, version_or_alias: str, root: Path) -> tuple[str, dict]:
    """The version's folder under ``root``, downloaded afresh and checked against its digest; (path, version info)."""
    from xray.registry import store

    info = store.resolve_version(model_name, version_or_alias)
    folder = root / f"{model_name}-v{info.version}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, mode=0o700)
    try:
        return store.download_verified(info, "", str(folder)), info
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # nothing of a refused version stays to be served by hand
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-name", default=RegistryConfig().model_name)
    parser.add_argument("--model-version", default="champion", help="a version number or an alias")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5001)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--folder", type=Path, default=REPO_ROOT / ".cache" / "serving")
    args = parser.parse_args(argv)
    apply_defaults()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        local, info = checked_folder(args.model_name, args.model_version, args.folder)
    except XrayError as error:
        sys.stderr.write(f"error: {str(error).splitlines()[0]}\n")
        return 2
    logger.info(
        "serving %s v%s from %s (files checked against digest %s)",
        args.model_name,
        info.version,
        local,
        (info.digest or "none recorded")[:12],
    )
    # The scoring server starts `uvicorn` from PATH: this interpreter's first.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    command = [shutil.which("mlflow") or "mlflow", "models", "serve", "-m", local, "--env-manager", "local"]
    command += ["-h", args.host, "-p", str(args.port), "-w", str(args.workers)]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
