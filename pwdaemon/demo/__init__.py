"""The demo: a bundled small model under shifting synthetic traffic, with a live view."""
