"""Print `name==version` for every dependency's declared floor (`name>=version` in pyproject.toml)
except torch and torchvision, which stay as installed: what CI's lowest-versions run installs."""

import re
import sys
from pathlib import Path

import tomllib

KEEP_INSTALLED = {"torch", "torchvision"}

project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
pins = []
for requirement in project["dependencies"]:
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][0-9A-Za-z.]*)", requirement.replace(" ", ""))
    if match is None:
        sys.exit(f"floors.py: {requirement!r} has no plain '>=' floor")
    if match.group(1).lower() not in KEEP_INSTALLED:
        pins.append(f"{match.group(1)}=={match.group(2)}")
print(" ".join(pins))
