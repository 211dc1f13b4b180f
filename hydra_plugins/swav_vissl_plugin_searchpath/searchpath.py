"""Puts the plugin's installed configs on hydra's search path.

With this, ``config=swav_plugin/...`` resolves from any working directory,
next to VISSL's own ``config=...`` tree.
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class SwavVisslPluginSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="swav_vissl_plugin", path="pkg://swav_vissl_plugin.configs")
