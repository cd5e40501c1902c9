"""Route modules of the REST API (health, models, datasets, jobs)."""
