"""The local demo server and its static page."""
