"""Views: what a person reads about a job: the gallery page and `status`'s lines."""
