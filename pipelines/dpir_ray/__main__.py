"""python -m dpir_ray: what pipelines/restore-distributed.sh runs."""

from .cli import entry

entry()
