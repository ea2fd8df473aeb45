"""The README documents every service setting with the default the code really uses."""

from __future__ import annotations

import re

from service.settings import Settings
from svc_helpers import ROOT


def test_every_setting_is_documented_with_its_default():
    section = (ROOT / "README.md").read_text().split("## The service", 1)[1]
    rows = dict(re.findall(r"^\| `(UPT_[A-Z_]+)` \| ([^|]+) \|", section, flags=re.M))
    for name, field in Settings.model_fields.items():
        variable = f"UPT_{name.upper()}"
        assert variable in rows, f"{variable} is missing from the README's settings table"
        default = field.default
        if default is None or default in ("", []):  # empty: the row says what that means
            assert rows[variable].strip().startswith("("), (variable, rows[variable])
        else:
            shown = rows[variable].strip().strip("`")
            expected = str(default).lower() if isinstance(default, bool) else str(default)
            assert shown == expected or (isinstance(default, float) and float(shown) == default), (variable, shown)
