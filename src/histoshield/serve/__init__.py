"""`histoshield serve`: a local web app and JSON API on top of the whole stack (like cli.py).

`create_app(models, limits) -> FastAPI` (models from `load_models(checkpoints)`); the page is
one static HTML file and one script in `serve/static/`, no build step.
"""

from histoshield.serve.app import create_app
from histoshield.serve.service import Limits, Loaded, load_models

__all__ = ["Limits", "Loaded", "create_app", "load_models"]
