"""`python -m jobs.cli`: what the local executor and the stage pods run."""

from . import entry

entry()
