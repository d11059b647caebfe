"""Views: what a person reads about a job beyond the console (the gallery page)."""
