"""Cache keys that follow the domain code, not only the step function.

ZenML hashes a step's own source; our steps are thin and the work happens in
``xray/`` and ``materializers/``, so a change there must invalidate the cache too.
"""

import hashlib
from pathlib import Path

from zenml.config.cache_policy import CachePolicy

ROOT = Path(__file__).resolve().parents[1]


def domain_code_hash() -> str:
    digest = hashlib.sha256()
    for folder in ("xray", "materializers"):
        for path in sorted((ROOT / folder).glob("*.py")):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


DOMAIN_CODE = CachePolicy(cache_func=domain_code_hash)
