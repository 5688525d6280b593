"""The console's panes: each one reads the session model and shows one aspect of it.

A pane never talks to a process. ``refresh_from(model)`` updates only what changed.
"""
