"""The bot's library. Importing it applies the app's logging decisions (shared.logs)."""

from shared.logs import quiet_libraries

quiet_libraries()
