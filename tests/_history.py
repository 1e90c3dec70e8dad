"""Reading a history file in tests: its run headers and its check lines apart."""

import json
from pathlib import Path


def lines_of(path):
    """Every JSON line of a history file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def checks_in(path):
    """The lines of checks (and failed checks) of a history file, headers left out."""
    return [line for line in lines_of(path) if line.get("record") != "run"]


def headers_in(path):
    """The run headers of a history file."""
    return [line for line in lines_of(path) if line.get("record") == "run"]
