"""`skillfold ui`: the skill library in a browser, served by FastAPI with pages rendered by Jinja2.

`create_app(UiSettings(home=...))` builds the app; `open_library` opens the store it shows and
creates nothing. The pages read memory through its public API, as the CLI does (agent/ui/app.py).
"""

from agent.ui.app import UiSettings, create_app, open_library

__all__ = ["UiSettings", "create_app", "open_library"]
