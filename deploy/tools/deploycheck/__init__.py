"""The checks of deploy/check, by file: see validate.py."""
