"""Cache keys that follow the domain code, not only the step function.

ZenML hashes a step's own source; our steps are thin and the work happens in ``xray/`` and ``materializers/``, so a
change anywhere in them (every stage's subpackage too) must invalidate the cache.
"""

import hashlib

from zenml.config.cache_policy import CachePolicy

from xray.environment import REPO_ROOT

ROOT = REPO_ROOT
FOLDERS = ("xray", "materializers")


def domain_code_hash() -> str:
    """SHA-256 over every ``.py`` file under the domain folders, at any depth, each with its path relative to the
    root (a module moved between stages changes the key too), in a fixed order."""
    digest = hashlib.sha256()
    files = sorted(
        (path.relative_to(ROOT).as_posix(), path) for folder in FOLDERS for path in (ROOT / folder).rglob("*.py")
    )
    for relative, path in files:
        digest.update(relative.encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


DOMAIN_CODE = CachePolicy(cache_func=domain_code_hash)
