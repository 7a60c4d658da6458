"""Long operations run by Celery workers: scale-down with drain (and, later, migrations)."""
