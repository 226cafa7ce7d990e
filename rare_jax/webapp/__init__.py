"""The labeling web app: a person answers the loop's queries in a browser.

`folder_run` (a run's workdir on a folder of images), `labeler` (the `Labeler` that waits for
the person), `session` (the loop in a worker thread), `server` (Flask app and HTTP server),
`static/` (the page: plain HTML, CSS and JavaScript). The CLI is `python -m rare_jax.label`.
"""
