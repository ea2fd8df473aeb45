"""Celery worker: trains a task's prompts with the backbone frozen (see worker.tasks)."""
