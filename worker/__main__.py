"""`python -m worker` == `upt worker`: one Celery worker consuming training tasks."""

import sys

from service.commands import run_worker

if __name__ == "__main__":
    sys.exit(run_worker(sys.argv[1:]))
