"""Unit tests: pure, no root; memfake (the in-memory source) is importable from here."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
