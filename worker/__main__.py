"""`python -m worker` == `upt worker`: one Celery worker consuming training tasks.
`python -m worker --ping`: exit 0 while this host's worker answers through the broker (health check)."""

import sys

from worker.process import answers_ping, run_worker

if __name__ == "__main__":
    if sys.argv[1:] == ["--ping"]:
        sys.exit(0 if answers_ping() else 1)
    sys.exit(run_worker(sys.argv[1:]))
