"""The control plane's dashboard: the fleet and its migrations, live, in a browser
(docs/DASHBOARD.md). Server-rendered HTML, a small script that swaps the sections the
event stream sends, plots drawn as SVG on the server: nothing to build, nothing fetched
from elsewhere."""

from roam.control.dashboard.routes import mount

__all__ = ["mount"]
