"""The daemon as a whole: building its components, reloading them, start-up checks, its user."""
