"""SB3 logger output in strict JSON Lines (``null`` instead of ``NaN``), appending.

SB3's own ``JSONOutputFormat`` writes Python's ``NaN`` (e.g. ``train/erc_clip_fraction`` when ERC
clips nothing in an update with no data), which jq, JavaScript and strict JSON readers reject, and
it truncates the file on open, which loses the log of a resumed run. This format keeps SB3's
conversion of values (arrays, tensors) and writes each dump through
:func:`erc_gym.jsonl.append_jsonl`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from stable_baselines3.common.logger import JSONOutputFormat

from erc_gym.jsonl import append_jsonl

__all__ = ["StrictJSONOutputFormat"]


class StrictJSONOutputFormat(JSONOutputFormat):
    """An SB3 ``KVWriter`` appending one strict JSON object per dump to ``filename``.

    :param filename: the ``.jsonl`` / ``.json`` file (created if missing, never truncated).
    """

    def __init__(self, filename: str | Path) -> None:
        self.path = Path(filename)
        self.path.touch()
        # SB3's writer renders into this buffer; each line is then re-encoded strictly
        self.file = io.StringIO()  # type: ignore[assignment]

    def write(
        self, key_values: dict[str, Any], key_excluded: dict[str, tuple[str, ...]], step: int = 0
    ) -> None:
        """Render with SB3's value conversion, then append as strict JSON (NaN -> null)."""
        super().write(key_values, key_excluded, step)
        buffer: io.StringIO = self.file  # type: ignore[assignment]
        text = buffer.getvalue()
        self.file.seek(0)
        self.file.truncate()
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        if rows:
            append_jsonl(self.path, rows)

    def close(self) -> None:
        """Nothing to close: every dump opens and closes the file."""
